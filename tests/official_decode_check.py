"""Counts table: every tgv-kv decode decision re-decided by the independent official rule (official_reference.py).

    PYTHONPATH=.:tests python tests/official_decode_check.py [--demo-questions 21] [--tokens 24]

Prints a markdown table (family x keep: decisions, equal, evictions); writes nothing. Families with several vision
spans per image (Idefics3 / SmolVLM) are left out: the official rule assumes one contiguous image run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from official_reference import check_decode
from test_official_decode import DEMO, FAMILIES, KEEPS, Q
from tiny_models import random_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-questions", type=int, default=21, help="demo test questions (7 types rotate)")
    ap.add_argument("--tokens", type=int, default=24, help="max new tokens per answer")
    ap.add_argument("--prompts", type=int, default=3, help="random images per tiny family")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| model | prompts | " + " | ".join(f"{k * 100:g}%: equal / decisions (evictions)" for k in KEEPS) + " |")
    print("|---|---|" + "---|" * len(KEEPS))
    total = [0, 0]
    runs = [(name, build, [[random_image(s, size)] for s in range(args.prompts)], [Q] * args.prompts)
            for name, (build, size) in FAMILIES.items()]
    if (Path(DEMO) / "config.json").exists():
        from tgvkv.eval.tasks import load_task
        from tgvkv.loading import load_model

        examples = load_task("demo", args.demo_questions, "test", "auto").examples
        runs.append(("demo-vlm", lambda: load_model(str(DEMO)), [ex.load_images() for ex in examples],
                     [ex.question for ex in examples]))
    for name, build, images, questions in runs:
        model, proc = build()
        cells = []
        for keep in KEEPS:
            d = e = ev = 0
            for imgs, q in zip(images, questions):
                c = check_decode(model, proc, imgs, q, keep, args.tokens)
                d, e, ev = d + c.decisions, e + c.equal, ev + c.evictions
            total[0], total[1] = total[0] + e, total[1] + d
            cells.append(f"{e} / {d} ({ev})")
        print(f"| {name} | {len(questions)} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nall: {total[0]} / {total[1]} decisions equal the official rule")


if __name__ == "__main__":
    main()
