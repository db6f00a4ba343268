"""The two trivial baselines: `full` (no eviction) and `random` (seeded uniform eviction).

Both ignore attention and modality; sinks are not special. They request no statistics beyond the layer count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..layout import TokenLayout
from ..stats import PrefillStats, StatRequest
from . import blocks
from .base import DecodeRule, Policy, Selection


def _no_stats(layout: TokenLayout) -> StatRequest:
    return StatRequest(query_positions=np.zeros(0, dtype=np.int64), column_sums="none")


@dataclass
class Full(Policy):
    """Full KV cache (the accuracy upper bound): keeps all T prompt tokens in every layer, whatever keep_ratio."""

    name: ClassVar[str] = "full"
    decodes_by_default: ClassVar[bool] = False
    decode: bool = False  # a full cache never evicts; True is rejected

    def __post_init__(self) -> None:
        if blocks.check_bool("decode", self.decode):
            raise ValueError("full never evicts: decode=True is not supported (use another method to evict)")

    def request(self, layout: TokenLayout) -> StatRequest:
        return _no_stats(layout)

    def select(self, stats: PrefillStats, layout: TokenLayout, keep_ratio: float) -> Selection:
        L, T = stats.num_layers, layout.seq_len
        kept = [np.arange(T, dtype=np.int64) for _ in range(L)]
        return Selection(kept=kept, budgets=np.full(L, T), scores=np.full((L, T), np.nan))


@dataclass
class RandomEviction(Policy):
    """Random eviction: each layer keeps round_half_even(keep_ratio * T) (clipped to [1, T]) positions drawn uniformly
    without replacement by `numpy.random.default_rng(seed)`, layer 0 first (deterministic for a given seed).

    decode=True: once a layer exceeds its prefill budget, evict one uniformly drawn slot (not the newest) per step.
    """

    name: ClassVar[str] = "random"
    decodes_by_default: ClassVar[bool] = False
    seed: int = 0
    decode: bool = False

    def __post_init__(self) -> None:
        blocks.check_int("seed", self.seed, 0)
        blocks.check_bool("decode", self.decode)

    def request(self, layout: TokenLayout) -> StatRequest:
        return _no_stats(layout)

    def select(self, stats: PrefillStats, layout: TokenLayout, keep_ratio: float) -> Selection:
        L, T = stats.num_layers, layout.seq_len
        K = blocks.uniform_budget(T, keep_ratio)
        rng = np.random.default_rng(self.seed)
        kept = [np.sort(rng.choice(T, size=K, replace=False)).astype(np.int64) for _ in range(L)]
        return Selection(kept=kept, budgets=np.full(L, K), scores=np.full((L, T), np.nan))

    def decode_rule(self, selection: Selection, layout: TokenLayout) -> DecodeRule | None:
        from .decode_rules import RandomRule  # torch: imported when a run decodes, not with the policy

        return RandomRule(selection.budgets.copy(), seed=self.seed) if self.decode else None
