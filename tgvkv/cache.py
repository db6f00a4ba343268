"""A KV cache whose layers can drop slots (evict) and keep decoding at the original positions.

Layer/Cache split as in transformers' `cache_utils`: the state and the operations on it live in one object per layer
(`EvictingLayer`, a `DynamicLayer`; `EvictingSlidingLayer` for the sliding-window layers of hybrid models such as
Gemma 3, which keep their own window and are never evicted); `EvictingCache` is a thin `Cache` over them.

Positions: transformers derives positions from `get_seq_length()` (model forward without position ids, `generate`
continuing from a cache) and sizes masks from the layer's `get_mask_sizes()` / the cache's `get_query_offset()`.
A layer reports its *logical* length (tokens ever appended) from the first and its *physical* length (slots held)
from the others, so RoPE positions are never shifted by eviction, with plain `model(...)` and plain `generate(...)`
alike. Evicted tensors are really freed: eviction writes new compact tensors (`index_select`), never views.

Decode-time eviction is explicit: after each single-token forward, `EvictingCache.evict_by_rule(rows)` hands every
layer the attention row its query produced, and the layer's `LayerDecodeRule` names at most one slot to drop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from .policies.base import DecodeRule


@dataclass
class Eviction:
    """One slot a decode rule dropped: when (logical length at that moment), where (layer), what (its position)."""

    logical_length: int
    layer: int
    position: torch.Tensor  # 0-d, on the cache's device (read back only when the log is asked for: no host sync)


@dataclass
class LayerDecodeRule:
    """A policy's decode rule as one cache layer sees it: ``index`` is the layer's index in the policy's selection
    (the evictable layers only, so a hybrid model's layer l may be the policy's layer j < l)."""

    rule: DecodeRule
    index: int

    def victim(self, attn_row: torch.Tensor, cache_len: int, logical_len: int) -> int | None:
        return self.rule.victim(self.index, attn_row, cache_len, logical_len)

    def evicted(self, slot: int) -> None:
        self.rule.evicted(self.index, slot)


class _SlotStorage:
    """What both layer kinds measure the same way: slots held and bytes allocated."""

    keys: torch.Tensor | None
    values: torch.Tensor | None
    is_initialized: bool

    def physical_length(self) -> int:
        """Slots held (where the new queries sit inside this layer's keys)."""
        return self.keys.shape[-2] if self.is_initialized and self.keys is not None else 0

    def kv_bytes(self) -> int:
        """Bytes of K+V storage, measured from the tensors' allocations (catches views)."""
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()


class EvictingLayer(_SlotStorage, DynamicLayer):
    """A full-attention layer whose slots remember their original positions, so that any of them can be dropped."""

    evictable = True

    def __init__(self, layer_idx: int = 0, **kwargs: Any):
        super().__init__()
        self.layer_idx = layer_idx
        self.logical_length = 0  # tokens ever appended: drives positions
        self.positions: torch.Tensor | None = None  # (S,) original position of every slot
        self.decode_rule: LayerDecodeRule | None = None
        self.evictions: list[Eviction] = []

    # -- lengths -----------------------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        """Logical length: prompt + generated tokens, whatever was evicted (drives positions)."""
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.physical_length() + query_length, 0

    def query_offset(self) -> int:
        """Where the new queries sit inside this layer's keys (mask building): after the slots held."""
        return self.physical_length()

    # -- appending ---------------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        n_new = key_states.shape[-2]  # key_states: (B, H_kv, n_new, D)
        new = torch.arange(self.logical_length, self.logical_length + n_new, device=key_states.device)
        self.positions = new if self.positions is None else torch.cat([self.positions, new])
        self.logical_length += n_new
        return super().update(key_states, value_states)

    # -- eviction ----------------------------------------------------------------------------------------------
    def evict(self, keep: torch.Tensor) -> None:
        """Keep only the slots ``keep`` (sorted slot indices); the old tensors are released."""
        keep = keep.to(self.keys.device)
        self.keys = self.keys.index_select(-2, keep)
        self.values = self.values.index_select(-2, keep)
        self.positions = self.positions.index_select(0, keep)

    def keep_positions(self, positions: np.ndarray) -> None:
        """Prefill eviction: keep the slots holding the given original positions (sorted)."""
        current = self.positions.cpu().numpy()
        slots = np.searchsorted(current, positions)
        if np.any(slots >= len(current)) or np.any(current[np.minimum(slots, len(current) - 1)] != positions):
            raise ValueError(f"layer {self.layer_idx}: some kept positions are not in the cache")
        self.evict(torch.as_tensor(slots, dtype=torch.long))

    def drop_last(self) -> None:
        """Remove the newest token (to re-run it on the evicted cache)."""
        last = self.logical_length - 1
        self.evict(torch.nonzero(self.positions != last).flatten())
        self.logical_length = last

    def evict_by_rule(self, attn_row: torch.Tensor) -> None:
        """Drop the slot (if any) the decode rule picks from the newest query's attention row (S,) over this layer."""
        if self.decode_rule is None:
            return
        cache_len = self.physical_length()
        if attn_row.shape[0] != cache_len:
            raise RuntimeError(f"layer {self.layer_idx}: attention row covers {attn_row.shape[0]} slots, "
                               f"cache has {cache_len}")
        slot = self.decode_rule.victim(attn_row, cache_len, self.logical_length)
        if slot is None:
            return
        keep = torch.arange(cache_len - 1, device=attn_row.device)
        keep = keep + (keep >= slot).long()  # every slot but `slot`, computed on device (no host sync)
        self.evictions.append(Eviction(self.logical_length, self.layer_idx, self.positions[slot]))
        self.evict(keep)
        self.decode_rule.evicted(slot)


class EvictingSlidingLayer(_SlotStorage, DynamicSlidingWindowLayer):
    """A sliding-window layer (never evicted) that tracks its slots' positions and can take back its newest token."""

    evictable = False
    decode_rule = None

    def __init__(self, sliding_window: int, layer_idx: int = 0, **kwargs: Any):
        super().__init__(sliding_window=sliding_window)
        self.layer_idx = layer_idx
        self.positions: torch.Tensor | None = None
        self.evictions: list[Eviction] = []
        self._spill: tuple[torch.Tensor, torch.Tensor] | None = None  # K/V of the slot last pushed out of the window

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        start = self.cumulative_length
        new = torch.arange(start, start + key_states.shape[-2], device=key_states.device)
        keys, values = super().update(key_states, value_states)
        held = self.keys.shape[-2]
        self.positions = (new if self.positions is None else torch.cat([self.positions, new]))[-held:]
        if keys.shape[-2] > held:  # the slot that just left the window: drop_last() needs it back
            self._spill = (keys[..., -held - 1 : -held, :].clone(), values[..., -held - 1 : -held, :].clone())
        return keys, values

    def query_offset(self) -> int:
        """As transformers' sliding layers have it: the tokens seen (their masks are offset by the window)."""
        return self.get_seq_length()

    def drop_last(self) -> None:
        """Remove the newest token; the slot that left the window when it came in comes back."""
        keys, values, pos = self.keys[..., :-1, :], self.values[..., :-1, :], self.positions[:-1]
        if self._spill is not None:
            keys, values = torch.cat([self._spill[0], keys], dim=-2), torch.cat([self._spill[1], values], dim=-2)
            pos = torch.cat([pos[:1] - 1, pos]) if len(pos) else pos
            self._spill = None
        self.keys, self.values, self.positions = keys.clone(), values.clone(), pos
        self.cumulative_length -= 1

    def evict_by_rule(self, attn_row: torch.Tensor) -> None:
        raise RuntimeError(f"layer {self.layer_idx} keeps its own sliding window and is never evicted")


_SLIDING_TYPES = ("sliding_attention", "chunked_attention")  # same cache behaviour, different masks


def _layers_for(config: Any) -> list[EvictingLayer | EvictingSlidingLayer]:
    layer_types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    layers = []
    for l, (kind, kw) in enumerate(zip(layer_types, kwargs)):
        if kind == "full_attention":
            layers.append(EvictingLayer(layer_idx=l))
        elif kind in _SLIDING_TYPES:
            layers.append(EvictingSlidingLayer(layer_idx=l, **kw))
        else:
            raise ValueError(f"language layer {l} is of type {kind!r}, which keeps no per-token KV cache to evict")
    return layers


class EvictingCache(Cache):
    """Thin `Cache` over evicting layers: dispatches the cache-wide operations and collects per-layer records."""

    def __init__(self, config: Any = None):
        if config is None:  # layers created lazily, all full-attention
            super().__init__(layer_class_to_replicate=EvictingLayer)
        else:
            super().__init__(layers=_layers_for(config))

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.layer_class_to_replicate is not None:  # lazily created layers learn their index
            while len(self.layers) <= layer_idx:
                self.layers.append(EvictingLayer(layer_idx=len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Where the new queries sit inside this layer's keys, for mask building (an evicting layer: its physical length)."""
        return self.layers[layer_idx].query_offset() if layer_idx < len(self.layers) else 0

    def evictable(self, layer_idx: int) -> bool:
        """Sliding-window layers (Gemma 3, ...) manage their own window; only full-attention layers are evicted."""
        return self.layers[layer_idx].evictable

    def evictable_layers(self) -> np.ndarray:
        """(L,) bool."""
        return np.array([layer.evictable for layer in self.layers], dtype=bool)

    def physical_lengths(self) -> list[int]:
        return [layer.physical_length() for layer in self.layers]

    def kv_bytes(self) -> np.ndarray:
        """(L,) bytes of K+V storage per layer, measured from the tensors' allocations."""
        return np.array([layer.kv_bytes() for layer in self.layers], dtype=np.int64)

    # -- eviction ----------------------------------------------------------------------------------------------
    def keep_positions(self, kept: Sequence[np.ndarray]) -> None:
        """Prefill eviction: keep, per evictable layer, the slots holding the given original positions."""
        if len(kept) != len(self.layers):
            raise ValueError(f"selection has {len(kept)} layers but the cache has {len(self.layers)}")
        for layer, positions in zip(self.layers, kept):
            if layer.evictable:
                layer.keep_positions(positions)

    def drop_last(self) -> None:
        """Remove the newest token from every layer and the logical length (to re-run it on the evicted cache)."""
        for layer in self.layers:
            layer.drop_last()

    def attach_decode_rule(self, rule: DecodeRule | None) -> None:
        """Give every evictable layer its view of the policy's decode rule (the policy indexes evictable layers only)."""
        evictable = [layer for layer in self.layers if layer.evictable]
        for j, layer in enumerate(evictable):
            layer.decode_rule = None if rule is None else LayerDecodeRule(rule, j)

    def evict_by_rule(self, rows: Mapping[int, torch.Tensor]) -> None:
        """Decode-time eviction after a single-token forward: ``rows`` maps layer -> its query's attention row (S,)."""
        for l in sorted(rows):
            if self.layers[l].evictable:
                self.layers[l].evict_by_rule(rows[l])

    def eviction_log(self) -> np.ndarray:
        """(E, 3) int64 rows of (logical length N when evicted, layer, evicted position), in the order they happened."""
        events = sorted((e for layer in self.layers for e in layer.evictions), key=lambda e: (e.logical_length, e.layer))
        if not events:
            return np.zeros((0, 3), dtype=np.int64)
        positions = torch.stack([e.position for e in events]).cpu().numpy()
        return np.array([[e.logical_length, e.layer, int(p)] for e, p in zip(events, positions)], dtype=np.int64)
