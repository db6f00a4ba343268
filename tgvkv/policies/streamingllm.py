"""StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453).

Keep the first `sinks` tokens (attention sinks) and the most recent tokens: with budget K = round_half_even(
keep_ratio * T) clipped to [1, T], each layer keeps positions [0, s) and [T - (K - s), T) with s = min(sinks, K - 1)
(our choice for tiny budgets: the last prompt token always survives). Same set in every layer; attention unused.
Decoding (default, a rolling cache by nature): the cache stays at K slots per layer; once over, the oldest
non-sink slot is evicted (one per step).
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
class StreamingLLM(Policy):
    """Attention sinks + recent window (modality-blind)."""

    name: ClassVar[str] = "streamingllm"
    decodes_by_default: ClassVar[bool] = True
    sinks: int = 4  # the paper's 4 initial tokens
    decode: bool = True

    def __post_init__(self) -> None:
        blocks.check_int("sinks", self.sinks, 0)
        blocks.check_bool("decode", self.decode)

    def request(self, layout: TokenLayout) -> StatRequest:
        return StatRequest(query_positions=np.zeros(0, dtype=np.int64), column_sums="none")

    def select(self, stats: PrefillStats, layout: TokenLayout, keep_ratio: float) -> Selection:
        L, T = stats.num_layers, layout.seq_len
        K = blocks.uniform_budget(T, keep_ratio)
        s = min(self.sinks, K - 1)
        kept = np.union1d(np.arange(s), np.arange(T - (K - s), T)).astype(np.int64)
        scores = np.broadcast_to(np.arange(T, dtype=np.float64), (L, T)).copy()  # recency = position
        scores[:, :s] = np.inf
        return Selection(
            kept=[kept.copy() for _ in range(L)], budgets=np.full(L, K), scores=scores, info={"sinks": np.full(L, s)}
        )

    def decode_rule(self, selection: Selection, layout: TokenLayout) -> DecodeRule | None:
        from .decode_rules import RecencyRule  # torch: imported when a run decodes, not with the policy

        if not self.decode:
            return None
        return RecencyRule(selection.budgets.copy(), sinks=selection.info["sinks"].copy())
