"""H2O, Heavy-Hitter Oracle (Zhang et al. 2023, arXiv 2306.14048).

Score of a key = accumulated attention it received: the column sum over all prompt queries (head-averaged here,
since one kept set is shared by all heads; the paper scores per head). Each layer keeps budget K =
round_half_even(keep_ratio * T) clipped to [1, T]: the r = floor(recent_fraction * K) most recent tokens plus the
K - r highest-scored earlier tokens ("heavy hitters"; ties keep the later position). The paper's default splits the
budget evenly between heavy hitters and recent tokens (recent_fraction = 0.5).
Decoding (default; H2O is a greedy decode-time policy): scores keep accumulating every new query's attention; the
cache stays at K slots per layer, evicting the lowest accumulated slot outside the r most recent (one per step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..layout import TokenLayout
from ..stats import PrefillStats, StatRequest
from . import blocks
from .base import DecodeRule, Policy, Selection


@dataclass
class H2O(Policy):
    """Accumulated attention (heavy hitters) + recent window."""

    name: ClassVar[str] = "h2o"
    decodes_by_default: ClassVar[bool] = True
    recent_fraction: float = 0.5
    decode: bool = True

    def __post_init__(self) -> None:
        r = self.recent_fraction
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise ValueError(f"recent_fraction must be a number in [0, 1], got {r!r}")
        blocks.check_bool("decode", self.decode)

    def request(self, layout: TokenLayout) -> StatRequest:
        return StatRequest(query_positions=np.zeros(0, dtype=np.int64), column_sums="all")

    def select(self, stats: PrefillStats, layout: TokenLayout, keep_ratio: float) -> Selection:
        L, T = stats.num_layers, layout.seq_len
        K = blocks.uniform_budget(T, keep_ratio)
        r = int(np.floor(self.recent_fraction * K))
        scores = stats.column_sums_for(np.arange(T)).astype(np.float64)  # (L, T) accumulated attention
        recent = np.arange(T - r, T, dtype=np.int64)
        candidates = np.arange(T - r, dtype=np.int64)
        kept = [blocks.keep_top(scores[l], candidates, K - r, recent) for l in range(L)]
        return Selection(kept=kept, budgets=np.full(L, K), scores=scores, info={"recent": np.full(L, r)})

    def decode_rule(self, selection: Selection, layout: TokenLayout) -> DecodeRule | None:
        from .decode_rules import AccumulatedRule  # torch: imported when a run decodes, not with the policy

        if not self.decode:
            return None
        initial = [selection.scores[l, k].astype(np.float32) for l, k in enumerate(selection.kept)]
        return AccumulatedRule(selection.budgets.copy(), initial=initial, recent=selection.info["recent"].copy())
