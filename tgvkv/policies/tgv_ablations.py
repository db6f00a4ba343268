"""The ablations of TGV-KV (arXiv 2606.03075, ablation table: LLaVA-1.5, 5% retention) as compositions of blocks.

`TGVAblation` is TGV-KV's official skeleton (4 sinks and the last prompt token always kept, window 4..T-2,
forget_l = round_half_even(ratio_l * T), nothing evicted when int(T - T * keep_ratio) <= 0, official decode rule) with
its three components made options:

budget       "tvb"      TVB: ratio_l = 1 - L * keep_ratio * s_l / sum(s), s_l = sum of text->vision attention
             "uniform"  ratio_l = 1 - keep_ratio in every layer
vision_rank  "twr"      TWR: sum_q TI[q, v] * w_q (text queries weighted by their own importance w)
             "tv"       sum_q TI[q, v] (unweighted text->vision attention)
             "vv"       attention received from vision queries: column sum over all queries minus the text-query
                        rows (exact: causal text queries before v contribute zero); no vision rows are captured
             "self"     column sum over all queries (pure accumulated self-attention, H2O-like)
             "window"   attention summed over the last `window_size` prompt queries (SnapKV observation window)
text_rank    "tt"       official text score: column sum over all queries (for text after the image this is
                        exactly the TT column sum, only text queries see it)
             "window"   as vision "window"
retention    "text-first"          TPR, official: text score + text_offset (100), a soft priority
             "joint"               one ranking of raw scores over both modalities
             "evict-vision-first"  strict: every window vision token goes before any text token
             "evict-text-first"    strict: every window text token goes before any vision token
With "window" ranks, keys inside the observation window get the layer's maximum score (SnapKV keeps its window,
kvpress pads the window with the maximum): our choice, so that the observers are not evicted for being recent.

The paper's ablation rows are registered as named subclasses in `tgv_ablation_rows.py`.
Full TGV-KV is `tgv-kv` (= this class with its defaults; tests check the equality).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..layout import TokenLayout
from ..stats import PrefillStats, StatRequest
from . import blocks
from .base import DecodeRule, Policy, Selection
from .tgv_kv import OfficialDecodeRule, _require_vision

BUDGETS = ("tvb", "uniform")
VISION_RANKS = ("twr", "tv", "vv", "self", "window")
TEXT_RANKS = ("tt", "window")
RETENTIONS = ("text-first", "joint", "evict-vision-first", "evict-text-first")
COMPONENTS = ("budget", "vision_rank", "text_rank", "retention")


@dataclass
class TGVAblation(Policy):
    """TGV-KV with each component selectable (defaults = full TGV-KV); see the module docstring."""

    name: ClassVar[str] = "tgv-ablation"
    decodes_by_default: ClassVar[bool] = True
    generic: ClassVar[bool] = True
    budget: str = "tvb"
    vision_rank: str = "twr"
    text_rank: str = "tt"
    retention: str = "text-first"
    window_size: int = 32  # observation window of the "window" ranks
    sinks: int = blocks.OFFICIAL_SINKS
    text_offset: float = blocks.OFFICIAL_TEXT_OFFSET  # "text-first" only
    decode: bool = True  # official TGV-KV decode rule with this variant's layer ratios

    def __post_init__(self) -> None:
        for opt, choices in zip(COMPONENTS, (BUDGETS, VISION_RANKS, TEXT_RANKS, RETENTIONS)):
            blocks.check_choice(opt, getattr(self, opt), choices)
        blocks.check_int("window_size", self.window_size, 1)
        blocks.check_int("sinks", self.sinks, 0)
        blocks.check_number("text_offset", self.text_offset, 0)
        blocks.check_bool("decode", self.decode)
        if type(self) is not TGVAblation:  # a named row: its components are its identity
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for opt in COMPONENTS:
                if getattr(self, opt) != defaults[opt]:
                    raise ValueError(
                        f"{self.name} fixes {opt}={defaults[opt]!r}; use method 'tgv-ablation' to combine freely"
                    )

    def _uses_window(self) -> bool:
        return "window" in (self.vision_rank, self.text_rank)

    def _window(self, seq_len: int) -> np.ndarray:
        return np.arange(max(0, seq_len - self.window_size), seq_len, dtype=np.int64)

    def request(self, layout: TokenLayout) -> StatRequest:
        _require_vision(layout, self.name)
        q = layout.text_query_positions
        if self._uses_window():
            q = np.union1d(q, self._window(layout.seq_len)).astype(np.int64)
        cols = "all" if self.vision_rank in ("vv", "self") else ("text" if self.text_rank == "tt" else "none")
        return StatRequest(query_positions=q, column_sums=cols)

    def _window_sums(self, stats: PrefillStats, T: int) -> np.ndarray:
        """(L, T) attention summed over the observation window; window keys get the layer maximum."""
        win = self._window(T)
        sums = stats.rows_for(win).astype(np.float64).sum(axis=1)
        sums[:, win] = sums.max(axis=1, keepdims=True)
        return sums

    def _scores(self, stats: PrefillStats, layout: TokenLayout, ti: np.ndarray) -> tuple[np.ndarray, dict]:
        T = layout.seq_len
        vis, txt = layout.vision_positions, layout.text_positions
        win = self._window_sums(stats, T) if self._uses_window() else None
        info: dict[str, np.ndarray] = {}
        if self.vision_rank == "twr":
            info["text_weights"] = w = blocks.text_weights(stats, layout)
            v = np.einsum("lqv,lq->lv", ti, w)
        elif self.vision_rank == "tv":
            v = ti.sum(axis=1)
        elif self.vision_rank == "vv":
            v = stats.column_sums_for(vis).astype(np.float64) - ti.sum(axis=1)
        elif self.vision_rank == "self":
            v = stats.column_sums_for(vis).astype(np.float64)
        else:
            v = win[:, vis]
        t = stats.column_sums_for(txt).astype(np.float64) if self.text_rank == "tt" else win[:, txt]
        if self.retention == "text-first":
            scores = blocks.text_priority_scores(v, t, layout, self.text_offset)
        elif self.retention == "joint":
            scores = blocks.text_priority_scores(v, t, layout, 0.0)
        else:
            scores = blocks.modality_first_scores(v, t, layout, self.retention.split("-")[1])
        info["vision_scores"] = v
        return scores, info

    def select(self, stats: PrefillStats, layout: TokenLayout, keep_ratio: float) -> Selection:
        _require_vision(layout, self.name)
        T, L = layout.seq_len, stats.num_layers
        ti = blocks.text_to_vision(stats, layout)  # (L, Q, V)
        scores, info = self._scores(stats, layout, ti)
        mass = ti.sum(axis=(1, 2))  # TVB statistic s_l (reported for every variant)
        if blocks.nothing_to_prune(T, keep_ratio):  # official: nothing to prune
            ratios = np.zeros(L, dtype=np.float32)
        elif self.budget == "tvb":
            ratios = blocks.official_layer_ratios(mass, keep_ratio)
        else:
            ratios = blocks.uniform_layer_ratios(L, keep_ratio)
        forget = blocks.official_forget_counts(ratios, T)
        window = blocks.official_window(T, self.sinks)
        kept = [blocks.evict_lowest(scores[l], window, int(forget[l]), T) for l in range(L)]
        info |= {
            "tvb_mass": mass,
            "layer_ratio": ratios,
            "forget": forget,
            "protected_suffix": blocks.protected_suffix(kept, layout.image_spans[-1][1]),
        }
        return Selection(kept=kept, budgets=np.array([len(k) for k in kept]), scores=scores, info=info)

    def decode_rule(self, selection: Selection, layout: TokenLayout) -> DecodeRule | None:
        if not self.decode or not np.any(selection.info["forget"] > 0):
            return None
        return OfficialDecodeRule(selection.info["layer_ratio"], selection.info["protected_suffix"], self.sinks)
