"""The test suite must not write into the repository: conftest.py snapshots `git status` before the session and
fails the session when a test has created, changed or deleted a file that git sees (ignored files do not count).

A snapshot maps every path `git status --porcelain` lists (modified, deleted, untracked) to a hash of its content, so
a test that rewrites an already modified file is caught too.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def snapshot(repo: Path) -> dict[str, str] | None:
    """{path: content hash} of the files git lists as changed or untracked; None outside a git checkout."""
    try:
        res = subprocess.run(["git", "status", "--porcelain=v1", "-z", "--untracked-files=all"], cwd=repo,
                             capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    entries = [e for e in res.stdout.decode("utf-8", "surrogateescape").split("\0") if e]
    out: dict[str, str] = {}
    skip_next = False
    for entry in entries:
        if skip_next:  # the source path of a rename
            skip_next = False
            continue
        status, path = entry[:2], entry[3:]
        skip_next = "R" in status or "C" in status
        file = repo / path
        out[path] = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else f"<{status.strip()}>"
    return out


def changes(before: dict[str, str], after: dict[str, str], allowed: Path | None = None,
            repo: Path | None = None) -> list[str]:
    """Paths whose state differs between the two snapshots, outside the `allowed` folder."""
    paths = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    if allowed is not None and repo is not None:
        allowed = allowed.resolve()
        paths = [p for p in paths if not (repo / p).resolve().is_relative_to(allowed)]
    return paths
