"""SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469).

Observation window = the last w = min(window_size, K) prompt positions (in a VLM prompt: the end of the question).
Scores of the earlier ("prefix") keys: attention summed over the window's queries, then pooled along positions
(stride 1, kernel `kernel_size`, padding kernel_size // 2; "avg" counts the zero padding like torch avg_pool1d,
as the official code). Each layer keeps the window plus the K - w best pooled prefix keys (ties: later position),
K = round_half_even(keep_ratio * T) clipped to [1, T]. Official defaults: window 32, kernel 5, avgpool.
Head-averaged scores (one kept set shared by all heads; the paper selects per head). Modality-blind: if the text
after the image is shorter than the window, the window includes vision queries (as in SnapKV itself).
Decoding: prefill-only by default (the paper compresses the prompt only). decode=True is our extension, see
`decode_rules.PooledRowRule`: fixed budget K, evict the lowest pooled attention of the newest query outside the
w newest slots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..layout import TokenLayout
from ..stats import PrefillStats, StatRequest
from . import blocks
from .base import DecodeRule, Policy, Selection

POOLINGS = ("avg", "max")


def window_scores(stats: PrefillStats, seq_len: int, window: int, kernel_size: int, pooling: str) -> np.ndarray:
    """(L, T) pooled observation-window scores of the prefix keys [0, T - window); NaN on the window itself."""
    q = np.arange(seq_len - window, seq_len, dtype=np.int64)
    rows = stats.rows_for(q).astype(np.float64)  # (L, w, T)
    summed = rows[:, :, : seq_len - window].sum(axis=1)  # (L, T - w)
    scores = np.full((stats.num_layers, seq_len), np.nan)
    scores[:, : seq_len - window] = blocks.pool1d(summed, kernel_size, pooling)
    return scores


def snap_keep(scores: np.ndarray, seq_len: int, window: int, budget: int) -> np.ndarray:
    """Kept positions of one layer: the last `window` positions plus the budget - window best prefix keys."""
    recent = np.arange(seq_len - window, seq_len, dtype=np.int64)
    return blocks.keep_top(scores, np.arange(seq_len - window, dtype=np.int64), budget - window, recent)


@dataclass
class SnapKV(Policy):
    """Observation-window attention, pooled, top-k per layer with a uniform budget."""

    name: ClassVar[str] = "snapkv"
    decodes_by_default: ClassVar[bool] = False
    window_size: int = 32
    kernel_size: int = 5
    pooling: str = "avg"
    decode: bool = False

    def __post_init__(self) -> None:
        blocks.check_int("window_size", self.window_size, 1)
        blocks.check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-length pooling), got {self.kernel_size}")
        blocks.check_choice("pooling", self.pooling, POOLINGS)
        blocks.check_bool("decode", self.decode)

    def request(self, layout: TokenLayout) -> StatRequest:
        T = layout.seq_len
        return StatRequest(query_positions=np.arange(max(0, T - self.window_size), T, dtype=np.int64))

    def select(self, stats: PrefillStats, layout: TokenLayout, keep_ratio: float) -> Selection:
        L, T = stats.num_layers, layout.seq_len
        K = blocks.uniform_budget(T, keep_ratio)
        w = min(self.window_size, K)
        budgets = self.layer_budgets(L, K, w, T)
        scores = window_scores(stats, T, w, self.kernel_size, self.pooling)
        kept = [snap_keep(scores[l], T, w, int(budgets[l])) for l in range(L)]
        return Selection(kept=kept, budgets=budgets, scores=scores, info={"window": np.full(L, w)})

    def layer_budgets(self, num_layers: int, budget: int, window: int, seq_len: int) -> np.ndarray:
        """(L,) kept tokens per layer: SnapKV spends the same budget in every layer."""
        return np.full(num_layers, budget)

    def decode_rule(self, selection: Selection, layout: TokenLayout) -> DecodeRule | None:
        from .decode_rules import PooledRowRule  # torch: imported when a run decodes, not with the policy

        if not self.decode:
            return None
        w = int(selection.info["window"][0])
        return PooledRowRule(selection.budgets.copy(), window=w, kernel_size=self.kernel_size, pooling=self.pooling)
