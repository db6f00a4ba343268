"""Evaluate KV-eviction methods x budgets on a task and plot accuracy against the KV budget.

    python -m tgvkv.eval --model assets/demo-vlm --methods all --keep 0.05,0.1,0.2,0.5 --task demo --limit 350 --out results/demo
    python -m tgvkv.eval --model llava-hf/llava-1.5-7b-hf --task my_vizwiz/ --methods tgv-kv,snapkv,h2o --out results/vizwiz
    accelerate launch --num_processes 2 -m tgvkv.eval --model ... --out ...     # data parallel (one process per GPU)

Output (--out): rows.jsonl (one row per example x method x budget x protocol x turn), summary.csv / summary.json
(method, keep, protocol, turn, qtype, n, accuracy, relative_to_full, KV bytes, tokens/s, ...), accuracy_vs_budget.png
and .html. Interrupted runs resume where they stopped (run the same command again).
"""
from __future__ import annotations

import argparse
import os
import sys


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from e


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tgvkv.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local model folder or hub id (AutoModelForImageTextToText)")
    ap.add_argument("--task", default="demo", help="'demo' / 'demo-short' (bundled model's scene task, sentence / short answers) or a folder / .jsonl file "
                    "with image questions (see tgvkv/eval/tasks.py for the format)")
    ap.add_argument("--split", default="test", choices=["train", "val", "test", "fresh"], help="demo task split")
    ap.add_argument("--methods", type=_names, default=["all"], help="comma-separated methods, or 'all' "
                    "(every registered method; full KV is always computed as the reference)")
    ap.add_argument("--keep", type=_floats, default=[0.05, 0.1, 0.2, 0.5], help="KV budgets (fraction kept)")
    ap.add_argument("--protocols", type=_names, default=["official"], help="official and/or strict")
    ap.add_argument("--no-followup", dest="followup", action="store_false", help="skip the follow-up questions")
    ap.add_argument("--limit", type=int, default=None, help="number of examples (demo default 350 = 50 per type; "
                    "the demo task's question types rotate, so any multiple of 7 is balanced)")
    ap.add_argument("--metric", default="auto", choices=["auto", "exact", "vqa", "vqa10", "anls"],
                    help="folder task default metric (a line's 'metric' wins); auto: vqa with >= 3 answers, else exact")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0, help="run seed; a seeded method (random) gets a seed per example "
                    "derived from it and the example id")
    ap.add_argument("--seeds", type=int, default=1, help="draws of seeded methods (random): run seeds seed .. "
                    "seed+N-1; the summary reports their mean and spread (sd, min, max)")
    ap.add_argument("--out", default="results", help="output folder")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the process's accelerate device)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: float32 on CPU, bfloat16/float16 on CUDA")
    ap.add_argument("--device-map", default=None, help="'auto': spread a model larger than one GPU over all GPUs "
                    "(one process; do not combine with accelerate data parallelism)")
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--plotly-js", default="cdn", choices=["cdn", "inline"],
                    help="HTML plot: load plotly.js from the CDN (small file) or inline it (works offline, ~4 MB)")
    ap.add_argument("--summary-only", action="store_true", help="only rebuild summary and plots from the rows on disk")
    ap.add_argument("--overwrite", action="store_true", help="discard results already in --out")
    ap.add_argument("--list-methods", action="store_true", help="print the methods 'all' stands for and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .runner import EvalConfig, available_methods, run

    if args.list_methods:
        print("\n".join(available_methods()))
        return 0
    if not args.model:
        print("error: --model is required", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print(f"error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    cfg = EvalConfig(
        model=args.model, out=args.out, task=args.task, methods=args.methods, keeps=args.keep,
        protocols=args.protocols, followup=args.followup, limit=args.limit, split=args.split, metric=args.metric,
        max_new_tokens=args.max_new_tokens, seed=args.seed, seeds=args.seeds, device=args.device, dtype=args.dtype,
        device_map=args.device_map, trust_remote_code=args.trust_remote_code, threads=args.threads,
        progress=args.progress, plotly_js=args.plotly_js,
    )
    try:
        run(cfg, summary_only=args.summary_only, overwrite=args.overwrite)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Tear down the process group that accelerate created (data-parallel runs), avoiding torch's exit warning."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
