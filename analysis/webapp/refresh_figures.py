"""Refresh the committed pictures the app's tests make, from a source checkout:

    python -m analysis.webapp.refresh_figures   # -> results/app_screenshot.png, app_explain.png, app_unknown_word.png,
                                             #    load_test.json

The test suite writes these into a temporary folder (it never touches the repository); this command runs the same
browser and load tests with ``--artifacts-dir results`` so README.md, docs/app.md and docs/reliability.md show
current pictures and figures. Needs Chromium at /usr/bin/chromium and takes a few minutes on CPU.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from tgvkv.loading import REPO_ROOT

#: the tests that make the committed pictures and figures, and what each one writes
TESTS = {
    "tests/test_app_browser.py": ("app_screenshot.png", "app_explain.png", "app_unknown_word.png"),
    "tests/test_reliability_load.py": ("load_test.json",),
}


def command(out: Path) -> list[str]:
    """The pytest command line that writes the pictures into `out`."""
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, "--artifacts-dir", str(out)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.webapp.refresh_figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "results", help="folder to write into (default: results/)")
    args = ap.parse_args(argv)
    if not (REPO_ROOT / "tests").is_dir():
        print(f"error: the tests are not here ({REPO_ROOT / 'tests'}); run this from a source checkout",
              file=sys.stderr)
        return 2
    rc = subprocess.call(command(args.out.resolve()), cwd=REPO_ROOT)
    if rc == 0:
        names = [name for files in TESTS.values() for name in files]
        print(f"refreshed {', '.join(names)} in {args.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
