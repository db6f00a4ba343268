"""PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv 2406.02069).

Same scoring and selection as SnapKV (observation window of the last w = min(window_size, K) positions, pooled
prefix scores, window always kept), but pyramidal layer budgets with the same total L * K (K =
round_half_even(keep_ratio * T) clipped to [1, T]): the prefix budget B = K - w runs as an arithmetic sequence from
the bottom layer k_0 = 2B - B/beta down to the top layer k_{L-1} = B/beta (k_0 capped at T - w, the paper's rule),
k_l = k_0 - l (k_0 - k_{L-1}) / (L - 1); see `blocks.pyramid_budgets` for the integer rounding.
Our choice: the official code steps by (k_0 - k_{L-1}) // (L-1) (some variants // L) in integers, which overspends
the total (L=32, B=100, beta=20: k_0=195, step 6 gives 3264 prefix tokens, step 5 gives 3760, instead of 3200); we
keep the paper's exact arithmetic sequence so that every method spends the same memory.
Decoding: prefill-only by default; decode=True evicts as SnapKV's extension with each layer's own budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..layout import TokenLayout
from ..stats import PrefillStats, StatRequest
from . import blocks
from .base import DecodeRule, Policy, Selection
from .decode_rules import PooledRowRule
from .snapkv import POOLINGS, snap_keep, window_scores


@dataclass
class PyramidKV(Policy):
    """SnapKV scoring with pyramidal (linearly decreasing) layer budgets."""

    name: ClassVar[str] = "pyramidkv"
    decodes_by_default: ClassVar[bool] = False
    window_size: int = 32
    kernel_size: int = 5
    pooling: str = "avg"
    beta: int = 20  # top layer prefix budget = B / beta (official default)
    decode: bool = False

    def __post_init__(self) -> None:
        blocks.check_int("window_size", self.window_size, 1)
        blocks.check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-length pooling), got {self.kernel_size}")
        blocks.check_choice("pooling", self.pooling, POOLINGS)
        blocks.check_int("beta", self.beta, 1)
        blocks.check_bool("decode", self.decode)

    def request(self, layout: TokenLayout) -> StatRequest:
        T = layout.seq_len
        return StatRequest(query_positions=np.arange(max(0, T - self.window_size), T, dtype=np.int64))

    def select(self, stats: PrefillStats, layout: TokenLayout, keep_ratio: float) -> Selection:
        L, T = stats.num_layers, layout.seq_len
        K = blocks.uniform_budget(T, keep_ratio)
        w = min(self.window_size, K)
        budgets = blocks.pyramid_budgets(L, K, w, T, self.beta)
        scores = window_scores(stats, T, w, self.kernel_size, self.pooling)
        kept = [snap_keep(scores[l], T, w, int(budgets[l])) for l in range(L)]
        return Selection(kept=kept, budgets=budgets, scores=scores, info={"window": np.full(L, w)})

    def decode_rule(self, selection: Selection, layout: TokenLayout) -> DecodeRule | None:
        if not self.decode:
            return None
        w = int(selection.info["window"][0])
        return PooledRowRule(selection.budgets.copy(), window=w, kernel_size=self.kernel_size, pooling=self.pooling)
