"""TGV-KV's scores and layer ratios with the official code's arithmetic in a model dtype (bf16 / fp16 / fp32).

The official code computes everything in the dtype of its eager attention maps, i.e. the model dtype. In bf16 the
"+100" text offset leaves a resolution of 0.5, so text scores tie, and the per-layer ratios are quantised, which
moves budgets by a token or more. This module reproduces that arithmetic in numpy, for reproduction studies
(`TGVKV(precision="model")`). Each torch operation is emulated as torch does it: the exact result of the operation on
dtype values, rounded to float32 (torch's internal "opmath" type for reduced dtypes, and for float32 itself), then
rounded to the dtype (round to nearest even); a reduction (sum over a dimension) accumulates in higher precision
and rounds once. A division by a Python number is a multiplication by its float32 reciprocal, as torch's CUDA
kernel does it (and as the CPU kernel's result comes out for these operands).
Remaining differences: summation order inside a reduction (a float32 sum can differ in its last bit from ours, which
can move a rounded bf16 value by one step in rare cases).
"""
from __future__ import annotations

import numpy as np

from ..layout import TokenLayout
from ..stats import PrefillStats

DTYPES = ("float32", "bfloat16", "float16")


def round_to(x: np.ndarray | float, dtype: str) -> np.ndarray:
    """Values rounded to float32 and then to `dtype` (nearest, ties to even), returned as float64."""
    x32 = np.asarray(x, dtype=np.float64).astype(np.float32)
    if dtype == "float32":
        return x32.astype(np.float64)
    if dtype == "float16":
        return x32.astype(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        bits = x32.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # round to nearest even on the low 16 bits
        return rounded.astype(np.uint32).view(np.float32).astype(np.float64)
    raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")


def _scalar_mul(x: np.ndarray, c: float, dtype: str) -> np.ndarray:
    """tensor * python_scalar: the scalar as float32 (opmath), product rounded to float32, then to the dtype."""
    return round_to(x * np.float64(np.float32(c)), dtype)


def official_scores(stats: PrefillStats, layout: TokenLayout, keep_ratio: float, dtype: str,
                    text_offset: float = 100.0) -> dict[str, np.ndarray]:
    """The official `_prefill` for one prompt, op by op in `dtype`, from head-mean attention rows in that dtype.

    Returns float64 arrays holding dtype values: scores (L, T) (text: column sum + offset; vision: TWR score),
    vision_scores (L, V), text_weights (L, Q), tvb_mass (L,), and layer_ratio (L,) as float32 (what the official code
    stores with `.float().numpy()`). NaN where a position is not ranked (none here: every position gets a score).
    """
    q = layout.text_query_positions
    rows = round_to(stats.rows_for(q), dtype)  # (L, Q, T): the head-mean map's text rows, in the dtype
    L, Q, T = rows.shape
    tt = rows[:, :, q]  # (L, Q, Q)
    ti = rows[:, :, layout.vision_positions]  # (L, Q, V)
    tts = round_to(tt.sum(axis=1), dtype)  # text_text_attns.sum(1): one rounding after the reduction
    divisor = round_to(np.arange(Q, 0, -1, dtype=np.float64), dtype)  # the int64 divisor is cast to the dtype
    w = round_to(tts / divisor, dtype)  # (L, Q)
    vision = round_to(round_to(ti * w[:, :, None], dtype).sum(axis=1), dtype)  # (L, V)
    cols = round_to(stats.column_sums_for(layout.text_positions), dtype)  # all_attns[..., j].sum(1)
    text = _scalar_add(cols, text_offset, dtype)
    scores = np.full((L, T), np.nan)
    scores[:, layout.vision_positions] = vision
    scores[:, layout.text_positions] = text

    mass = round_to(ti.reshape(L, -1).sum(axis=1), dtype)  # text_image_attns.reshape(L, -1).sum(1)
    normalized = round_to(mass / round_to(mass.sum(), dtype), dtype)
    prune = 1.0 - keep_ratio  # the official PRUNE_RATIO
    share = _scalar_mul(normalized, L * T * (1 - prune), dtype)  # len(r) * seq_len * (1 - ratio) * r
    remaining = round_to(np.float64(np.float32(T)) - share, dtype)  # seq_len - ...
    ratio = _scalar_mul(remaining, float(np.float32(1.0) / np.float32(T)), dtype)  # ... / seq_len
    return {"scores": scores, "vision_scores": vision, "text_weights": w, "tvb_mass": mass,
            "layer_ratio": ratio.astype(np.float32)}


def _scalar_add(x: np.ndarray, c: float, dtype: str) -> np.ndarray:
    return round_to(x + np.float64(np.float32(c)), dtype)
