"""Copy a demo-model training checkpoint to a model folder, weights stored in a chosen dtype.

    python -m tgvkv.demo.export /tmp/demo-vlm-stage3/best assets/demo-vlm --dtype float32
    python -m tgvkv.demo.export /tmp/demo-vlm-stage1 /tmp/demo-vlm-stage1-bfloat16 --dtype bfloat16

The copy holds the model, its processor files and ``training_state.json`` (the training history the model card is
written from); the optimiser state (``resume_state.pt``) and sub-folders (``best/``) stay behind. A bf16 copy halves
the size; ``--init-from`` loads it back as float32 master weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

DTYPES = ("float32", "bfloat16")
#: written by ``save_pretrained`` in the destination, or left behind on purpose
NOT_COPIED = frozenset({"model.safetensors", "config.json", "resume_state.pt"})


def export(src: str, dst: str, dtype: str = "float32") -> list[str]:
    """Write ``dst`` from the checkpoint ``src``; returns the destination's file names."""
    import torch
    from transformers import LlavaForConditionalGeneration

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if not os.path.exists(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"{src}: no config.json, not a checkpoint folder")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("source and destination are the same folder")
    model = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    os.makedirs(dst, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(dst)
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name not in NOT_COPIED and os.path.isfile(path):
            shutil.copy(path, os.path.join(dst, name))
    record_handed_on_dtypes(os.path.join(dst, "training_state.json"))
    return sorted(os.listdir(dst))


def record_handed_on_dtypes(state_path: str) -> None:
    """Write into the copied training history the dtype each stage's weights had when the next stage started from
    them, while the folders it names still exist (the model card's reproduce commands need it)."""
    from .card import handed_on_dtype

    if not os.path.exists(state_path):
        return
    with open(state_path) as f:
        state = json.load(f)
    stages = state.get("previous_stages", [])
    following = stages[1:] + [state]
    for stage, nxt in zip(stages, following):
        stage["weights_dtype"] = handed_on_dtype(stage, nxt)
    with open(state_path, "w") as f:
        json.dump(state, f, indent=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a python -m tgvkv.demo.train --out folder (or its best/)")
    ap.add_argument("dst")
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    args = ap.parse_args(argv)
    names = export(args.src, args.dst, args.dtype)
    size = os.path.getsize(os.path.join(args.dst, "model.safetensors")) / 2**20
    print(f"wrote {args.dst}: {', '.join(names)} ({size:.1f} MB of weights, {args.dtype})")


if __name__ == "__main__":
    main()
