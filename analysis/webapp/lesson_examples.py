"""Lesson examples chosen by rule from the evaluator's rows, never by hand.

    python -m analysis.webapp.lesson_examples --rows results/demo --model assets/demo-vlm

reads ``results/demo/rows.jsonl(.gz)`` (``python -m tgvkv.eval``) and writes ``assets/examples/lesson/`` (the chosen
ids with the reason for each, and the scene images). Re-run it whenever the demo model or the rows change.

The rule (``pick_examples``; official protocol, budgets tried from ``--prefer-keep`` outwards, lowest example index
first, an example is used once):

(a) ``keeps``: the full-KV answer is right, TGV-KV's is right, and every row of the baseline (``random``; one or
    several seeds) is wrong, at the same budget;
(b) ``both-lose``: the full-KV answer is right, TGV-KV's and every baseline row are wrong;
(c) ``followup-lost``: both full-KV answers (first question and follow-up) are right, TGV-KV answers the first
    question right and the follow-up wrong, the two questions' evidence cells are disjoint (the follow-up asks about
    another region), *and* re-running TGV-KV shows its first-question selection kept less than half of the
    follow-up's evidence patches (share of (layer, patch) entries over all layers) and less than of the first
    question's own (the demo task knows each question's target cells, ``tgvkv/demo/scenes.py``).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tgvkv.loading import REPO_ROOT

log = logging.getLogger(__name__)

RULE = __doc__[__doc__.index("The rule"):].strip()  # stored with the chosen ids
LESSON_DIR = REPO_ROOT / "assets" / "examples" / "lesson"
INDEX_NAME = "lesson_examples.json"
KINDS = ("keeps", "both-lose", "followup-lost")
CORRECT = 0.5  # a row's score at or above this counts as a right answer (exact match scores 0 or 1)
MAX_REGION_CHECKS = 60  # model re-runs spent on rule (c) at most


@dataclass(frozen=True)
class RegionKept:
    """Share of (layer, patch) entries kept by the first question's selection, over each question's evidence."""

    first: float
    followup: float
    shared_cells: int = 0  # evidence cells both questions need (0: the follow-up asks about another region)


@dataclass(frozen=True)
class Choice:
    kind: str
    example_id: str
    example_index: int
    keep: float
    question: str
    followup_question: str | None
    reason: str
    predictions: dict[str, str]


@dataclass(frozen=True)
class LessonExample:
    kind: str
    image: str  # path relative to the lesson folder
    question: str
    followup: str
    keep_percent: float
    label: str
    folder: Path = LESSON_DIR

    @property
    def path(self) -> Path:
        return self.folder / self.image


# -- the rule (pure) -----------------------------------------------------------------------------------------------
def _index(rows: Iterable[dict[str, Any]], protocol: str) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("protocol", "official") != protocol:
            continue
        key = (r["example_id"], r["method"], float(r["keep"]), r.get("turn", "first"))
        out.setdefault(key, []).append(r)
    return out


def _right(rows: list[dict[str, Any]] | None) -> bool | None:
    """True: every row right; False: every row wrong; None: missing or mixed (several seeds disagreeing)."""
    if not rows:
        return None
    ok = [float(r["score"]) >= CORRECT for r in rows]
    return True if all(ok) else False if not any(ok) else None


def _keep_order(keeps: Iterable[float], prefer: float) -> list[float]:
    return sorted(set(keeps), key=lambda k: (abs(k - prefer), k))


def pick_examples(rows: Sequence[dict[str, Any]], method: str = "tgv-kv", baseline: str = "random",
                  prefer_keep: float = 0.1, protocol: str = "official",
                  region_kept: Callable[[dict[str, Any], float], RegionKept] | None = None,
                  max_region_checks: int = MAX_REGION_CHECKS) -> dict[str, Choice]:
    """One example per kind (see the module docstring); a kind with no candidate is left out.

    `region_kept(first_row, keep)` re-runs `method` on the example (needed by rule (c) only; None skips (c)).
    """
    idx = _index(rows, protocol)
    examples: dict[str, dict[str, Any]] = {}
    for (eid, m, _, turn), rs in idx.items():
        if m == "full" and turn == "first":
            examples[eid] = rs[0]
    ordered = sorted(examples.values(), key=lambda r: (int(r.get("example_index", 0)), r["example_id"]))
    keeps = _keep_order({k for (_, m, k, _) in idx if m == method}, prefer_keep)
    chosen: dict[str, Choice] = {}
    used: set[str] = set()
    checks = 0

    def get(eid: str, m: str, keep: float, turn: str = "first") -> list[dict[str, Any]] | None:
        return idx.get((eid, m, 1.0 if m == "full" else keep, turn))

    def preds(eid: str, keep: float) -> dict[str, str]:
        out = {}
        for m, turn in (("full", "first"), (method, "first"), (baseline, "first"), ("full", "followup"),
                        (method, "followup")):
            rs = get(eid, m, keep, turn)
            if rs:
                out[f"{m}/{turn}"] = rs[0]["prediction"]
        return out

    def choose(kind: str, row: dict[str, Any], keep: float, reason: str) -> None:
        eid = row["example_id"]
        fu = get(eid, "full", keep, "followup")
        chosen[kind] = Choice(kind, eid, int(row.get("example_index", 0)), keep, row["question"],
                              fu[0]["question"] if fu else None, reason, preds(eid, keep))
        used.add(eid)

    for keep in keeps:
        for row in ordered:
            eid = row["example_id"]
            if eid in used or _right(get(eid, "full", keep)) is not True:
                continue
            mine, base = _right(get(eid, method, keep)), _right(get(eid, baseline, keep))
            n_base = len(get(eid, baseline, keep) or [])
            if "keeps" not in chosen and mine is True and base is False:
                choose("keeps", row, keep, f"at {keep:.0%} of the KV cache the full-KV answer is right, {method}'s is "
                       f"right and {baseline}'s is wrong ({n_base} row{'s' if n_base != 1 else ''})")
            elif "both-lose" not in chosen and mine is False and base is False:
                choose("both-lose", row, keep, f"at {keep:.0%} of the KV cache the full-KV answer is right, and both "
                       f"{method}'s and {baseline}'s are wrong")
    if region_kept is not None:
        for keep in keeps:
            if "followup-lost" in chosen:
                break
            for row in ordered:
                eid = row["example_id"]
                if eid in used or checks >= max_region_checks:
                    continue
                full_ok = _right(get(eid, "full", keep)) and _right(get(eid, "full", keep, "followup"))
                if not (full_ok and _right(get(eid, method, keep)) is True
                        and _right(get(eid, method, keep, "followup")) is False):
                    continue
                checks += 1
                rk = region_kept(row, keep)
                if rk.shared_cells == 0 and rk.followup < 0.5 and rk.followup < rk.first:
                    choose("followup-lost", row, keep,
                           f"at {keep:.0%} of the KV cache both full-KV answers are right and {method} answers the "
                           f"first question right but the follow-up wrong; its first-question selection kept "
                           f"{rk.followup:.0%} of the follow-up's evidence patches over all layers (against "
                           f"{rk.first:.0%} of the first question's)")
                    break
    return chosen


# -- model plumbing for rule (c) ----------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows from a results folder (rows.jsonl or rows.jsonl.gz) or a file."""
    if path.is_dir():
        cands = [path / "rows.jsonl", path / "rows.jsonl.gz"]
        path = next((c for c in cands if c.is_file()), cands[0])
    if not path.is_file():
        raise ValueError(f"no evaluator rows at {path} (run python -m tgvkv.eval first)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def demo_region_checker(model: Any, processor: Any, split: str, n: int, max_new_tokens: int, method: str = "tgv-kv"
                        ) -> Callable[[dict[str, Any], float], RegionKept]:
    """Re-run `method` on a demo-task example and measure how much of each question's evidence its selection kept."""
    from tgvkv.demo import scenes
    from tgvkv.generation import CaptureOptions, RunOptions, generate

    qas = scenes.dataset(split, n)

    def share(trace: Any, cells: Sequence[tuple[int, int]]) -> float:
        from analysis.arrays import view_position_grids

        grid = view_position_grids(trace.layout)[0]  # the demo prompt has one image, one view
        pos = [int(grid[r, c]) for row, col in cells
               for (r0, c0, r1, c1) in [scenes.cell_to_object_patch_box(row, col)]
               for r in range(r0, r1) for c in range(c0, c1)]
        return float(trace.kept_mask[:, pos].mean()) if pos else 1.0

    def check(row: dict[str, Any], keep: float) -> RegionKept:
        qa = qas[int(row["example_index"])]
        res = generate(model, processor, [qa.scene.render()], qa.question, method, keep,
                       options=RunOptions(max_new_tokens=max_new_tokens),
                       capture=CaptureOptions(diagnostics=False, hidden_states=False))
        t = res.trace
        rk = RegionKept(share(t, qa.target_cells), share(t, qa.followup_target_cells),
                        len(set(qa.target_cells) & set(qa.followup_target_cells)))
        log.info("%s at %.0f%%: first-question evidence kept %.0f%%, follow-up evidence %.0f%%, %d shared cells",
                 row["example_id"], keep * 100, rk.first * 100, rk.followup * 100, rk.shared_cells)
        return rk

    return check


def write_examples(chosen: dict[str, Choice], split: str, n: int, out_dir: Path, source: dict[str, Any]) -> Path:
    """Scene images + the index JSON (chosen ids, reasons, where the rows came from)."""
    from tgvkv.demo import scenes

    out_dir.mkdir(parents=True, exist_ok=True)
    qas = scenes.dataset(split, n)
    entries = []
    for kind in KINDS:
        if kind not in chosen:
            log.warning("no example satisfies rule %r", kind)
            continue
        c = chosen[kind]
        image = f"{kind}_{c.example_id}.png"
        qas[c.example_index].scene.render().save(out_dir / image, optimize=True)
        entries.append({**asdict(c), "image": image})
    index = out_dir / INDEX_NAME
    index.write_text(json.dumps({"rule": RULE, "source": source, "examples": entries},
                                indent=2, ensure_ascii=False) + "\n")
    listed = {e["image"] for e in entries}
    for kind in KINDS:  # images of an earlier pick that this one replaced (nothing else in the folder is touched)
        for old in out_dir.glob(f"{kind}_*.png"):
            if old.name not in listed:
                old.unlink()
    return index


LABELS = {"keeps": "(a) TGV-KV keeps it, random loses it", "both-lose": "(b) TGV-KV and random both lose it",
          "followup-lost": "(c) the follow-up lost its region"}  # short: Gradio cuts long example labels


def load_lesson_examples(folder: Path = LESSON_DIR) -> list[LessonExample]:
    """The chosen examples whose image is present (an empty list, with a log line, when none were generated)."""
    index = folder / INDEX_NAME
    if not index.is_file():
        log.warning("no lesson examples at %s (python -m analysis.webapp.lesson_examples)", index)
        return []
    out = []
    for e in json.loads(index.read_text())["examples"]:
        if not (folder / e["image"]).is_file():
            log.warning("lesson example image %s is missing", e["image"])
            continue
        out.append(LessonExample(e["kind"], e["image"], e["question"], e.get("followup_question") or "",
                                 round(float(e["keep"]) * 100), f"{LABELS.get(e['kind'], e['kind'])} · "
                                 f"{float(e['keep']):.0%}", folder))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.webapp.lesson_examples", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=Path, default=REPO_ROOT / "results" / "demo", help="evaluator folder or rows file")
    p.add_argument("--model", default="assets/demo-vlm", help="the model the rows were computed with")
    p.add_argument("--out", type=Path, default=LESSON_DIR)
    p.add_argument("--method", default="tgv-kv")
    p.add_argument("--baseline", default="random")
    p.add_argument("--prefer-keep", type=float, default=0.1, help="budget tried first (the app's default, 10%%)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = read_rows(args.rows)
    run_json = (args.rows if args.rows.is_dir() else args.rows.parent) / "run.json"
    run = json.loads(run_json.read_text()) if run_json.is_file() else {}
    task = run.get("task", {"task": "demo", "split": "test"})
    if task.get("task") != "demo":
        raise SystemExit(f"lesson examples need the demo task's rows (target cells); {args.rows} holds {task}")
    split = task.get("split", "test")
    n = 1 + max(int(r.get("example_index", 0)) for r in rows)
    from tgvkv.loading import load_model

    model, processor = load_model(args.model)
    checker = demo_region_checker(model, processor, split, n, int(run.get("max_new_tokens", 48)), args.method)
    chosen = pick_examples(rows, args.method, args.baseline, args.prefer_keep, region_kept=checker)
    rows_file = args.rows if args.rows.is_file() else next(f for f in (args.rows / "rows.jsonl",
                                                                       args.rows / "rows.jsonl.gz") if f.is_file())
    source = {"rows": rows_file.as_posix(), "rows_sha256": hashlib.sha256(rows_file.read_bytes()).hexdigest(),
              "model": args.model, "model_fingerprint": run.get("model_fingerprint"), "split": split,
              "method": args.method, "baseline": args.baseline, "prefer_keep": args.prefer_keep,
              "command": "python -m analysis.webapp.lesson_examples --rows " + args.rows.as_posix()
                         + f" --model {args.model}"}
    index = write_examples(chosen, split, n, args.out, source)
    for kind in KINDS:
        c = chosen.get(kind)
        log.info("%-14s %s", kind, f"{c.example_id}: {c.reason}" if c else "none")
    log.info("wrote %s", index)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
