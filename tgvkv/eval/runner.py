"""Run methods x budgets x protocols on a task; per-example rows on disk, summaries derived from the rows.

Files in the output folder:
- ``rows.rank{r}.jsonl``: rows appended by process r while running (one JSON object per line, flushed and fsynced
  after every unit of work). A unit is one `generate` call = (example, method, keep, protocol): a row for the
  first turn and, when the example has one, a row for the follow-up turn, written together.
- ``rows.jsonl``: every row, merged, de-duplicated and sorted (example index, method, keep, protocol, turn); the
  per-rank files are folded into it at the end of a run.
- ``summary.csv`` / ``summary.json``, ``accuracy_vs_budget.png`` / ``.html``: pure functions of the rows (and
  of the requested methods/budgets/examples), rewritten at the end of every run.
- ``run.json``: what the rows depend on (model, task, generation settings); a later run with a different one is
  refused, so rows of different configurations never mix.

Seeded methods (`random`): the policy seed of an example is derived from the run seed and the example id
(:func:`example_seed`), so every example gets its own draw and a run reproduces. ``seeds = N`` evaluates N draws
(run seeds ``seed .. seed+N-1``); their rows carry ``draw`` 0..N-1, the summary averages the draws and reports their
spread (``draws``, ``accuracy_sd``, ``accuracy_min``, ``accuracy_max``). Deterministic methods have one draw.

Resume: rows already on disk (any rank file or rows.jsonl) are not recomputed; a torn last line (a process killed
mid-write) is dropped. The full-KV answer of an example does not depend on the method: it is computed once per
example (method "full", keep 1.0, protocol "official") and is the reference of every method and protocol.

Data parallel (``accelerate launch -m tgvkv.eval ...``): process r takes examples[r::world]; the main process then
waits until every expected row is on disk (polling the files, so no collective with a timeout is involved when
the shares take different times), merges and summarises.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..policies import method_sort_key
from .metrics import score
from .tasks import DEMO_TASKS, Example, Task, load_task

ROWS = "rows.jsonl"
RUN_FILE = "run.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
PLOT_STEM = "accuracy_vs_budget"
FULL = "full"
REFERENCE = (FULL, 1.0, "official")  # (method, keep, protocol) of the full-KV reference unit
TURNS = ("first", "followup")
TIMING_FIELDS = ("prefill_s", "select_s", "decode_s", "followup_s", "tokens_per_s")  # vary run to run
SUMMARY_COLUMNS = (
    "method", "keep", "protocol", "turn", "qtype", "n", "accuracy", "ci95", "draws", "accuracy_sd", "accuracy_min",
    "accuracy_max", "full_accuracy", "relative_to_full",
    "agree_full", "kv_bytes_kept", "kv_bytes_full", "kv_fraction", "new_tokens", "tokens_per_s", "prefill_s",
    "decode_s",
)
TIMING_COLUMNS = ("tokens_per_s", "prefill_s", "decode_s")
POLICY_SEEDS = "per-example"  # seeded methods: example_seed(run seed + draw, example id)


@dataclass
class EvalConfig:
    model: str
    out: str
    task: str = "demo"
    methods: Sequence[str] = ("all",)
    keeps: Sequence[float] = (0.05, 0.1, 0.2, 0.5)
    protocols: Sequence[str] = ("official",)
    followup: bool = True
    limit: int | None = None
    split: str = "test"
    metric: str = "auto"
    max_new_tokens: int = 48
    seed: int = 0
    seeds: int = 1  # draws of seeded methods (random), run seeds seed .. seed + seeds - 1
    device: str | None = None
    dtype: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    threads: int | None = None
    progress: bool = True
    plotly_js: str = "cdn"
    poll_s: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be an integer >= 1 (draws of seeded methods such as random), "
                             f"got {self.seeds!r}")

    def identity(self) -> dict[str, Any]:
        """What the rows depend on (besides the method/keep/protocol/example/draw of each row). `seeds` is not part
        of it: more draws extend a folder. policy_seeds names how seeded methods get their seed (rows written before
        per-example seeds, when every example shared one seed, are refused)."""
        return {"max_new_tokens": self.max_new_tokens, "seed": self.seed, "dtype": self.dtype,
                "followup": self.followup, "policy_seeds": POLICY_SEEDS}


# -- methods ---------------------------------------------------------------------------------------------------
def available_methods() -> list[str]:
    """Registered eviction methods, read from the registry at run time: every policy except `full` (the reference,
    always computed) and generic skeletons whose named variants are registered too (``Policy.generic``, e.g.
    `tgv-ablation`)."""
    from ..policies import POLICIES

    # (a subclass test would also drop real baselines that others subclass, e.g. snapkv under pyramidkv)
    # `generic` counts only where a class declares it itself: the named ablation rows subclass the skeleton
    out = [name for name, cls in POLICIES.items() if name != FULL and not vars(cls).get("generic", False)]
    return sorted(out, key=method_sort_key)


def resolve_methods(methods: Iterable[str]) -> list[str]:
    from ..policies import POLICIES

    out: list[str] = []
    for m in methods:
        m = m.strip()
        if not m:
            continue
        names = available_methods() if m == "all" else [m]
        for n in names:
            if n not in POLICIES:
                raise ValueError(f"unknown method {n!r}; choose from: all, {', '.join(sorted(POLICIES))}")
            if n != FULL and n not in out:
                out.append(n)
    return out


def resolve_keeps(keeps: Iterable[float]) -> list[float]:
    from ..policies import check_keep_ratio

    out = []
    for k in keeps:
        k = float(check_keep_ratio(float(k)))
        if k not in out:
            out.append(k)
    return sorted(out)


# -- rows on disk --------------------------------------------------------------------------------------------------
def keep_str(keep: float) -> str:
    return f"{float(keep):.6g}"


def row_key(row: dict) -> tuple:
    return (row["example_id"], row["method"], keep_str(row["keep"]), row["protocol"], row["turn"], row.get("draw", 0))


def row_sort_key(row: dict) -> tuple:
    return (row["example_index"], row["example_id"], row["method"], float(row["keep"]), row["protocol"],
            row.get("draw", 0), TURNS.index(row["turn"]))


def read_rows(path: Path) -> list[dict]:
    """Complete rows of a JSONL file; a torn last line (no newline, or not JSON) is ignored."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if path.suffix == ".gz":
        import gzip

        data = gzip.decompress(data)
    rows = []
    for line in data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")[:-1]:
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def rank_files(out: Path) -> list[Path]:
    return sorted(out.glob("rows.rank*.jsonl"))


def row_files(out: Path) -> list[Path]:
    """Where rows may lie, in the order they are read: the merged file, its gzip copy, then the rank files."""
    return [out / ROWS, out / (ROWS + ".gz"), *rank_files(out)]


def load_all_rows(out: Path) -> dict[tuple, dict]:
    """Every complete row in the folder (:func:`row_files` order); the first copy of a key wins."""
    rows: dict[tuple, dict] = {}
    for path in row_files(out):
        for r in read_rows(path):
            rows.setdefault(row_key(r), r)
    return rows


def _repair_tail(path: Path) -> None:
    """Cut a torn last line so that appending starts on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dumps_row(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=False, allow_nan=True)


def merge_rows(out: Path) -> list[dict]:
    """Fold the rank files into rows.jsonl (sorted, de-duplicated; atomic replace), then delete them."""
    rows = sorted(load_all_rows(out).values(), key=row_sort_key)
    _atomic_write(out / ROWS, "".join(dumps_row(r) + "\n" for r in rows))
    for p in rank_files(out):
        p.unlink()
    return rows


# -- identity of a run -----------------------------------------------------------------------------------------------
def model_fingerprint(model: str) -> str:
    """Cheap identity of a local model folder (config + size and ends of each weight file); the id for hub models."""
    p = Path(model)
    if not p.is_dir():
        return f"id:{model}"
    h = hashlib.sha256()
    for name in ("config.json", "generation_config.json"):
        if (p / name).is_file():
            h.update(name.encode() + (p / name).read_bytes())
    for w in sorted([*p.glob("*.safetensors"), *p.glob("*.bin")]):
        size = w.stat().st_size
        h.update(f"{w.name}:{size}".encode())
        with open(w, "rb") as f:
            h.update(f.read(1 << 22))
            if size > 1 << 22:
                f.seek(max(0, size - (1 << 22)))
                h.update(f.read())
    return "sha256:" + h.hexdigest()[:32]


def run_identity(cfg: EvalConfig, task: Task) -> dict[str, Any]:
    """The model enters by its weights' fingerprint (a local folder may move; the same weights give the same rows)."""
    info = {k: v for k, v in task.info.items() if k != "n"}
    return {**cfg.identity(), "model_fingerprint": model_fingerprint(cfg.model), "task": info}


def check_identity(out: Path, ident: dict[str, Any], write: bool) -> None:
    path = out / RUN_FILE
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {ident.get(k)!r}" for k in diff)
            raise ValueError(f"{out} holds results of another configuration ({details}); use another --out, "
                             "or --overwrite to discard them")
    elif any(p.exists() for p in row_files(out)):
        raise ValueError(f"{out} holds result rows but no {RUN_FILE}, so they cannot be matched to this configuration; "
                         "use another --out, or --overwrite to discard them")
    elif write:
        _atomic_write(path, json.dumps(ident, indent=1) + "\n")


def clear_results(out: Path) -> None:
    for p in [*row_files(out), out / RUN_FILE, out / SUMMARY_CSV, out / SUMMARY_JSON, out / f"{PLOT_STEM}.png",
              out / f"{PLOT_STEM}.html"]:
        if p.exists():
            p.unlink()


# -- computing rows ------------------------------------------------------------------------------------------------
def is_seeded(method: str) -> bool:
    """Whether a method draws random numbers (has a `seed` option): it is evaluated once per draw."""
    from ..policies import POLICIES

    return method != FULL and "seed" in {f.name for f in dataclasses.fields(POLICIES[method])}


def draws_of(method: str, seeds: int) -> int:
    return seeds if is_seeded(method) else 1


def example_seed(run_seed: int, example_id: str) -> int:
    """Policy seed for one example: the first 4 bytes of sha256("run_seed:example_id"), in [0, 2**32).

    Examples get independent draws (one shared seed made `random` keep the same positions for every prompt of a
    length), and the same run seed and example always give the same draw."""
    digest = hashlib.sha256(f"{int(run_seed)}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def units_for(examples: Sequence[Example], methods: Sequence[str], keeps: Sequence[float], protocols: Sequence[str],
              seeds: int = 1):
    """Units of work in their deterministic order: per example, the full-KV reference, then method x keep x protocol
    x draw (draw 0 only for deterministic methods)."""
    for ex in examples:
        yield ex, *REFERENCE, 0
        for m in methods:
            for k in keeps:
                for p in protocols:
                    for d in range(draws_of(m, seeds)):
                        yield ex, m, k, p, d


def unit_turns(ex: Example, followup: bool) -> tuple[str, ...]:
    return TURNS if followup and ex.followup_question else TURNS[:1]


def unit_keys(ex: Example, method: str, keep: float, protocol: str, draw: int, followup: bool) -> list[tuple]:
    return [(ex.id, method, keep_str(keep), protocol, t, draw) for t in unit_turns(ex, followup)]


def policy_options(method: str, run_seed: int, example_id: str, draw: int = 0) -> dict[str, Any]:
    """A seeded method's seed for this example and draw (empty for deterministic methods)."""
    return {"seed": example_seed(run_seed + draw, example_id)} if is_seeded(method) else {}


def compute_unit(model, processor, task: Task, ex: Example, method: str, keep: float, protocol: str,
                 cfg: EvalConfig, draw: int = 0) -> list[dict]:
    from ..generation import CaptureOptions, RunOptions, generate

    follow = ex.followup_question if (cfg.followup and ex.followup_question) else None
    opts = RunOptions(max_new_tokens=cfg.max_new_tokens, protocol=protocol, seed=cfg.seed, followup=follow)
    pol_opts = policy_options(method, cfg.seed, ex.id, draw)
    res = generate(
        model, processor, ex.load_images(), ex.question, None if method == FULL else method, keep, options=opts,
        capture=CaptureOptions(diagnostics=False, hidden_states=False), policy_options=pol_opts, model_name=cfg.model,
    )
    tr = res.trace
    t = tr.timings
    kv_kept, kv_full = int(tr.kv_bytes_kept.sum()), int(tr.kv_bytes_full.sum())
    base = {
        "example_id": ex.id, "example_index": ex.index, "method": method, "keep": float(keep), "protocol": protocol,
        "kv_bytes_kept": kv_kept, "kv_bytes_full": kv_full, "kv_fraction": kv_kept / kv_full if kv_full else 1.0,
        "prompt_tokens": int(tr.seq_len),
    }
    if is_seeded(method):
        base.update(draw=draw, policy_seed=pol_opts["seed"])
    first = {
        **base, "turn": "first", "qtype": ex.qtype, "question": ex.question, "prediction": res.text,
        "references": list(ex.answers), "metric": ex.metric,
        "score": score(ex.metric, res.text, ex.answers, task.normalise),
        "new_tokens": int(t.get("new_tokens", len(res.token_ids))),
        "prefill_s": t["prefill_s"], "select_s": t["select_s"], "decode_s": t["decode_s"], "followup_s": 0.0,
        "tokens_per_s": t["tokens_per_s"],
    }
    rows = [first]
    if follow:
        n_f = len(tr.followup_ids) if tr.followup_ids is not None else 0
        fs = t.get("followup_s", 0.0)
        pred = res.followup_text or ""
        rows.append({
            **base, "turn": "followup", "qtype": ex.followup_qtype, "question": follow, "prediction": pred,
            "references": list(ex.followup_answers), "metric": ex.metric,
            "score": score(ex.metric, pred, ex.followup_answers, task.normalise),
            "new_tokens": n_f, "prefill_s": 0.0, "select_s": 0.0, "decode_s": 0.0, "followup_s": fs,
            "tokens_per_s": n_f / fs if fs > 0 else 0.0,
        })
    return rows


# -- summary -------------------------------------------------------------------------------------------------------
def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _sd(xs: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); NaN for fewer than two values."""
    if len(xs) < 2:
        return float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _by(rows: Iterable[dict], key) -> dict[Any, list[dict]]:
    out: dict[Any, list[dict]] = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def _ci95(xs: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return 1.96 * math.sqrt(var / n)


def summarise(rows: Iterable[dict], methods: Sequence[str], keeps: Sequence[float], protocols: Sequence[str],
              example_ids: Iterable[str] | None = None) -> list[dict]:
    """Tidy table: one line per (method, keep, protocol, turn, qtype); qtype "all" pools every question type.

    Only rows of the requested methods/keeps/protocols/examples count; the full-KV reference appears as method
    "full", keep 1.0 under every protocol. relative_to_full = accuracy / full-KV accuracy on the same examples;
    agree_full = fraction of examples whose answer equals the full-KV answer (after stripping).
    Seeded methods evaluated with several draws: n counts examples, accuracy is the mean over every draw (each draw
    covers the same examples), accuracy_sd / _min / _max describe the spread of the per-draw accuracies, and ci95
    is computed on the per-example means over the draws.
    """
    ids = set(example_ids) if example_ids is not None else None
    rows = [r for r in rows if ids is None or r["example_id"] in ids]
    full = {(r["example_id"], r["turn"]): r for r in rows if (r["method"], keep_str(r["keep"]), r["protocol"]) ==
            (FULL, keep_str(1.0), "official")}
    wanted = {(m, keep_str(k), p) for m in methods for k in keeps for p in protocols}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if (r["method"], keep_str(r["keep"]), r["protocol"]) in wanted:
            groups.setdefault((r["method"], float(r["keep"]), r["protocol"]), []).append(r)
    for p in protocols:
        groups[(FULL, 1.0, p)] = [r for r in full.values()]
    table = []
    order = sorted(groups, key=lambda g: (g[0] != FULL, method_sort_key(g[0]), g[1], list(protocols).index(g[2])))
    for method, keep, protocol in order:
        g = groups[(method, keep, protocol)]
        for turn in TURNS:
            trows = [r for r in g if r["turn"] == turn]
            if not trows:
                continue
            qtypes = ["all"] + sorted({r["qtype"] for r in trows if r["qtype"]})
            for q in qtypes:
                sel = sorted((r for r in trows if q == "all" or r["qtype"] == q), key=row_sort_key)
                ref = [full[(r["example_id"], turn)] for r in sel if (r["example_id"], turn) in full]
                acc = _mean([r["score"] for r in sel])
                facc = _mean([r["score"] for r in ref]) if len(ref) == len(sel) else float("nan")
                agree = [r["prediction"].strip() == full[(r["example_id"], turn)]["prediction"].strip()
                         for r in sel if (r["example_id"], turn) in full]
                per_draw = _by(sel, lambda r: r.get("draw", 0))
                draw_acc = [_mean([r["score"] for r in per_draw[d]]) for d in sorted(per_draw)]
                per_example = _by(sel, lambda r: r["example_id"])
                example_means = [_mean([r["score"] for r in rs]) for rs in per_example.values()]
                table.append({
                    "method": method, "keep": keep, "protocol": protocol, "turn": turn, "qtype": q,
                    "n": len(per_example), "accuracy": acc, "ci95": _ci95(example_means), "draws": len(draw_acc),
                    "accuracy_sd": _sd(draw_acc), "accuracy_min": min(draw_acc), "accuracy_max": max(draw_acc),
                    "full_accuracy": facc,
                    "relative_to_full": acc / facc if facc and facc == facc else float("nan"),
                    "agree_full": _mean([float(a) for a in agree]) if len(agree) == len(sel) else float("nan"),
                    "kv_bytes_kept": _mean([r["kv_bytes_kept"] for r in sel]),
                    "kv_bytes_full": _mean([r["kv_bytes_full"] for r in sel]),
                    "kv_fraction": _mean([r["kv_fraction"] for r in sel]),
                    "new_tokens": _mean([r["new_tokens"] for r in sel]),
                    "tokens_per_s": _mean([r["tokens_per_s"] for r in sel]),
                    "prefill_s": _mean([r["prefill_s"] for r in sel]),
                    "decode_s": _mean([r["decode_s"] + r["followup_s"] for r in sel]),
                })
    return table


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return ""
        return f"{v:.6g}"
    return str(v)


def write_summary(out: Path, table: list[dict], meta: dict[str, Any]) -> None:
    lines = [",".join(SUMMARY_COLUMNS)] + [",".join(_fmt(r[c]) for c in SUMMARY_COLUMNS) for r in table]
    _atomic_write(out / SUMMARY_CSV, "\n".join(lines) + "\n")
    clean = [{c: (None if isinstance(r[c], float) and r[c] != r[c] else (round(r[c], 6) if isinstance(r[c], float) else r[c]))
              for c in SUMMARY_COLUMNS} for r in table]
    _atomic_write(out / SUMMARY_JSON, json.dumps({**meta, "columns": list(SUMMARY_COLUMNS), "table": clean}, indent=1) + "\n")


def read_summary_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- driver ----------------------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"[tgvkv.eval] {msg}", file=sys.stderr, flush=True)


def _state(device: str | None = None):
    """(rank, world, device) from accelerate when launched by it; (0, 1, None) otherwise.

    Without a GPU (or with --device cpu) the processes form a CPU group (gloo): accelerate only does so when asked
    for the CPU, and `accelerate launch --cpu` starts a single process, so `accelerate launch --multi_gpu
    --num_processes N` on a machine without GPUs gives N CPU processes."""
    import torch

    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover
        return 0, 1, None
    cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    st = PartialState(cpu=cpu)
    return st.process_index, st.num_processes, st.device


def run(cfg: EvalConfig, summary_only: bool = False, overwrite: bool = False) -> list[dict]:
    """Evaluate (resuming from rows on disk) and write the summaries; returns the summary table (main process) or
    [] (other processes)."""
    import torch

    from ..loading import LoadOptions, load_model

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    methods, keeps = resolve_methods(cfg.methods), resolve_keeps(cfg.keeps)
    protocols = [p for p in dict.fromkeys(cfg.protocols)]
    bad = [p for p in protocols if p not in ("official", "strict")]
    if bad or not protocols:
        raise ValueError(f"protocols must be official and/or strict, got {list(cfg.protocols)}")
    task = load_task(cfg.task, cfg.limit, cfg.split, cfg.metric)
    rank, world, device = _state(cfg.device) if not summary_only else (0, 1, None)
    main = rank == 0
    if world > 1 and cfg.device_map:
        raise ValueError("--device-map spreads one model over all GPUs of one process; it cannot be combined with "
                         "data parallelism (accelerate launch with several processes)")
    if overwrite and main and not summary_only:
        clear_results(out)
    ident = run_identity(cfg, task)
    check_identity(out, ident, write=main and not summary_only)
    if world > 1:  # the others read the folder only after the main process has cleared / checked it
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        check_identity(out, ident, write=False)

    examples = task.examples
    mine = examples[rank::world]
    done = set(load_all_rows(out))
    units = list(units_for(mine, methods, keeps, protocols, cfg.seeds))
    todo = [u for u in units if not all(k in done for k in unit_keys(*u, cfg.followup))]
    n_draws = sum(draws_of(m, cfg.seeds) for m in methods)
    n_units = len(examples) * (1 + n_draws * len(keeps) * len(protocols))
    if main:
        draws = f" ({n_draws} method draws: seeded methods x {cfg.seeds} seeds)" if n_draws != len(methods) else ""
        _log(f"{len(examples)} examples x ({len(methods)} methods{draws} x {len(keeps)} budgets x {len(protocols)} "
             f"protocols + full KV) = {n_units:,} runs planned; {world} process(es)")
    if todo and not summary_only:
        _log(f"rank {rank}: {len(todo)} runs to do ({len(units) - len(todo)} already on disk)")
        dev = cfg.device if cfg.device else (str(device) if device is not None and not cfg.device_map else None)
        model, processor = load_model(cfg.model, LoadOptions(device=dev, dtype=cfg.dtype, device_map=cfg.device_map,
                                                             trust_remote_code=cfg.trust_remote_code))
        path = out / f"rows.rank{rank}.jsonl"
        _repair_tail(path)
        bar = _progress(len(todo), cfg.progress, rank, world)
        timed = min(1, len(todo) - 1)  # the second run: the first one also pays for warm-up (kernels, caches)
        with open(path, "a", encoding="utf-8") as f:
            for i, (ex, method, keep, protocol, draw) in enumerate(todo):
                t0 = time.perf_counter()
                rows = compute_unit(model, processor, task, ex, method, keep, protocol, cfg, draw)
                f.write("".join(dumps_row(r) + "\n" for r in rows))
                f.flush()
                os.fsync(f.fileno())
                if i == timed and len(todo) > 2:
                    estimate = estimate_message(time.perf_counter() - t0, len(todo) - i - 1)
                    bar.write(f"[tgvkv.eval] rank {rank}: {estimate}", file=sys.stderr)
                bar.update(1)
        bar.close()
    if not main:
        return []
    expected = {k for u in units_for(examples, methods, keeps, protocols, cfg.seeds)
                for k in unit_keys(*u, cfg.followup)}
    if not summary_only:
        _wait_for_rows(out, expected, cfg.poll_s)
        rows = merge_rows(out)
    else:
        rows = list(load_all_rows(out).values())
    missing = expected - {row_key(r) for r in rows}
    if missing:
        _log(f"warning: {len(missing)} expected rows are missing; the summary covers what is on disk")
    wanted = {(e.id, m, d) for e in examples for m in methods for d in range(draws_of(m, cfg.seeds))}
    rows_now = [r for r in rows if r["method"] == FULL or (r["example_id"], r["method"], r.get("draw", 0)) in wanted]
    table = summarise(rows_now, methods, keeps, protocols, [e.id for e in examples])
    meta = {
        "model": cfg.model, "task": cfg.task, "task_info": task.info, "methods": methods, "keeps": keeps,
        "protocols": protocols, "followup": cfg.followup, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
        "seeds": cfg.seeds, "policy_seeds": POLICY_SEEDS,
        "n_examples": len(examples), "model_fingerprint": ident["model_fingerprint"],
    }
    write_summary(out, table, meta)
    from .plot import plot_accuracy

    plot_accuracy(table, out / f"{PLOT_STEM}.png", out / f"{PLOT_STEM}.html", title=_title(cfg, len(examples)),
                  plotly_js=cfg.plotly_js)
    _log(f"wrote {out / SUMMARY_CSV}, {out / SUMMARY_JSON}, {out / PLOT_STEM}.png/.html ({len(rows)} rows)")
    return table


def format_duration(seconds: float) -> str:
    """'40 s', '12 min', '3 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def estimate_message(seconds_per_run: float, runs_left: int) -> str:
    """The time estimate printed once the second run is done (measured, not a constant)."""
    return (f"one run took {seconds_per_run:.2f} s here: about {format_duration(seconds_per_run * runs_left)} "
            f"for the {runs_left:,} runs left (estimate)")


def _title(cfg: EvalConfig, n: int) -> str:
    name = Path(cfg.model).name if Path(cfg.model).exists() else cfg.model
    return f"{name} on {cfg.task if cfg.task in DEMO_TASKS else Path(cfg.task).name} (n={n})"


def _wait_for_rows(out: Path, expected: set[tuple], poll_s: float) -> None:
    """Block until every expected row is on disk (other processes still working on their share)."""
    t0, said = time.time(), False
    while True:
        have = set(load_all_rows(out))
        left = len(expected - have)
        if not left:
            return
        if not said or time.time() - t0 > 60:
            _log(f"waiting for {left} rows from the other processes")
            said, t0 = True, time.time()
        time.sleep(poll_s)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def write(self, line: str, file: Any = None) -> None:
        print(line, file=file or sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, rank: int, world: int):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"eval rank {rank}" if world > 1 else "eval", unit="run", position=rank,
                dynamic_ncols=True, mininterval=1.0, file=sys.stderr)


__all__ = ["EvalConfig", "run", "summarise", "available_methods", "resolve_methods", "load_all_rows", "read_rows",
           "merge_rows", "TIMING_FIELDS", "TIMING_COLUMNS", "SUMMARY_COLUMNS"]
