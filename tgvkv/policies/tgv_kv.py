"""TGV-KV (arXiv 2606.03075), faithful to the official `kv_caches/tgv_kv.py` selection rule.

TVB: per-layer budgets in proportion to the layer's text->vision attention mass.
TWR: a vision token's score is sum_q TI[q, v] * w_q, each text query weighted by the attention it receives itself.
TPR: text positions score (column sum over all queries) + 100, so they are evicted only after the window's vision.

Official quirks reproduced on purpose (see ../shared/docs/tgvkv.md, section 3):
- budgets are not redistributed: a layer whose share exceeds T keeps T and the surplus is lost;
- forget counts use round-half-even at prefill but truncation at decode;
- 4 sinks and the last prompt token are always kept, so at least 5 tokens survive;
- nothing is evicted at all when int(T - T * keep_ratio) <= 0 (fewer than one token to prune);
- the +100 text offset is a soft priority (a vision score above 100 would outrank text);
- at decode, exactly one slot per over-budget layer and step, the protected suffix P_l is never updated.
- the layer ratios are stored as float32 and the decode rule computes N * (1 - ratio_l) in float32, as the official
  code does (see `blocks.official_decode_forget`).
Deviation: scores and ratios are computed in float64 from the captured float32 statistics, while the official code
computes them in the model dtype (its bf16 makes text scores tie); see docs/policies.md.
Generalisation to several images: all vision tokens are "vision", the text queries are the text positions after the
first vision token, and the protected suffix counts kept positions after the last vision token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..layout import TokenLayout
from ..stats import PrefillStats, StatRequest
from . import blocks
from .base import DecodeRule, Policy, Selection
from .official_dtype import DTYPES, official_scores

if TYPE_CHECKING:
    import torch

PRECISIONS = ("float64", "model", *DTYPES)


@dataclass
class OfficialDecodeRule(DecodeRule):
    """One lowest-attention eviction per step in each layer whose cache exceeds N * (1 - ratio_l)."""

    ratios: np.ndarray  # (L,) official forget fractions, float32 as the official code stores them
    protected: np.ndarray  # (L,) protected suffix P_l
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
        return self.sinks + attn_row[self.sinks : end].argmin()  # first minimum on ties


@dataclass
class TGVKV(Policy):
    """Text-grounded KV eviction: TVB budgets, TWR ranking, TPR text-first retention (official rule)."""

    name: ClassVar[str] = "tgv-kv"
    decodes_by_default: ClassVar[bool] = True

    sinks: int = blocks.OFFICIAL_SINKS
    text_offset: float = blocks.OFFICIAL_TEXT_OFFSET
    decode: bool = True  # also evict during decoding (official)
    # "float64": scores and ratios in float64 from float32 statistics (exact arithmetic; the default).
    # "model": the official code's arithmetic in the model's dtype (bf16 / fp16 / fp32): statistics captured in it
    # (head mean of per-head probabilities rounded to it) and every score / ratio operation rounded to it, so text
    # scores tie and budgets are quantised as in the official code. "bfloat16" / "float16" / "float32": the same
    # arithmetic in a named dtype (for `tgvkv.select` on given matrices, which are rounded to it first).
    precision: str = "float64"

    def __post_init__(self) -> None:
        blocks.check_int("sinks", self.sinks, 0)
        blocks.check_number("text_offset", self.text_offset, 0)
        blocks.check_bool("decode", self.decode)
        blocks.check_choice("precision", self.precision, PRECISIONS)

    def request(self, layout: TokenLayout) -> StatRequest:
        _require_vision(layout, self.name)
        return StatRequest(query_positions=layout.text_query_positions, column_sums="text",
                           model_dtype=self.precision == "model")

    def _dtype(self, stats: PrefillStats) -> str | None:
        """The dtype whose arithmetic is emulated (None: float64)."""
        if self.precision == "float64":
            return None
        if self.precision != "model":
            return self.precision
        if stats.dtype is None:
            raise ValueError("precision='model' needs attention statistics captured in the model dtype (run it through "
                             "tgvkv.generate); on given matrices name the dtype: precision='bfloat16', 'float16' or "
                             "'float32'")
        if stats.dtype not in DTYPES:
            raise ValueError(f"precision='model' supports {list(DTYPES)} models, this one runs in {stats.dtype}")
        return stats.dtype

    def select(self, stats: PrefillStats, layout: TokenLayout, keep_ratio: float) -> Selection:
        _require_vision(layout, self.name)
        T, L = layout.seq_len, stats.num_layers
        dtype = self._dtype(stats)
        if dtype is None:
            ti = blocks.text_to_vision(stats, layout)  # (L, Q, V)
            w = blocks.text_weights(stats, layout)  # (L, Q)
            vision_scores = np.einsum("lqv,lq->lv", ti, w)  # TWR
            text_scores = stats.column_sums_for(layout.text_positions).astype(np.float64)  # (L, n_text)
            scores = blocks.text_priority_scores(vision_scores, text_scores, layout, self.text_offset)  # TPR
            mass = ti.sum(axis=(1, 2))  # TVB statistic s_l
        else:  # the official arithmetic, operation by operation in `dtype`
            off = official_scores(stats, layout, keep_ratio, dtype, self.text_offset)
            scores, vision_scores, w, mass = off["scores"], off["vision_scores"], off["text_weights"], off["tvb_mass"]

        if blocks.nothing_to_prune(T, keep_ratio):  # official: nothing to prune
            ratios = np.zeros(L, dtype=np.float32)
            forget = np.zeros(L, dtype=np.int64)
        else:
            ratios = blocks.official_layer_ratios(mass, keep_ratio) if dtype is None else off["layer_ratio"]
            forget = blocks.official_forget_counts(ratios, T)
        window = blocks.official_window(T, self.sinks)
        kept = [blocks.evict_lowest(scores[l], window, int(forget[l]), T) for l in range(L)]
        budgets = np.array([len(k) for k in kept])
        suffix_start = layout.image_spans[-1][1]
        info = {
            "tvb_mass": mass,
            "layer_ratio": ratios,
            "forget": forget,
            "text_weights": w,
            "vision_scores": vision_scores,
            "protected_suffix": blocks.protected_suffix(kept, suffix_start),
        }
        return Selection(kept=kept, budgets=budgets, scores=scores, info=info)

    def decode_rule(self, selection: Selection, layout: TokenLayout) -> DecodeRule | None:
        if not self.decode or not np.any(selection.info["forget"] > 0):
            return None
        return OfficialDecodeRule(selection.info["layer_ratio"], selection.info["protected_suffix"], self.sinks)


def _require_vision(layout: TokenLayout, method: str) -> None:
    if layout.n_vision == 0:
        raise ValueError(f"{method} needs at least one image span; the prompt has no vision tokens")
    if len(layout.text_query_positions) == 0:
        raise ValueError(f"{method} needs text after the first image (the question); the prompt ends with vision tokens")
