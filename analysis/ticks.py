"""Tick positions and labels shared by the plotly and matplotlib figures (pure; no plotting library).

Both back-ends set ticks explicitly from these lists, so a layer axis never shows 0.5 and a log axis labels decades
(1, 10, 100) instead of the in-between "2 5" labels the libraries add on short ranges.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
NICE_STEPS = (1, 2, 5)


def nice_step(n: int, max_ticks: int) -> int:
    """Smallest step among 1, 2, 5, 10, 20, 50, ... that puts at most `max_ticks` ticks on range(n)."""
    if max_ticks < 1:
        raise ValueError(f"max_ticks must be at least 1, got {max_ticks}")
    scale = 1
    while True:
        for s in NICE_STEPS:
            if math.ceil(n / (s * scale)) <= max_ticks:
                return s * scale
        scale *= 10


def integer_ticks(n: int, max_ticks: int = 20) -> list[int]:
    """Whole-number ticks for an axis of n items (layers 0..n-1): every item, or every 2nd / 5th / 10th ..."""
    return list(range(0, max(n, 0), nice_step(max(n, 1), max_ticks)))


def decade_label(k: int) -> str:
    """10**k as a label: plain numbers from 0.01 to 1000, powers of ten (10⁻³, 10⁴) beyond."""
    if -2 <= k <= 3:
        return f"{10.0 ** k:g}"
    return "10" + str(k).translate(_SUPERSCRIPT)


def decade_range(values: Iterable[float]) -> tuple[int, int]:
    """(lowest, highest) power of ten bracketing the positive finite values; (0, 1) when there are none."""
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if not v.size:
        return 0, 1
    lo, hi = math.floor(math.log10(v.min())), math.ceil(math.log10(v.max()))
    return lo, max(hi, lo + 1)


def decade_ticks(values: Iterable[float], max_ticks: int = 8) -> tuple[list[float], list[str]]:
    """(tick values, labels) at whole decades spanning the positive values; every 2nd/5th... decade if many."""
    lo, hi = decade_range(values)
    step = nice_step(hi - lo + 1, max_ticks)
    exps = range(lo, hi + 1, step)
    return [10.0 ** k for k in exps], [decade_label(k) for k in exps]


def thinned(n: int, max_labels: int, always: Sequence[int] = ()) -> list[int]:
    """Indices of the items to label on an axis of n items: every k-th one (at most `max_labels`), plus the
    indices in `always` (e.g. the first differing token), dropping regular ones that would crowd them."""
    step = max(1, math.ceil(n / max(max_labels, 1)))
    picked = set(range(0, n, step))
    for a in always:
        if 0 <= a < n:
            picked = {p for p in picked if abs(p - a) >= max(1, step // 2 + (step % 2))} | {a}
    return sorted(picked)
