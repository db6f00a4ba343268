"""Probes: cache edits that answer "where does the answer's information live?", not eviction methods.

`text-only` drops every image token's KV after prefill and keeps every text token, in every layer, whatever the
keep ratio. If a model still answers from that cache, the image information reached the answer through the text
tokens' KV (what deep VLMs do, and what lets text-grounded eviction keep so little image KV).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..layout import TokenLayout
from ..stats import PrefillStats, StatRequest
from .base import Kind, Policy, Selection


@dataclass
class TextOnly(Policy):
    """Keep all text KV and no image KV (the keep ratio is ignored); no decode-time eviction."""

    name: ClassVar[str] = "text-only"
    kind: ClassVar[Kind] = "probe"
    decodes_by_default: ClassVar[bool] = False

    def request(self, layout: TokenLayout) -> StatRequest:
        return StatRequest(query_positions=np.zeros(0, dtype=np.int64), column_sums="none")

    def select(self, stats: PrefillStats, layout: TokenLayout, keep_ratio: float) -> Selection:
        L, T = stats.num_layers, layout.seq_len
        text = np.asarray(layout.text_positions, dtype=np.int64)
        return Selection(kept=[text.copy() for _ in range(L)], budgets=np.full(L, len(text)),
                         scores=np.full((L, T), np.nan))
