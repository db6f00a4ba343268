"""The evicting cache's layers on their own: positions, lengths, eviction, the decode rule, the log, bytes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from tgvkv.cache import EvictingCache, EvictingLayer, EvictingSlidingLayer
from tgvkv.policies.base import DecodeRule


def kv(n: int, start: int = 0, heads: int = 2, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, H, n, D) keys whose every entry is its position (so slots can be read back), values = -keys."""
    k = torch.arange(start, start + n, dtype=torch.float32)[None, None, :, None].expand(1, heads, n, dim).clone()
    return k, -k


def held_positions(layer) -> list[int]:
    return layer.keys[0, 0, :, 0].long().tolist()


class DropArgmin(DecodeRule):
    """Drops the least-attended slot once the layer holds more than `cap` slots; records what it was told."""

    def __init__(self, cap: int):
        self.cap, self.told = cap, []

    def victim(self, layer, attn_row, cache_len, logical_len):
        return int(torch.argmin(attn_row)) if cache_len > self.cap else None

    def evicted(self, layer, slot):
        self.told.append((layer, int(slot)))


def test_layer_keeps_original_positions_through_eviction():
    layer = EvictingLayer(layer_idx=3)
    layer.update(*kv(10))
    layer.keep_positions(np.array([0, 2, 5, 9]))
    assert held_positions(layer) == [0, 2, 5, 9]
    assert layer.positions.tolist() == [0, 2, 5, 9]
    assert (layer.get_seq_length(), layer.physical_length()) == (10, 4)  # logical drives RoPE, physical the mask
    assert layer.get_mask_sizes(1) == (5, 0)
    layer.update(*kv(2, start=10))
    assert layer.positions.tolist() == [0, 2, 5, 9, 10, 11] and held_positions(layer) == [0, 2, 5, 9, 10, 11]
    assert layer.kv_bytes() == 2 * 1 * 2 * 6 * 4 * 4  # K+V, (1, 2, 6, 4) float32: compact, not a view
    with pytest.raises(ValueError, match="layer 3: some kept positions are not in the cache"):
        layer.keep_positions(np.array([0, 1]))


def test_drop_last_takes_back_the_newest_token():
    layer = EvictingLayer()
    layer.update(*kv(6))
    layer.keep_positions(np.array([0, 4, 5]))
    layer.drop_last()
    assert layer.positions.tolist() == [0, 4] and layer.get_seq_length() == 5


def test_decode_rule_drops_one_slot_per_call_and_logs_it():
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=8, num_attention_heads=2, num_key_value_heads=2)
    cache = EvictingCache(config=cfg)
    for l in range(2):
        cache.update(*kv(5), layer_idx=l)
    rule = DropArgmin(cap=4)
    cache.attach_decode_rule(rule)
    row = torch.tensor([0.3, 0.1, 0.2, 0.25, 0.15])  # slot 1 (position 1) is the least attended
    cache.evict_by_rule({1: row, 0: row.flip(0)})  # layer 0: slot 3 after the flip
    assert cache.physical_lengths() == [4, 4] and cache.get_seq_length(0) == 5
    assert held_positions(cache.layers[0]) == [0, 1, 2, 4] and held_positions(cache.layers[1]) == [0, 2, 3, 4]
    assert rule.told == [(0, 3), (1, 1)]
    cache.evict_by_rule({0: torch.ones(4)})  # at the cap: nothing to drop
    assert cache.eviction_log().tolist() == [[5, 0, 3], [5, 1, 1]]
    with pytest.raises(RuntimeError, match="layer 1: attention row covers 3 slots, cache has 4"):
        cache.evict_by_rule({1: torch.ones(3)})


def test_hybrid_cache_builds_sliding_layers_that_are_never_evicted():
    cfg = LlamaConfig(num_hidden_layers=3, hidden_size=8, num_attention_heads=2, num_key_value_heads=2)
    cfg.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    cfg.sliding_window = 4
    cache = EvictingCache(config=cfg)
    assert [type(layer) for layer in cache.layers] == [EvictingSlidingLayer, EvictingLayer, EvictingSlidingLayer]
    assert cache.evictable_layers().tolist() == [False, True, False]
    for l in range(3):
        cache.update(*kv(6), layer_idx=l)
    assert cache.physical_lengths() == [3, 6, 3]  # the window keeps sliding_window - 1 slots
    assert cache.layers[0].positions.tolist() == [3, 4, 5]
    cache.keep_positions([np.arange(6), np.array([0, 5]), np.arange(6)])  # sliding layers ignore the selection
    assert cache.physical_lengths() == [3, 2, 3]
    cache.drop_last()  # the slot that left the window when position 5 came in comes back
    assert cache.layers[0].positions.tolist() == [2, 3, 4] and held_positions(cache.layers[0]) == [2, 3, 4]
    assert cache.get_seq_length(0) == 5 and cache.get_seq_length(1) == 5 and cache.layers[1].positions.tolist() == [0]
    # masks: a sliding layer's queries sit after the tokens seen (transformers' rule), an evicted one's after its slots
    assert (cache.get_query_offset(0), cache.get_query_offset(1)) == (5, 1)
    rule = DropArgmin(cap=0)
    cache.attach_decode_rule(rule)  # the policy indexes the evictable layers only: model layer 1 is its layer 0
    cache.evict_by_rule({0: torch.ones(3), 1: torch.ones(1)})
    assert rule.told == [(0, 0)] and cache.physical_lengths() == [3, 0, 3]
