"""README.md's Python block and every command line of its bash blocks run as written, in a fresh copy of the
repository's tracked files (so nothing lands in the repository and no untracked file helps).

Rules, read from the markdown (nothing is copied from it):
- python blocks run with `python -` in the copy's root;
- bash blocks are split into commands (backslash continuations joined, trailing `# ...` comments dropped) and run in
  order in the same copy, so a command may read what an earlier one wrote (out.npz);
- the set-up block's commands (install + serve, and CI itself) are not run here: the browser and load tests serve the
  app, CI runs `bash .ci/run`; this test only checks they are the two documented commands;
- a command whose comment says `(needs: ...)` (network, GPU, several GPUs) is skipped; at most four may say so;
- evaluations (`python -m tgvkv.eval` with `--limit`) run with `--limit 1` and their first budget only.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SETUP_HEADING = "Set-up"
SETUP_COMMANDS = ["pip install -r requirements.txt && python app.py", "bash .ci/run"]
NEEDS = re.compile(r"\(needs: ([^)]+)\)")
ALLOWED_NEEDS = {"network", "GPU", "several GPUs"}
MAX_SKIPPED = 4  # a hub model on a real benchmark, multi-GPU, and the lmms-eval extra's install + run

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Block:
    heading: str
    language: str
    code: str


@dataclass(frozen=True)
class Command:
    heading: str
    line: str  # the command as written, continuations joined, without its comment
    needs: str | None  # what a `(needs: ...)` comment says it needs


def blocks(markdown: str) -> list[Block]:
    """Fenced code blocks with the `## ` heading they sit under."""
    out, heading, lang, code = [], "", None, []
    for line in markdown.splitlines():
        if lang is None and line.startswith("## "):
            heading = line[3:].strip()
        elif lang is None and line.startswith("```"):
            lang, code = line[3:].strip(), []
        elif lang is not None and line.startswith("```"):
            out.append(Block(heading, lang, "\n".join(code) + "\n"))
            lang = None
        elif lang is not None:
            code.append(line)
    assert lang is None, "README.md has an unclosed code block"
    return out


def commands(block: Block) -> list[Command]:
    """The commands of a bash block: continuation lines joined, comments split off."""
    out, pending = [], ""
    for raw in block.code.splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        if not line or line.startswith("#"):
            continue
        cut = comment_start(line)
        match = NEEDS.search(line[cut:])
        out.append(Command(block.heading, line[:cut].strip(), match[1] if match else None))
    assert not pending, f"a command in README.md ends with a backslash: {pending!r}"
    return out


def comment_start(line: str) -> int:
    """Index of the shell comment of `line` (a '#' after whitespace, outside quotes), or len(line)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return i
    return len(line)


def small(argv: list[str]) -> list[str]:
    """An evaluation with --limit 1 and its first budget only."""
    if argv[1:3] != ["-m", "tgvkv.eval"] or "--limit" not in argv:
        return argv
    argv = list(argv)
    argv[argv.index("--limit") + 1] = "1"
    if "--keep" in argv:
        i = argv.index("--keep") + 1
        argv[i] = argv[i].split(",")[0]
    return argv


def parse() -> tuple[list[Block], list[Command]]:
    text = README.read_text(encoding="utf-8")
    bl = blocks(text)
    return bl, [c for b in bl if b.language in ("bash", "sh", "shell") for c in commands(b)]


def test_readme_parsing_rules():
    """The parser itself: continuations, quoted '#', needs markers, evaluation limits."""
    b = Block("x", "bash", 'run --q "is # here ?" \\\n    --k 1  # note (needs: GPU)\n# only a comment\nls\n')
    assert commands(b) == [Command("x", 'run --q "is # here ?" --k 1', "GPU"), Command("x", "ls", None)]
    assert small(["python", "-m", "tgvkv.eval", "--limit", "350", "--keep", "0.05,0.1"]) == [
        "python", "-m", "tgvkv.eval", "--limit", "1", "--keep", "0.05"]


def test_readme_skips_few_commands_for_documented_reasons():
    _, cmds = parse()
    setup = [c.line for c in cmds if c.heading.startswith(SETUP_HEADING)]
    assert setup == SETUP_COMMANDS
    skipped = [c for c in cmds if c.needs]
    assert len(skipped) <= MAX_SKIPPED, [c.line for c in skipped]
    for c in skipped:
        assert {n.strip() for n in c.needs.split(",")} <= ALLOWED_NEEDS, c.line


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repository's tracked files (a fresh clone's working tree) in a temporary folder."""
    dst = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false",
           "MPLBACKEND": "Agg"}
    env.pop("PYTHONPATH", None)  # the copy's own package, as after a clone
    return env


def _run(argv: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, cwd=cwd, env=_env(), input=stdin, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n"
                                 f"{res.stderr[-3000:]}")
    return res


def test_readme_python_block_runs(clone):
    import tgvkv

    python = [b for b in parse()[0] if b.language == "python"]
    assert len(python) == 1
    res = _run([sys.executable, "-"], clone, stdin=python[0].code)
    lines = res.stdout.strip().splitlines()
    full, _, rest = lines[0].partition(" | ")
    assert full and rest, lines
    kept = [int(x) for x in lines[-1].strip("[]").split(",")]
    trace = tgvkv.Trace.load(clone / "run.npz")
    assert kept == trace.budgets.tolist()  # select() on the trace's maps reproduces the engine's budgets
    assert trace.output_text == rest.split(" [")[0].strip() and trace.num_layers == len(kept)


def test_readme_command_lines_run(clone):
    """Every command of the bash blocks, in order, in the copy; the repository's own results stay untouched."""
    from tgvkv.eval.runner import available_methods, draws_of

    ran = []
    for c in parse()[1]:
        if c.heading.startswith(SETUP_HEADING) or c.needs:
            continue
        argv = shlex.split(c.line)
        assert argv[0] == "python", f"README commands start with python: {c.line}"
        argv = small([sys.executable, *argv[1:]])
        res = _run(argv, clone)
        ran.append((argv, res))

    def find(*words: str) -> tuple[list[str], subprocess.CompletedProcess]:
        hits = [(a, r) for a, r in ran if a[1:1 + len(words)] == list(words)]
        assert len(hits) == 1, f"README.md should have one `python {' '.join(words)} ...` command"
        return hits[0]

    run_out = find("-m", "tgvkv", "run")[1].stdout
    assert "full KV   :" in run_out and "evicted KV:" in run_out and "written: out.npz" in run_out
    assert (clone / "out.npz").is_file()
    listed = [line.split()[0] for line in find("-m", "tgvkv", "methods")[1].stdout.splitlines() if line.strip()]
    import tgvkv

    assert listed == sorted(tgvkv.POLICIES)
    find("-m", "analysis.figures")
    assert any(p.suffix == ".png" for p in (clone / "figures").iterdir())

    ev_argv, ev = find("-m", "tgvkv.eval", "--model", "assets/demo-vlm")
    out = clone / ev_argv[ev_argv.index("--out") + 1]
    assert out.resolve() != (clone / "results" / "demo").resolve(), "the README's evaluation overwrites results/demo"
    methods = available_methods()
    seeds = int(ev_argv[ev_argv.index("--seeds") + 1]) if "--seeds" in ev_argv else 1
    n_draws = sum(draws_of(m, seeds) for m in methods)
    draws = f" ({n_draws} method draws: seeded methods x {seeds} seeds)" if n_draws != len(methods) else ""
    assert f"1 examples x ({len(methods)} methods{draws} x 1 budgets x 1 protocols + full KV) = {n_draws + 1} runs " \
        "planned" in ev.stderr
    assert re.search(r"one run took \d+\.\d\d s here: about \d+ (s|min) for the \d+ runs left \(estimate\)", ev.stderr)
    assert (out / "summary.csv").is_file()
    assert "### first question, official protocol" in find("-m", "tgvkv.eval.report")[1].stdout
    for name in ("summary.csv", "summary.json", "rows.jsonl.gz"):  # the committed results are left as they were
        assert (clone / "results" / "demo" / name).read_bytes() == (REPO / "results" / "demo" / name).read_bytes()
