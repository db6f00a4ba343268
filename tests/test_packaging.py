"""The project installs as a package: pyproject.toml agrees with the requirement files and the source tree, and a
non-editable install into a fresh virtualenv imports, lists the methods and loads the demo model from any directory.
Also: CI lints before testing, the test suite's repository guard, and the command that refreshes committed pictures.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import repo_guard
import tgvkv
from analysis.webapp import refresh_figures

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_lines(path: Path) -> list[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-r")]


def test_metadata_matches_requirements_and_version():
    project = PYPROJECT["project"]
    assert project["version"] == tgvkv.__version__
    assert project["requires-python"] == ">=3.11"
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    for line in (REPO / "requirements.txt").read_text().splitlines():  # setuptools reads it without comment stripping
        assert "#" not in line or line.lstrip().startswith("#"), f"inline comment in requirements.txt: {line!r}"
    assert project["optional-dependencies"]["dev"] == requirement_lines(REPO / "requirements-dev.txt")


def test_every_source_package_is_listed():
    """The explicit package list (needed for tgvkv.assets -> assets/) names every folder with an __init__.py."""
    found = sorted(".".join(p.parent.relative_to(REPO).parts) for top in ("tgvkv", "analysis")
                   for p in (REPO / top).rglob("__init__.py"))
    setuptools_cfg = PYPROJECT["tool"]["setuptools"]
    assert sorted(setuptools_cfg["packages"]) == sorted(found + ["tgvkv.assets"])
    assert setuptools_cfg["package-dir"] == {"tgvkv.assets": "assets"}


def test_ci_lints_before_testing():
    steps = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "python -m ruff check ." in steps
    assert steps.index("python -m ruff check .") < next(i for i, s in enumerate(steps) if "pytest" in s)
    assert any(s.startswith("python -m pip install -q --no-deps -e .") for s in steps)
    assert PYPROJECT["tool"]["ruff"]["line-length"] == 120


@pytest.mark.slow
def test_installed_package_works_from_any_directory(tmp_path):
    """`pip install .` of the tracked files into a fresh virtualenv (system site-packages for the pinned
    dependencies), then, from an unrelated folder: import, `python -m tgvkv methods`, the demo model and its examples
    from the installed package data."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    venv = tmp_path / "venv"
    # without its own pip: the bundled pip/setuptools would shadow the system's (setuptools >= 77 builds this)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=300)
    python = venv / "bin" / "python"
    # offline with the system's setuptools; else pip fetches the build requirements (needs the package index)
    offline = ["--no-index", "--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    res = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *offline, str(src)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    res = subprocess.run([str(python), "-m", "tgvkv", "methods"], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [line.split()[0] for line in res.stdout.splitlines()] == sorted(tgvkv.POLICIES)

    script = (
        "import tgvkv, analysis\n"
        "from tgvkv.loading import DEMO_MODEL_DIR\n"
        "from analysis.webapp.examples import EXAMPLES_DIR, load_examples\n"
        "model, processor = tgvkv.load_demo_model()\n"
        "print(tgvkv.__file__)\nprint(DEMO_MODEL_DIR)\nprint(EXAMPLES_DIR)\n"
        "print(len(load_examples()), model.config.text_config.num_hidden_layers)\n"
    )
    res = subprocess.run([str(python), "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    init, model_dir, examples_dir, counts = res.stdout.strip().splitlines()[-4:]
    site = Path(init).parent
    assert site.parent.name == "site-packages" and str(site).startswith(str(venv)), init
    assert Path(model_dir) == site / "assets" / "demo-vlm" and Path(examples_dir) == site / "assets" / "examples"
    import json

    n_examples = len(json.loads((REPO / "assets" / "examples" / "examples.json").read_text()))
    layers = json.loads((REPO / "assets" / "demo-vlm" / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert counts.split() == [str(n_examples), str(layers)]


# -- tests never write into the repository ----------------------------------------------------------------------------
def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def test_repo_guard_sees_new_changed_and_deleted_files(tmp_path):
    repo = tmp_path / "r"
    (repo / "results").mkdir(parents=True)
    (repo / "a.txt").write_text("a")
    (repo / "dirty.txt").write_text("1")
    (repo / "gone.txt").write_text("g")
    (repo / ".gitignore").write_text("ignored/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "init")
    (repo / "dirty.txt").write_text("2")  # already modified before the session: a rewrite must still be seen
    before = repo_guard.snapshot(repo)
    assert before is not None and set(before) == {"dirty.txt"}
    assert repo_guard.changes(before, repo_guard.snapshot(repo)) == []

    (repo / "a.txt").write_text("changed")
    (repo / "dirty.txt").write_text("3")
    (repo / "gone.txt").unlink()
    (repo / "results" / "shot.png").write_bytes(b"png")
    (repo / "ignored").mkdir()
    (repo / "ignored" / "x").write_text("ignored by git")
    after = repo_guard.snapshot(repo)
    assert repo_guard.changes(before, after) == ["a.txt", "dirty.txt", "gone.txt", "results/shot.png"]
    assert repo_guard.changes(before, after, repo / "results", repo) == ["a.txt", "dirty.txt", "gone.txt"]
    assert repo_guard.snapshot(tmp_path / "not-a-repo-at-all") is None


def test_refresh_command_runs_the_picture_tests_into_results():
    out = REPO / "results"
    assert refresh_figures.command(out) == [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_app_browser.py",
        "tests/test_reliability_load.py", "--artifacts-dir", str(out)]
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in (n for names in refresh_figures.TESTS.values() for n in names):
        assert f"results/{name}" in tracked  # it refreshes committed files
    for test in refresh_figures.TESTS:
        assert "artifacts_dir" in (REPO / test).read_text()
