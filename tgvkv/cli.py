"""Command line: `python -m tgvkv run --model PATH_OR_ID --image FILE --question TEXT --method tgv-kv --keep 0.05`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import cli_unexpected_message
from .images import load_image_file
from .policies import check_keep_ratio, make_policy
from .validation import check_output_path, validate_question

TRACE_SUFFIXES = (".npz", ".json")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tgvkv", description="TGV-KV Explorer: KV eviction for VLMs")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer one image+question with full KV and with an eviction policy")
    run.add_argument("--model", default=None, help="local folder or hub id (default: the bundled demo model)")
    run.add_argument("--image", required=True, action="append", help="image file (repeat for several images)")
    run.add_argument("--question", required=True)
    run.add_argument("--method", default="tgv-kv", help="eviction policy (see `python -m tgvkv methods`)")
    run.add_argument("--keep", type=float, default=0.05, help="fraction of the KV cache retained, in (0, 1]")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--protocol", choices=["official", "strict"], default="official")
    run.add_argument("--followup", default=None, help="a second question asked on the same (evicted) cache")
    run.add_argument("--device", default=None)
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    run.add_argument("--trace", default=None, help="write the evicted run's trace here (.npz or .json)")
    run.add_argument("--full-trace", default=None, help="write the full-KV run's trace here (.npz or .json)")
    run.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                     help="print a JSON summary instead of text, or write it to FILE (.json)")
    run.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run (off by default)")
    sub.add_parser("methods", help="list the registered eviction policies")
    return p


def _summary(cmp) -> dict:
    full, ev = cmp.full.trace, cmp.evicted.trace
    return {
        "model": ev.model,
        "images": [{"size": list(size), "sha256": h} for size, h in zip(ev.layout.image_sizes, ev.image_sha256)],
        "method": ev.method,
        "keep_ratio": ev.keep_ratio,
        "prompt_tokens": ev.seq_len,
        "full": {"answer": full.output_text, "followup": full.followup_text, "kv_bytes": int(full.kv_bytes_kept.sum()), **full.timings},
        "evicted": {
            "answer": ev.output_text,
            "followup": ev.followup_text,
            "kv_bytes": int(ev.kv_bytes_kept.sum()),
            "kv_bytes_final": int(ev.kv_bytes_final.sum()),
            "kept_tokens_per_layer": ev.budgets.tolist(),
            **ev.timings,
        },
        "first_divergence": cmp.first_divergence,
        "step_kl": [round(float(x), 6) for x in cmp.step_kl],
    }


def _print_text(s: dict) -> None:
    f, e = s["full"], s["evicted"]
    print(f"model {s['model']}  method {s['method']}  keep {s['keep_ratio']:.0%}  prompt {s['prompt_tokens']} tokens")
    print(f"full KV   : {f['answer']!r}" + (f"  | follow-up: {f['followup']!r}" if f["followup"] is not None else ""))
    print(f"evicted KV: {e['answer']!r}" + (f"  | follow-up: {e['followup']!r}" if e["followup"] is not None else ""))
    print(f"KV bytes  : full {f['kv_bytes']:,}  kept {e['kv_bytes']:,} ({e['kv_bytes'] / max(f['kv_bytes'], 1):.1%})")
    print(f"kept tokens per layer: {e['kept_tokens_per_layer']}")
    for name, t in (("full", f), ("evicted", e)):
        print(f"time {name:8s}: prefill {t['prefill_s'] * 1e3:.1f} ms  select {t['select_s'] * 1e3:.1f} ms  "
              f"decode {t['decode_s'] * 1e3:.1f} ms  {t['tokens_per_s']:.1f} tokens/s")
    div = s["first_divergence"]
    print("answers identical" if div is None else f"answers diverge at generated token {div}")


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 refused before anything ran (the message names the problem), 1 unexpected failure
    (one line with an error id; the traceback is saved to a file)."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except Exception as e:  # noqa: BLE001 - logged with its traceback and an error id; the user gets one line
        command = "python -m tgvkv " + " ".join(sys.argv[1:] if argv is None else argv)
        print("error: " + cli_unexpected_message(e, command), file=sys.stderr)
        return 1


def check_run_args(args: argparse.Namespace) -> None:
    """Everything the run command can check before the model is loaded; ValueError names the problem."""
    from .loading import resolve_device

    validate_question(args.question)
    if args.followup:
        validate_question(args.followup, what="follow-up question")
    make_policy(args.method)
    check_keep_ratio(args.keep)
    resolve_device(args.device)
    outputs = [(args.trace, TRACE_SUFFIXES, "--trace"), (args.full_trace, TRACE_SUFFIXES, "--full-trace"),
               (None if args.json in (None, "-") else args.json, (".json",), "--json")]
    written: dict[Path, str] = {}
    for path, suffixes, what in outputs:
        if path is None:
            continue
        resolved = check_output_path(path, suffixes, what).resolve()
        if resolved in written:
            raise ValueError(f"{written[resolved]} and {what} name the same file {str(path)!r}")
        written[resolved] = what


def _run(args: argparse.Namespace) -> int:
    from . import POLICIES, CaptureOptions, LoadOptions, RunOptions, compare, load_model
    from .loading import DEMO_MODEL_DIR

    if args.command == "methods":
        for name, cls in sorted(POLICIES.items()):
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"{name:28s} {doc}")
        return 0
    try:
        # everything that needs no model is checked before the (possibly large) model is loaded
        check_run_args(args)
        options = RunOptions(max_new_tokens=args.max_new_tokens, protocol=args.protocol, followup=args.followup)
        images = [load_image_file(p) for p in args.image]
        model_name = args.model or str(DEMO_MODEL_DIR)
        load_options = LoadOptions(args.device, args.dtype, trust_remote_code=args.trust_remote_code)
        model, processor = load_model(model_name, load_options)
        cmp = compare(  # a demo-model question with words it does not know is refused here, before any generation
            model, processor, images, args.question, args.method, args.keep,
            options=options, capture=CaptureOptions(), model_name=model_name,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = _summary(cmp)
    if args.json == "-":
        print(json.dumps(summary, indent=2))
    else:
        _print_text(summary)
    written = []
    for path, trace in ((args.trace, cmp.evicted.trace), (args.full_trace, cmp.full.trace)):
        if path:
            written.append(trace.save(Path(path).expanduser()))
    if args.json not in (None, "-"):
        Path(args.json).expanduser().write_text(json.dumps(summary, indent=2))
        written.append(Path(args.json))
    if args.json != "-":
        for path in written:
            print(f"written: {path}")
    return 0
