"""PrefixKV (Wang et al. 2024, "PrefixKV: Adaptive Prefix KV Cache is What Vision Instruction-Following Models Need
for Efficient Generation", arXiv 2412.03409), after the official `prefixkv.py` (THU-MIG/PrefixKV).

Score of a key = its column sum over all prompt queries (head-averaged). Per layer, the scores sorted in descending
order and normalised give a cumulative priority curve cdf_l. A global information-retention threshold m is found by
bisection on [0, 1] so that the forget counts c_l(m) = max(0, T - (searchsorted_left(cdf_l, m) + 1) - (sinks + 1))
add up to within `tolerance` tokens of the target T * L * (1 - keep_ratio); the counts are then rescaled to the
target and truncated: forget_l = int(c_l * target / sum(c)). Eviction per layer is TGV-KV's skeleton (which comes
from PrefixKV): keep the first `sinks` positions and the last one, evict the forget_l lowest scores in between
(ties: lower position first), `blocks.evict_per_layer`.
`layer_ratios` (optional): the paper's offline configuration, per-layer forget fractions averaged over a calibration
set (the official confs/*.json); then forget_l = round_half_even(ratio_l * T) and no search runs.
Decoding (default, as the official code): with S the layer's cache length and N the tokens so far, once
trunc(S - N * (1 - ratio_l)) > 0 (ratio_l = forget_l / T) the slot at the fixed index kept_l + distance (distance < 0;
kept_l // 2 when that is < 1; distance > 0: that absolute index) is evicted, one per step (the "fixed-point
elimination" PrefixKV borrows from ElasticCache, `decode_rules.FixedSlotRule`).
Our choices: the bisection stops after 64 halvings when the tolerance is never met (the official loop runs until
the float interval collapses; the threshold then differs by < 2^-64); arithmetic in float64; the decode slot uses the
kept count (the official uses T - forget_l, the same unless forget_l exceeds the window); distance = 0 (which would
evict the newest token) is rejected and a slot that is not older than the newest token is never evicted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..layout import TokenLayout
from ..stats import PrefillStats, StatRequest
from . import blocks
from .base import DecodeRule, Policy, Selection


def retention_forget_counts(scores: np.ndarray, target: float, protect: int, tolerance: int) -> np.ndarray:
    """(L,) official `obtain_cdf_num` + rescaling: forget counts from a shared cumulative-priority threshold."""
    L, T = scores.shape
    total = scores.sum(axis=1, keepdims=True)
    if np.any(~np.isfinite(total)) or np.any(total <= 0):
        raise ValueError("prefixkv needs positive column sums of attention in every layer")
    cdf = np.cumsum(-np.sort(-scores, axis=1) / total, axis=1)  # (L, T) descending scores, normalised

    def counts(m: float) -> np.ndarray:
        idx = np.array([np.searchsorted(cdf[l], m, side="left") for l in range(L)])
        return np.maximum(0, T - (idx + 1) - protect)

    left, right = 0.0, 1.0
    for _ in range(64):  # official: `while left < right`, i.e. until the interval collapses
        mid = (left + right) / 2.0
        c = counts(mid)
        if abs(c.sum() - target) < tolerance:
            break
        if c.sum() < target:
            right = mid
        else:
            left = mid
    if c.sum() == 0:
        return c.astype(np.int64)
    return (c * target / c.sum()).astype(np.int64)  # truncation, as astype(np.int32) officially


@dataclass
class PrefixKV(Policy):
    """Layer-adaptive prefix budgets from a global cumulative-priority threshold; accumulated-attention ranking."""

    name: ClassVar[str] = "prefixkv"
    decodes_by_default: ClassVar[bool] = True
    sinks: int = 4  # official start_size
    tolerance: int = 5  # bisection stops within this many tokens of the target (official)
    distance: int = -25  # decode eviction slot = kept_l + distance (official)
    layer_ratios: tuple[float, ...] | None = None  # offline per-layer forget fractions (official confs)
    decode: bool = True

    def __post_init__(self) -> None:
        blocks.check_int("sinks", self.sinks, 0)
        blocks.check_int("tolerance", self.tolerance, 1)
        if isinstance(self.distance, bool) or not isinstance(self.distance, (int, np.integer)) or self.distance == 0:
            raise ValueError(f"distance must be a non-zero integer, got {self.distance!r}")
        if self.layer_ratios is not None:
            try:
                r = np.asarray(self.layer_ratios, dtype=np.float64)
            except (TypeError, ValueError):  # strings, dicts, ragged lists: same message as out-of-range values
                r = np.full(0, np.nan)
            if r.ndim != 1 or r.size == 0 or not np.all((r >= 0) & (r < 1)):
                raise ValueError(
                    f"layer_ratios must be forget fractions in [0, 1), one per layer, got {self.layer_ratios!r}"
                )
            self.layer_ratios = tuple(float(x) for x in r)
        blocks.check_bool("decode", self.decode)

    def request(self, layout: TokenLayout) -> StatRequest:
        return StatRequest(query_positions=np.zeros(0, dtype=np.int64), column_sums="all")

    def select(self, stats: PrefillStats, layout: TokenLayout, keep_ratio: float) -> Selection:
        L, T = stats.num_layers, layout.seq_len
        scores = stats.column_sums_for(np.arange(T)).astype(np.float64)  # (L, T)
        if self.layer_ratios is not None:
            if len(self.layer_ratios) != L:
                raise ValueError(f"layer_ratios has {len(self.layer_ratios)} entries but the model has {L} layers")
            ratios = np.array(self.layer_ratios)
            forget = np.round(ratios * T).astype(np.int64)
        else:
            forget = retention_forget_counts(scores, T * L * (1.0 - keep_ratio), self.sinks + 1, self.tolerance)
            ratios = forget / T
        kept = blocks.evict_per_layer(scores, forget, self.sinks)
        budgets = np.array([len(k) for k in kept])
        if self.distance > 0:  # official: an absolute slot index
            slots = np.full(L, self.distance, dtype=np.int64)
        else:  # official: counted back from the end of the kept prompt; half of it when that is < 1
            slots = budgets + self.distance
            slots = np.where(slots >= 1, slots, budgets // 2)
        info = {"layer_ratio": ratios, "forget": forget, "decode_slot": slots}
        return Selection(kept=kept, budgets=budgets, scores=scores, info=info)

    def decode_rule(self, selection: Selection, layout: TokenLayout) -> DecodeRule | None:
        from .decode_rules import FixedSlotRule  # torch: imported when a run decodes, not with the policy

        if not self.decode or not np.any(selection.info["forget"] > 0):
            return None
        return FixedSlotRule(selection.info["layer_ratio"].copy(), selection.info["decode_slot"].copy())
