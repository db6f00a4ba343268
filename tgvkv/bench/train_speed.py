"""Training throughput of the demo VLM: float32 against bf16 autocast (AMX), for several model sizes.

Each (size, precision) pair runs the real training step (packing, forward, loss, backward, AdamW) on the same
batches; pairs are interleaved over rounds and the median step time is kept, so the fp32/bf16 ratio is measured
in one run under the same machine load.
"""
from __future__ import annotations

import statistics
from typing import Callable

SIZES = {  # name -> ModelSpec fields
    "v1 text 192x4, vision 128x2": {},
    "text 192x8, vision 128x4": dict(vision_layers=4, text_layers=8),
    "v2 text 256x8, vision 192x4": dict(vision_hidden=192, vision_layers=4, vision_intermediate=768, text_hidden=256,
                                        text_layers=8, text_intermediate=768),
}
V1 = dict(vision_hidden=128, vision_layers=2, vision_heads=4, vision_intermediate=256, text_hidden=192,
          text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=512)


def run(sizes: list[str], threads: int, steps: int, rounds: int, log: Callable[[str], None]) -> list[dict]:
    import time

    import torch

    from ..demo.build import ModelSpec, build_model, build_processor
    from ..demo.train import Packer, TrainConfig, train_groups

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    processor = build_processor()
    packer = Packer(processor)
    cfg = TrainConfig(short_frac=0.5, repeat_shapes_frac=0.3)
    batches = [packer.pack(train_groups(cfg, i, [i * cfg.images_per_step])) for i in range(steps)]
    setups = {}
    for name in sizes:
        spec = ModelSpec(**{**V1, **SIZES[name]})
        for precision in ("fp32", "bf16"):
            model = build_model(processor.tokenizer, spec).train()
            model.config.text_config.use_cache = False
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
            setups[(name, precision)] = (model, opt, sum(p.numel() for p in model.parameters()))
    times: dict[tuple[str, str], list[float]] = {k: [] for k in setups}
    for _ in range(rounds):
        for (name, precision), (model, opt, _) in setups.items():
            for b in batches:
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                position_ids=b["position_ids"], pixel_values=b["pixel_values"])
                logits = out.logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         b["labels"][:, 1:].reshape(-1), ignore_index=-100)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times[(name, precision)].append(time.perf_counter() - t0)
    rows = []
    for name in sizes:
        med = {p: statistics.median(times[(name, p)][len(batches):] or times[(name, p)]) for p in ("fp32", "bf16")}
        for p in ("fp32", "bf16"):
            rows.append({"size": name, "params": setups[(name, p)][2], "precision": p, "threads": threads,
                         "seconds_per_step": round(med[p], 3), "steps_per_min": round(60 / med[p], 1),
                         "speedup_vs_fp32": round(med["fp32"] / med[p], 2),
                         "rows_per_step": cfg.images_per_step, "answers_per_step": cfg.images_per_step * cfg.pieces_per_image})
            log(f"  {name} {p}: {med[p]:.2f} s/step ({60 / med[p]:.1f} steps/min, x{med['fp32'] / med[p]:.2f})")
    return rows
