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

from . import blocks
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """SnapKV scoring with pyramidal (linearly decreasing) layer budgets."""

    name: ClassVar[str] = "pyramidkv"
    beta: int = 20  # top layer prefix budget = B / beta (official default)

    def __post_init__(self) -> None:
        super().__post_init__()
        blocks.check_int("beta", self.beta, 1)

    def layer_budgets(self, num_layers: int, budget: int, window: int, seq_len: int) -> np.ndarray:
        return blocks.pyramid_budgets(num_layers, budget, window, seq_len, self.beta)
