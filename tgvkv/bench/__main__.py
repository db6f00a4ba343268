"""python -m tgvkv.bench {prefill,decode,e2e,bound,plot,all,gpu} [options]: CSV + JSON (+ PNG) under --out.

    python -m tgvkv.bench prefill --lengths 1024 2048 4096 8192      # capture overhead vs SDPA vs eager
    python -m tgvkv.bench decode --model synth --batches 1 4 16      # tokens/s, KV bytes, bandwidth bound
    python -m tgvkv.bench e2e --model demo                           # time to answer, full vs evicted
    python -m tgvkv.bench bound                                      # the bound for the issue's LLaVA-1.5-7B example
    python -m tgvkv.bench train --threads 2                          # demo VLM training: fp32 vs bf16 steps/min
    python -m tgvkv.bench report                                     # tables + target checks from the files
    python -m tgvkv.bench all                                        # the CPU suite + plot + report (results/bench)
    python -m tgvkv.bench gpu                                        # 7B-shaped LLaVA-NeXT fp16 on CUDA
Thread count: torch's default (set OMP_NUM_THREADS); it is recorded in every result file.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import os
import platform
import sys
from pathlib import Path

import torch

from . import bound, prefill
from .prefill import LMShape

log = logging.getLogger("tgvkv.bench")
METHODS = ["tgv-kv", "snapkv", "pyramidkv", "h2o", "streamingllm"]
KEEPS = [0.05, 0.1, 0.2, 0.5]


def _meta(**kw) -> dict:
    import transformers

    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, **kw)


def write(out: Path, name: str, rows: list[dict], **meta) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps({"meta": _meta(**meta), "rows": rows}, indent=1, default=float))
    log.info("wrote %s/%s.{csv,json}", out, name)


def _load(out: Path, name: str) -> list[dict]:
    p = out / f"{name}.json"
    return json.loads(p.read_text())["rows"] if p.exists() else []


def _model(args, device="cpu", dtype=torch.float32):
    from . import models

    if args.model == "demo":
        return (*models.demo_model(dtype, device), (96, 96))
    if args.model == "synth":
        spec = models.SynthSpec(lm=LMShape(hidden=args.hidden, layers=args.layers, heads=args.heads,
                                           kv_heads=args.kv_heads, intermediate=args.intermediate), grid=args.grid)
        m, p, n = models.synth_llava(spec, dtype, device)
        return m, p, n, (spec.grid * spec.patch,) * 2
    if args.model == "llava-next-7b":
        m, p, n = models.llava_next_7b(dtype, device, layers=args.layers7b, vision_layers=args.vision_layers7b,
                                       tiny=getattr(args, "tiny", False))
        return m, p, n, (672, 672)
    raise SystemExit(f"unknown model {args.model}")


# -- subcommands -------------------------------------------------------------------------------------------------
def cmd_prefill(args) -> None:
    shape = LMShape(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                    intermediate=args.intermediate)
    rows = prefill.run(tuple(args.lengths), shape, args.reps, args.diagnostics, args.eager_max_gib, args.device,
                       getattr(torch, args.dtype), log=log.info)
    write(Path(args.out), args.name or "prefill", rows, what=prefill.__doc__, shape=vars(shape))


def cmd_decode(args) -> None:
    from . import decode

    dtype = getattr(torch, args.dtype)
    model, proc, name, size = _model(args, args.device, dtype)
    limit = args.mem_limit_gib * 2**30 if args.mem_limit_gib else None
    rows = []
    if not args.no_engine:
        rows += decode.run_engine(model, proc, name, args.methods, args.keeps, size, args.new_tokens, args.reps, log.info)
    rows += decode.run_batched(model, proc, name, args.batch_methods, args.batch_keeps, args.batches, size,
                               args.new_tokens, limit, log.info)
    write(Path(args.out), args.name or "decode", rows, what=decode.__doc__, bound=bound.__doc__, model=name)


def cmd_e2e(args) -> None:
    from . import e2e

    model, proc, name, size = _model(args, args.device, getattr(torch, args.dtype))
    rows = e2e.run(model, proc, name, args.methods, args.keeps, size, args.new_tokens, args.reps, log.info)
    write(Path(args.out), args.name or f"e2e_{args.model}", rows, what=e2e.__doc__, model=name)


def cmd_train(args) -> None:
    from . import train_speed

    rows = train_speed.run(args.sizes, args.threads, args.steps, args.rounds, log.info)
    write(Path(args.out), args.name or "train_speed", rows, what=train_speed.__doc__)


def cmd_bound(args) -> None:
    rows = [r.as_dict() for r in bound.llava15_7b_example(args.prompt_tokens, args.keep)]
    for r in rows:
        log.info("  %s B=%d keep %.2f: bound x%.3f", r["config"], r["batch"], r["keep"], r["bound"])
    write(Path(args.out), "bound_reference", rows, what=bound.__doc__)


def cmd_plot(args) -> None:
    from . import plot

    out = Path(args.out)
    dec = _load(out, "decode")
    fig = plot.figure(_load(out, "prefill"), [r for r in dec if r["mode"] == "batch"], [r for r in dec if r["mode"] == "engine"])
    fig.savefig(out / "bench.png", dpi=110)
    log.info("wrote %s", out / "bench.png")


def cmd_report(args) -> None:
    from . import report

    report.write(Path(args.out))


def cmd_all(args) -> None:
    """The CPU suite with the defaults the committed results use (`--quick`: a tiny smoke run of the same steps)."""
    q = args.quick
    base = dict(out=args.out, device="cpu", dtype="float32", name=None)
    cmd_bound(argparse.Namespace(**base, prompt_tokens=2048, keep=0.05))
    lm = dict(hidden=1024, layers=2, heads=8, kv_heads=8, intermediate=2752) if not q else \
        dict(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128)
    cmd_prefill(argparse.Namespace(**base, lengths=[1024, 2048, 4096, 8192] if not q else [128, 256],
                                   reps=args.reps if not q else 1, diagnostics=args.diagnostics or q, eager_max_gib=10.0,
                                   **lm))
    synth = dict(model="synth", hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1408, grid=44) if not q else \
        dict(model="synth", hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, grid=8)
    g, r = (32, 3) if not q else (4, 1)
    cmd_decode(argparse.Namespace(**base, **synth, methods=METHODS, keeps=KEEPS if not q else [0.05],
                                  batches=[1, 4, 16] if not q else [1, 2], batch_methods=["tgv-kv"],
                                  batch_keeps=KEEPS if not q else [0.05], new_tokens=g, reps=r, mem_limit_gib=16.0,
                                  no_engine=False))
    cmd_decode(argparse.Namespace(**{**base, "name": "decode_demo"}, model="demo", methods=METHODS,
                                  keeps=KEEPS if not q else [0.05], batches=[1, 4, 16] if not q else [1, 2],
                                  batch_methods=["tgv-kv"], batch_keeps=KEEPS if not q else [0.05], new_tokens=g,
                                  reps=r, mem_limit_gib=16.0, no_engine=False))
    cmd_e2e(argparse.Namespace(**base, model="demo", methods=["tgv-kv"], keeps=KEEPS, new_tokens=g, reps=5 if not q else 1))
    cmd_e2e(argparse.Namespace(**base, **synth, methods=["tgv-kv"], keeps=KEEPS, new_tokens=g, reps=r))
    cmd_plot(args)
    cmd_report(args)


def cmd_gpu(args) -> None:
    """7B-shaped LLaVA-NeXT, fp16, CUDA: prefill overhead (7B LM shape, few layers), batched decode 1/4/16 at ~2.9k."""
    device = "cuda" if not args.dry_run else "cpu"
    dtype = torch.float16 if not args.dry_run else torch.float32
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for a shrunk CPU rehearsal")
    out = Path(args.out)
    layers, vlayers = (32, 24) if not args.dry_run else (1, 1)
    shape = LMShape(hidden=4096, layers=4, heads=32, kv_heads=32, intermediate=11008) if not args.dry_run else \
        LMShape(hidden=256, layers=1, heads=4, kv_heads=4, intermediate=512)
    lengths = (1024, 2048, 4096, 8192) if not args.dry_run else (256,)
    rows = prefill.run(lengths, shape, 5 if not args.dry_run else 1, False, 40.0, device, dtype, log=log.info)
    write(out, "gpu_prefill", rows, what=prefill.__doc__, shape=vars(shape))
    torch.cuda.empty_cache() if device == "cuda" else None
    ns = argparse.Namespace(model="llava-next-7b", layers7b=layers, vision_layers7b=vlayers, tiny=args.dry_run)
    model, proc, name, size = _model(ns, device, dtype)
    limit = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 16 * 2**30
    from . import decode

    batches = [1, 4, 16] if not args.dry_run else [1, 2]
    rows = decode.run_engine(model, proc, name, ["tgv-kv"], [0.05, 0.1], size, 32, 3 if not args.dry_run else 1, log.info)
    rows += decode.run_batched(model, proc, name, ["tgv-kv"], KEEPS, batches, size, 32, limit, log.info)
    write(out, "gpu_decode", rows, what=decode.__doc__, bound=bound.__doc__, model=name)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="python -m tgvkv.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, device=True):
        p.add_argument("--out", default="results/bench")
        p.add_argument("--name", default=None, help="file stem (default: the subcommand)")
        if device:
            p.add_argument("--device", default="cpu")
            p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])

    def lm(p, hidden, layers, heads, kv, inter):
        p.add_argument("--hidden", type=int, default=hidden)
        p.add_argument("--layers", type=int, default=layers)
        p.add_argument("--heads", type=int, default=heads)
        p.add_argument("--kv-heads", type=int, default=kv)
        p.add_argument("--intermediate", type=int, default=inter)

    p = sub.add_parser("prefill", help="capture overhead vs SDPA vs eager+output_attentions")
    common(p)
    lm(p, 1024, 2, 8, 8, 2752)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--diagnostics", action="store_true", help="also time the engine's diagnostics capture")
    p.add_argument("--eager-max-gib", type=float, default=10.0)
    p.set_defaults(fn=cmd_prefill)

    for name, fn in (("decode", cmd_decode), ("e2e", cmd_e2e)):
        p = sub.add_parser(name)
        common(p)
        p.add_argument("--model", default="synth", choices=["demo", "synth", "llava-next-7b"])
        lm(p, 512, 4, 8, 8, 1408)
        p.add_argument("--grid", type=int, default=44, help="synth: grid x grid image tokens")
        p.add_argument("--layers7b", type=int, default=32)
        p.add_argument("--vision-layers7b", type=int, default=24)
        p.add_argument("--methods", nargs="+", default=METHODS if name == "decode" else ["tgv-kv"])
        p.add_argument("--keeps", type=float, nargs="+", default=KEEPS)
        p.add_argument("--new-tokens", type=int, default=32)
        p.add_argument("--reps", type=int, default=3)
        if name == "decode":
            p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
            p.add_argument("--batch-methods", nargs="+", default=["tgv-kv"])
            p.add_argument("--batch-keeps", type=float, nargs="+", default=KEEPS)
            p.add_argument("--mem-limit-gib", type=float, default=16.0)
            p.add_argument("--no-engine", action="store_true", help="skip the batch-1 engine runs")
        p.set_defaults(fn=fn)

    p = sub.add_parser("bound", help="the bandwidth bound for the reference LLaVA-1.5-7B example")
    common(p, device=False)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--keep", type=float, default=0.05)
    p.set_defaults(fn=cmd_bound)

    p = sub.add_parser("train", help="demo VLM training steps/min, float32 against bf16 autocast")
    common(p, device=False)
    from .train_speed import SIZES
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="batches per round (the first round is warm-up)")
    p.add_argument("--rounds", type=int, default=3)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("plot")
    common(p, device=False)
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("report", help="markdown tables + target checks (summary.md, summary.json)")
    common(p, device=False)
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("all", help="CPU suite + plot + report")
    common(p, device=False)
    p.add_argument("--reps", type=int, default=5, help="prefill repetitions")
    p.add_argument("--quick", action="store_true", help="tiny smoke run of the whole suite")
    p.add_argument("--diagnostics", action="store_true", help="also time the engine's diagnostics capture at prefill")
    p.set_defaults(fn=cmd_all)

    p = sub.add_parser("gpu", help="7B-shaped LLaVA-NeXT fp16 on CUDA (needs a GPU)")
    common(p, device=False)
    p.add_argument("--dry-run", action="store_true", help="shrunk model on CPU, to test the script")
    p.set_defaults(fn=cmd_gpu)
    args = ap.parse_args(argv)
    if args.cmd == "gpu" and args.out == "results/bench":
        args.out = "results/bench/gpu"
    args.fn(args)


if __name__ == "__main__":
    main()
