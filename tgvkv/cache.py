"""A DynamicCache whose layers can hold different numbers of slots after eviction, at the original positions.

Why a subclass: transformers derives positions from `get_seq_length()` (model forward without position ids,
`generate` continuing from a cache), and sizes masks from `get_query_offset()`/the layer's physical length.
Returning the *logical* length (tokens ever appended) from the first and the *physical* one from the second keeps
RoPE positions unshifted after eviction, with plain `model(...)` and plain `generate(...)` alike.
Evicted tensors are really freed: eviction writes new compact tensors (`index_select`), never views.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from transformers import DynamicCache

from .capture import Recorder
from .policies.base import DecodeRule


class EvictingCache(DynamicCache):
    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        n = len(self.layers)
        self.logical_lengths: list[int] = [0] * n  # tokens ever appended, per layer
        self.slot_positions: list[torch.Tensor | None] = [None] * n  # (S_l,) original position of every slot
        self.decode_rule: DecodeRule | None = None
        self.recorder: Recorder | None = None  # source of decode-time attention rows
        self._evictions: list[tuple[int, int, torch.Tensor]] = []  # (logical length, layer, position tensor)
        self._spill: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # sliding layer -> K/V of the slot last pushed out

    # -- lengths -----------------------------------------------------------------------------------------------
    def _grow_to(self, layer_idx: int) -> None:
        while len(self.logical_lengths) <= layer_idx:  # layers created lazily (no config given)
            self.logical_lengths.append(0)
            self.slot_positions.append(None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Logical length: prompt + generated tokens, whatever was evicted (drives positions)."""
        if layer_idx >= len(self.layers):
            return 0
        return self.logical_lengths[layer_idx] if layer_idx < len(self.logical_lengths) else 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Physical length (where the new queries sit inside this layer's keys, for mask building)."""
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def physical_lengths(self) -> list[int]:
        """Slots held per layer (a sliding-window layer's get_seq_length() is its logical length, not its size)."""
        return [layer.keys.shape[-2] if getattr(layer, "is_initialized", False) and layer.keys is not None else 0 for layer in self.layers]

    def evictable(self, layer_idx: int) -> bool:
        """Sliding-window layers (Gemma 3, ...) manage their own window; only full-attention layers are evicted."""
        return not getattr(self.layers[layer_idx], "is_sliding", False)

    # -- appending ---------------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self._grow_to(layer_idx)
        if layer_idx < len(self.layers):
            self._apply_decode_rule(layer_idx)
        n_new = key_states.shape[-2]
        start = self.logical_lengths[layer_idx]
        new_pos = torch.arange(start, start + n_new, device=key_states.device)
        old = self.slot_positions[layer_idx]
        self.slot_positions[layer_idx] = new_pos if old is None else torch.cat([old, new_pos])
        self.logical_lengths[layer_idx] += n_new
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        if getattr(layer, "is_sliding", False):
            held = layer.keys.shape[-2]
            self.slot_positions[layer_idx] = self.slot_positions[layer_idx][-held:]
            if keys.shape[-2] > held:  # the slot that just left the window: drop_last() needs it back
                self._spill[layer_idx] = (keys[..., -held - 1 : -held, :].clone(), values[..., -held - 1 : -held, :].clone())
        return keys, values

    # -- eviction ----------------------------------------------------------------------------------------------
    def keep_slots(self, layer_idx: int, slots: torch.Tensor) -> None:
        """Keep only the given slot indices (sorted) of a layer; the old tensors are released."""
        layer = self.layers[layer_idx]
        slots = slots.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, slots)
        layer.values = layer.values.index_select(-2, slots)
        self.slot_positions[layer_idx] = self.slot_positions[layer_idx].index_select(0, slots)

    def keep_positions(self, kept: Sequence[np.ndarray]) -> None:
        """Prefill eviction: keep, per layer, the slots holding the given original positions."""
        if len(kept) != len(self.layers):
            raise ValueError(f"selection has {len(kept)} layers but the cache has {len(self.layers)}")
        for l, positions in enumerate(kept):
            if not self.evictable(l):
                continue
            current = self.slot_positions[l].cpu().numpy()
            slots = np.searchsorted(current, positions)
            if np.any(slots >= len(current)) or np.any(current[np.minimum(slots, len(current) - 1)] != positions):
                raise ValueError(f"layer {l}: some kept positions are not in the cache")
            self.keep_slots(l, torch.as_tensor(slots, dtype=torch.long))

    def drop_last(self) -> None:
        """Remove the newest token from every layer and the logical length (to re-run it on the evicted cache)."""
        for l, layer in enumerate(self.layers):
            last = self.logical_lengths[l] - 1
            if self.evictable(l):
                keep = torch.nonzero(self.slot_positions[l] != last).flatten()
                self.keep_slots(l, keep)
            else:  # sliding window: the slot that left the window when the newest token came in comes back
                keys, values, pos = layer.keys[..., :-1, :], layer.values[..., :-1, :], self.slot_positions[l][:-1]
                spill = self._spill.pop(l, None)
                if spill is not None:
                    keys, values = torch.cat([spill[0], keys], dim=-2), torch.cat([spill[1], values], dim=-2)
                    pos = torch.cat([pos[:1] - 1, pos]) if len(pos) else pos
                layer.keys, layer.values = keys.clone(), values.clone()
                self.slot_positions[l] = pos
                if hasattr(layer, "cumulative_length"):
                    layer.cumulative_length -= 1
            self.logical_lengths[l] = last

    def _apply_decode_rule(self, layer_idx: int) -> None:
        """Evict (at most one slot) from the attention the previous single-token forward recorded for this layer."""
        rec, rule = self.recorder, self.decode_rule
        if rec is None or rule is None or not self.evictable(layer_idx):
            return
        row = rec.decode_rows.pop(layer_idx, None)
        if row is None:
            return
        cache_len = self.layers[layer_idx].get_seq_length()
        if row.shape[0] != cache_len:
            raise RuntimeError(f"layer {layer_idx}: attention row covers {row.shape[0]} slots, cache has {cache_len}")
        slot = rule.victim(layer_idx, row, cache_len, self.logical_lengths[layer_idx])
        if slot is None:
            return
        idx = torch.arange(cache_len - 1, device=row.device)
        idx = idx + (idx >= slot).long()  # every slot but `slot`, computed on device (no host sync)
        self._evictions.append((self.logical_lengths[layer_idx], layer_idx, self.slot_positions[layer_idx][slot]))
        self.keep_slots(layer_idx, idx)
        rule.evicted(layer_idx, slot)

    def flush_decode_evictions(self) -> None:
        """Apply decode evictions still pending from the last forward (so final sizes match the official code)."""
        if self.recorder is None:
            return
        for l in sorted(self.recorder.decode_rows):
            self._apply_decode_rule(l)

    def eviction_log(self) -> np.ndarray:
        """(E, 3) int64 rows of (logical length N when evicted, layer, evicted position)."""
        if not self._evictions:
            return np.zeros((0, 3), dtype=np.int64)
        pos = torch.stack([p for _, _, p in self._evictions]).cpu().numpy()
        return np.array([[s, l, int(p)] for (s, l, _), p in zip(self._evictions, pos)], dtype=np.int64)

    # -- memory ------------------------------------------------------------------------------------------------
    def kv_bytes(self) -> np.ndarray:
        """(L,) bytes of K+V storage per layer, measured from the tensors' allocations (catches views)."""
        out = []
        for layer in self.layers:
            if not getattr(layer, "is_initialized", False) or layer.keys is None:
                out.append(0)
            else:
                out.append(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes())
        return np.array(out, dtype=np.int64)
