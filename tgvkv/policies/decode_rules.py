"""Decode-time eviction rules: after each decode forward, at most one slot per layer is evicted.

Two budgets:
- growing (TGV-KV's official rule, and PrefixKV's): a layer's cache may hold N * (1 - ratio_l) slots, N the tokens
  so far, so it grows with the text; `OfficialDecodeRule` (every TGV-KV configuration) and `FixedSlotRule` (PrefixKV);
- fixed (ours for the baselines, kvpress-style and what StreamingLLM / H2O describe: a fixed-size cache): each layer
  keeps at most its prefill budget; a layer whose cache holds more slots than that evicts exactly one.
Slots are in position order (kept prompt positions, then generated tokens), never renumbered. All work stays on the
row's device; victims are returned as 0-d long tensors without host synchronisation. The policies import this module
only when a run decodes: it is the one part of `tgvkv.policies` that needs torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import blocks
from .base import DecodeRule


@dataclass
class OfficialDecodeRule(DecodeRule):
    """TGV-KV's official rule (every configuration of `TGVKV`): one lowest-attention eviction per step in each layer
    whose cache exceeds N * (1 - ratio_l), searched in the slots after the sinks and before the protected suffix."""

    ratios: np.ndarray  # (L,) official forget fractions, float32 as the official code stores them
    protected: np.ndarray  # (L,) protected suffix P_l (never updated during decoding, as the official code)
    sinks: int = blocks.OFFICIAL_SINKS

    def __post_init__(self) -> None:
        self.ratios = np.asarray(self.ratios, dtype=np.float32)

    def victim(self, layer: int, attn_row: torch.Tensor, cache_len: int, logical_len: int) -> torch.Tensor | None:
        ratio = self.ratios[layer]
        if ratio <= 0:
            return None
        forget = blocks.official_decode_forget(cache_len, logical_len, ratio)  # float32 as the official, truncated
        end = cache_len - int(self.protected[layer])
        if forget <= 0 or end <= self.sinks:
            return None
        return self.sinks + torch.argmin(attn_row[self.sinks : end])  # first minimum on ties


@dataclass
class FixedSlotRule(DecodeRule):
    """PrefixKV: evict the slot at a fixed cache index while trunc(S - N * (1 - ratio_l)) > 0 (float64, as the
    official PrefixKV code; it borrows this "fixed-point elimination" from ElasticCache)."""

    ratios: np.ndarray  # (L,) forget fractions
    slots: np.ndarray  # (L,) fixed eviction index per layer

    def victim(self, layer: int, attn_row: torch.Tensor, cache_len: int, logical_len: int) -> torch.Tensor | None:
        forget = int(cache_len - logical_len * (1.0 - float(self.ratios[layer])))
        slot = int(self.slots[layer])
        if forget <= 0 or not 0 <= slot < cache_len - 1:
            return None
        return torch.tensor(slot, dtype=torch.long, device=attn_row.device)


@dataclass
class FixedBudgetRule(DecodeRule):
    """Base: evict one slot from a layer whose cache exceeds budgets[layer]; subclasses pick the slot."""

    budgets: np.ndarray  # (L,) maximum cache slots per layer (the prefill budget)

    def victim(self, layer: int, attn_row: torch.Tensor, cache_len: int, logical_len: int) -> torch.Tensor | None:
        self._observe(layer, attn_row, cache_len)
        if cache_len <= int(self.budgets[layer]):
            return None
        return self._pick(layer, attn_row, cache_len)

    def _observe(self, layer: int, attn_row: torch.Tensor, cache_len: int) -> None:
        """Hook called on every step (also under budget), for stateful rules."""

    def _pick(self, layer: int, attn_row: torch.Tensor, cache_len: int) -> torch.Tensor | None:
        raise NotImplementedError


@dataclass
class RecencyRule(FixedBudgetRule):
    """StreamingLLM: evict the oldest slot after the attention sinks (slot index `sinks[layer]`)."""

    sinks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (L,) sinks kept per layer

    def _pick(self, layer: int, attn_row: torch.Tensor, cache_len: int) -> torch.Tensor | None:
        s = int(self.sinks[layer])
        if s >= cache_len - 1:  # nothing but sinks and the newest token
            return None
        return torch.tensor(s, dtype=torch.long, device=attn_row.device)


@dataclass
class AccumulatedRule(FixedBudgetRule):
    """H2O: accumulated attention per slot (prefill column sums + every decode row); evict the lowest outside the
    `recent[layer]` most recent slots (first minimum on ties)."""

    initial: list[np.ndarray] = field(default_factory=list)  # per layer: accumulated attention of the kept slots
    recent: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (L,)
    _acc: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def _observe(self, layer: int, attn_row: torch.Tensor, cache_len: int) -> None:
        acc = self._acc.get(layer)
        if acc is None:
            acc = torch.as_tensor(self.initial[layer], dtype=attn_row.dtype, device=attn_row.device)
        grow = cache_len - acc.shape[0]
        if grow < 0:
            raise RuntimeError(f"layer {layer}: cache has {cache_len} slots but H2O tracks {acc.shape[0]}")
        acc = torch.cat([acc, acc.new_zeros(grow)]) + attn_row[:cache_len]
        self._acc[layer] = acc

    def _pick(self, layer: int, attn_row: torch.Tensor, cache_len: int) -> torch.Tensor | None:
        end = cache_len - int(self.recent[layer])
        if end <= 0:
            return None
        return torch.argmin(self._acc[layer][:end])

    def evicted(self, layer: int, slot: torch.Tensor) -> None:
        acc = self._acc[layer]
        idx = torch.arange(acc.shape[0] - 1, device=acc.device)
        self._acc[layer] = acc[idx + (idx >= slot).long()]  # drop `slot` without a host sync


@dataclass
class PooledRowRule(FixedBudgetRule):
    """SnapKV / PyramidKV with decode=True (our extension: the papers compress only the prompt): the newest query is
    the observation window; evict the slot with the lowest pooled attention outside the `window` newest slots."""

    window: int = 1
    kernel_size: int = 1
    pooling: str = "avg"

    def _pick(self, layer: int, attn_row: torch.Tensor, cache_len: int) -> torch.Tensor | None:
        end = cache_len - self.window
        if end <= 0:
            return None
        x = attn_row[:end].float()[None, None]  # (1, 1, end)
        pad = self.kernel_size // 2
        if self.pooling == "avg":
            pooled = F.avg_pool1d(x, self.kernel_size, stride=1, padding=pad)
        else:
            pooled = F.max_pool1d(x, self.kernel_size, stride=1, padding=pad)
        return torch.argmin(pooled[0, 0])


@dataclass
class RandomRule(FixedBudgetRule):
    """Random with decode=True: evict a uniformly drawn slot other than the newest (seeded, per device)."""

    seed: int = 0
    _gen: dict[str, torch.Generator] = field(default_factory=dict, repr=False)

    def _pick(self, layer: int, attn_row: torch.Tensor, cache_len: int) -> torch.Tensor | None:
        if cache_len < 2:
            return None
        key = str(attn_row.device)
        if key not in self._gen:
            self._gen[key] = torch.Generator(device=attn_row.device).manual_seed(self.seed)
        return torch.randint(0, cache_len - 1, (), generator=self._gen[key], device=attn_row.device)
