"""End to end: wall time to answer one image + question with N new tokens, full KV vs evicted.

Timed: one `tgvkv.generation.generate` call as an app makes it (image preprocessing, vision tower, prefill with
statistics capture, selection, eviction, decoding with each method's decode rule included), diagnostics off,
exactly `max_new_tokens` tokens (EOS disabled on random-weight models). Repetitions interleaved; medians.
"""
from __future__ import annotations

import time

import numpy as np

from ..generation import CaptureOptions, RunOptions, generate
from .models import QUESTIONS, images

NO_DIAG = CaptureOptions(diagnostics=False, hidden_states=False)


def run(model, proc, model_name: str, methods, keeps, image_size, max_new_tokens: int = 32, reps: int = 3,
        log=print) -> list[dict]:
    img = images(1, image_size, seed=1)
    configs = [("full", 1.0)] + [(m, k) for m in methods for k in keeps]
    generate(model, proc, img, QUESTIONS[1], None, 1.0, options=RunOptions(max_new_tokens=2), capture=NO_DIAG)
    wall: dict[tuple, list[float]] = {c: [] for c in configs}
    parts: dict[tuple, list[dict]] = {c: [] for c in configs}
    for _ in range(reps):
        for m, k in configs:
            t0 = time.perf_counter()
            res = generate(model, proc, img, QUESTIONS[1], None if m == "full" else m, k,
                           options=RunOptions(max_new_tokens=max_new_tokens), capture=NO_DIAG)
            wall[(m, k)].append(time.perf_counter() - t0)
            parts[(m, k)].append(res.trace.timings | {"T": res.trace.seq_len})
    rows = []
    for m, k in configs:
        p = parts[(m, k)]
        med = lambda key: float(np.median([x[key] for x in p]))  # noqa: E731
        rows.append(dict(model=model_name, method=m, keep=k, prompt_tokens=p[0]["T"], new_tokens=int(med("new_tokens")),
                         wall_s=float(np.median(wall[(m, k)])), prefill_s=med("prefill_s"), select_s=med("select_s"),
                         decode_s=med("decode_s"), reps=reps))
    base = rows[0]["wall_s"]
    for r in rows:
        r["speedup"] = base / r["wall_s"]
        log(f"  e2e {r['method']:>10} keep {r['keep']:.2f}: {r['wall_s']:.3f}s (prefill {r['prefill_s']:.3f}, select "
            f"{r['select_s']:.3f}, decode {r['decode_s']:.3f}) x{r['speedup']:.2f}")
    return rows
