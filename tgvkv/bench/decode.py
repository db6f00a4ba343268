"""Decode throughput and KV memory: full KV vs each method at several keep ratios, batch 1 and batched.

Two modes, both on the same model and prompt length:
- "engine": batch 1 through `tgvkv.generation.generate` (prefill capture, selection, eviction, HF `generate` on the
  evicting cache; each method's own decode-time eviction rule included), diagnostics off;
- "batch": `tgvkv.batch.generate_batch` for B different images/questions (per-layer padded cache, preallocated,
  one forward per step; selection is prefill-only).
tokens/s counts decode steps only (the first token comes from prefill): B * (G - 1) / decode seconds.
KV bytes are measured from the cache tensors' storages; on CUDA also torch.cuda.max_memory_allocated per run.
Each row carries the bandwidth bound of its configuration (tgvkv.bench.bound) and the achieved fraction of it.
"""
from __future__ import annotations

import numpy as np
import torch

from ..batch import BatchItem, generate_batch
from ..generation import CaptureOptions, RunOptions, generate
from . import bound
from .models import QUESTIONS, images

NO_DIAG = CaptureOptions(diagnostics=False, hidden_states=False)


def _policy(method: str):
    return None if method == "full" else method


def _mem_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _mem_peak(device: torch.device) -> float:
    return float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else float("nan")


def run_engine(model, proc, model_name: str, methods, keeps, image_size, max_new_tokens: int = 32, reps: int = 3,
               log=print) -> list[dict]:
    """Batch-1 engine runs, repetitions interleaved over configurations; medians."""
    device = model.get_input_embeddings().weight.device
    img = images(1, image_size, seed=0)
    configs = [("full", 1.0)] + [(m, k) for m in methods for k in keeps]
    samples: dict[tuple, list] = {c: [] for c in configs}
    generate(model, proc, img, QUESTIONS[0], None, 1.0, options=RunOptions(max_new_tokens=4), capture=NO_DIAG)  # warm-up
    for _ in range(reps):
        for m, k in configs:
            _mem_reset(device)
            res = generate(model, proc, img, QUESTIONS[0], _policy(m), k, options=RunOptions(max_new_tokens=max_new_tokens),
                           capture=NO_DIAG)
            samples[(m, k)].append((res, _mem_peak(device)))
    w = bound.decode_weight_bytes(model)
    rows = []
    for m, k in configs:
        runs = samples[(m, k)]
        tr = runs[0][0].trace
        full, kept, final = (int(np.sum(a)) for a in (tr.kv_bytes_full, tr.kv_bytes_kept, tr.kv_bytes_final))
        row = dict(
            mode="engine", model=model_name, method=m, keep=k, batch=1, prompt_tokens=tr.seq_len,
            new_tokens=int(np.median([r.trace.timings["new_tokens"] for r, _ in runs])),
            decode_tokens_per_s=float(np.median([r.trace.timings["decode_tokens_per_s"] for r, _ in runs])),
            prefill_s=float(np.median([r.trace.timings["prefill_s"] for r, _ in runs])),
            select_s=float(np.median([r.trace.timings["select_s"] for r, _ in runs])),
            kv_bytes_full=full, kv_bytes_kept=kept, kv_bytes_final=final, kept_fraction=kept / full,
            decode_evictions=int(len(tr.decode_evictions)), cuda_max_allocated=float(np.median([p for _, p in runs])),
            weight_bytes=w, reps=reps,
        )
        row["bound"] = bound.speedup_bound(w, full, 1, row["kept_fraction"])
        rows.append(row)
    _speedups(rows)
    for r in rows:
        log(f"  engine {r['method']:>12} keep {r['keep']:.2f}: {r['decode_tokens_per_s']:8.1f} tok/s, KV kept "
            f"{r['kept_fraction']:.3f} of {r['kv_bytes_full'] / 2**20:.1f} MiB, x{r['speedup']:.2f} (bound x{r['bound']:.2f})")
    return rows


def run_batched(model, proc, model_name: str, methods, keeps, batches, image_size, max_new_tokens: int = 32,
                mem_limit_bytes: float | None = None, log=print) -> list[dict]:
    """generate_batch for each batch size; B different random images, questions cycled."""
    device = model.get_input_embeddings().weight.device
    w, resident = bound.decode_weight_bytes(model), bound.param_bytes(model)
    rows = []
    warm = [BatchItem(images(1, image_size, seed=99), QUESTIONS[0])]
    generate_batch(model, proc, warm, None, 1.0, 4, ignore_eos=True)
    for B in batches:
        items = [BatchItem(images(1, image_size, seed=b), QUESTIONS[b % len(QUESTIONS)]) for b in range(B)]
        for m, k in [("full", 1.0)] + [(m, k) for m in methods for k in keeps]:
            _mem_reset(device)
            res = generate_batch(model, proc, items, _policy(m), k, max_new_tokens, ignore_eos=True)
            row = dict(
                mode="batch", model=model_name, method=m, keep=k, batch=B,
                prompt_tokens=float(res.prompt_lengths.mean()), new_tokens=max_new_tokens,
                decode_tokens_per_s=res.timings["decode_tokens_per_s"], prefill_s=res.timings["prefill_s"] / B,
                kv_bytes_full=res.kv_bytes_full, kv_bytes_kept=res.kv_bytes_kept, kv_bytes_batch=res.kv_bytes_batch,
                kv_bytes_batch_prompt=res.kv_bytes_batch_prompt, kept_fraction=res.kv_bytes_kept / res.kv_bytes_full,
                padding_fraction=res.padding_fraction, cuda_max_allocated=_mem_peak(device), weight_bytes=w,
                resident_bytes=resident,
            )
            row["bound"] = bound.speedup_bound(w, res.kv_bytes_full / B, B, row["kept_fraction"])
            if mem_limit_bytes:
                row["mem_limit_bytes"] = mem_limit_bytes
                row["max_batch_at_limit"] = bound.max_batch(mem_limit_bytes, resident, res.kv_bytes_batch / B)
            rows.append(row)
            del res
    _speedups(rows)
    for r in rows:
        log(f"  batch {r['batch']:>2} {r['method']:>10} keep {r['keep']:.2f}: {r['decode_tokens_per_s']:8.1f} tok/s, "
            f"x{r['speedup']:.2f} of full (bound x{r['bound']:.2f}, {r['fraction_of_bound']:.0%}), "
            f"KV {r['kept_fraction']:.3f}, padding {r['padding_fraction']:.2f}"
            + (f", max batch at limit {r['max_batch_at_limit']}" if "max_batch_at_limit" in r else ""))
    return rows


def _speedups(rows: list[dict]) -> None:
    """speedup = tokens/s over full KV at the same batch size; fraction_of_bound = speedup / bound."""
    full = {(r["mode"], r["batch"]): r["decode_tokens_per_s"] for r in rows if r["method"] == "full"}
    for r in rows:
        r["speedup"] = r["decode_tokens_per_s"] / full[(r["mode"], r["batch"])]
        r["fraction_of_bound"] = r["speedup"] / r["bound"]
