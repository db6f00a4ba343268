"""TGV-KV (arXiv 2606.03075) and its ablations: one class, `TGVKV`, whose components are switches, and named presets.

TGV-KV is faithful to the official `kv_caches/tgv_kv.py` selection rule:
TVB: per-layer budgets in proportion to the layer's text->vision attention mass.
TWR: a vision token's score is sum_q TI[q, v] * w_q, each text query weighted by the attention it receives itself.
TPR: text positions score (column sum over all queries) + 100, so they are evicted only after the window's vision.

The skeleton every configuration shares (official): 4 sinks and the last prompt token always kept, window 4..T-2,
forget_l = round_half_even(ratio_l * T), nothing evicted when int(T - T * keep_ratio) <= 0, the official decode rule
(`decode_rules.OfficialDecodeRule`) with the configuration's layer ratios. The components:

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

Presets (registered under their method names): `tgv-kv` (the defaults; its components are fixed, its options are
sinks, text_offset, decode and precision), `tgv-ablation` (every component free) and the rows of the paper's ablation
table (LLaVA-1.5, 5% retention), each fixing its components. The paper names each row only by a few words, so the
mapping is ours:
- the rows are single-component changes where the words allow; rows without "TV budget" use "uniform";
- "+ TT" means text tokens are scored by TT (official text score), "TV"/"VV" the vision score; retention is
  "joint" in the scoring rows (the issue reads "TV budget + TV + TT" as TGV-KV without TPR's text-first rule, and
  TV (not TWR) as its vision score);
- "evict text/vision first" ablate retention only: uniform budget, TWR + TT scores, strict modality order.

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
computes them in the model dtype (its bf16 makes text scores tie); `precision="model"` reproduces that (tgv-kv's
components only); see docs/policies.md.
Generalisation to several images: all vision tokens are "vision", the text queries are the text positions after the
first vision token, and the protected suffix counts kept positions after the last vision token.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np

from ..layout import TokenLayout
from ..stats import PrefillStats, StatRequest
from . import blocks
from .base import DecodeRule, Kind, Policy, Selection
from .official_dtype import DTYPES, official_scores

BUDGETS = ("tvb", "uniform")
VISION_RANKS = ("twr", "tv", "vv", "self", "window")
TEXT_RANKS = ("tt", "window")
RETENTIONS = ("text-first", "joint", "evict-vision-first", "evict-text-first")
COMPONENTS = ("budget", "vision_rank", "text_rank", "retention")
PRECISIONS = ("float64", "model", *DTYPES)


@dataclass(frozen=True, eq=False)
class TGVDetails:
    """What a TGV-KV selection records per layer, typed (L layers, Q text queries, V vision tokens).

    `Selection.info` (and so `Trace.selection_info`) holds these arrays as a dict, which is what traces serialise;
    a module that reads them goes through `from_info`, so that a renamed or missing key fails here with a clear
    message. Layers that a hybrid model never evicts hold NaN (float arrays) or -1 (integer arrays).
    """

    tvb_mass: np.ndarray  # (L,) TVB statistic s_l: text->vision attention mass (every configuration reports it)
    layer_ratio: np.ndarray  # (L,) float32 forget fraction ratio_l (0 in every layer when nothing is pruned)
    forget: np.ndarray  # (L,) int64 prefill forget count round_half_even(ratio_l * T), at least 0
    vision_scores: np.ndarray  # (L, V) the configuration's vision rank of each vision token (TWR for tgv-kv)
    protected_suffix: np.ndarray  # (L,) official P_l: kept positions after the last image, at least 1
    text_weights: np.ndarray | None = None  # (L, Q) TWR weight w of each text query; None unless vision_rank="twr"

    REQUIRED: ClassVar[tuple[str, ...]] = ("tvb_mass", "layer_ratio", "forget", "vision_scores", "protected_suffix")

    def to_info(self) -> dict[str, np.ndarray]:
        """The `Selection.info` dict (tgv-kv's key order, which traces list)."""
        info = {"tvb_mass": self.tvb_mass, "layer_ratio": self.layer_ratio, "forget": self.forget}
        if self.text_weights is not None:
            info["text_weights"] = self.text_weights
        return info | {"vision_scores": self.vision_scores, "protected_suffix": self.protected_suffix}

    @classmethod
    def from_info(cls, info: Mapping[str, np.ndarray]) -> "TGVDetails":
        """The record of a TGV-KV selection's `info` (or a trace's `selection_info`); ValueError if it is not one."""
        missing = [k for k in cls.REQUIRED if k not in info]
        if missing:
            raise ValueError(f"not a TGV-KV selection record: no {', '.join(missing)} among its arrays "
                             f"({', '.join(sorted(info)) or 'none'})")
        weights = info.get("text_weights")
        return cls(**{k: np.asarray(info[k]) for k in cls.REQUIRED},
                   text_weights=None if weights is None else np.asarray(weights))


@dataclass
class TGVKV(Policy):
    """Text-grounded KV eviction: TVB budgets, TWR ranking, TPR text-first retention (official rule), with each
    component a switch (see the module docstring); the defaults are TGV-KV."""

    name: ClassVar[str] = "tgv-kv"
    kind: ClassVar[Kind] = "tgv"
    decodes_by_default: ClassVar[bool] = True
    #: what `make_policy` accepts and `describe` reports; a configuration that is not `generic` fixes its components
    options: ClassVar[tuple[str, ...]] = ("sinks", "text_offset", "decode", "precision")

    budget: str = "tvb"
    vision_rank: str = "twr"
    text_rank: str = "tt"
    retention: str = "text-first"
    window_size: int = 32  # observation window of the "window" ranks
    sinks: int = blocks.OFFICIAL_SINKS
    text_offset: float = blocks.OFFICIAL_TEXT_OFFSET  # "text-first" only
    decode: bool = True  # also evict during decoding (official rule with this configuration's layer ratios)
    # "float64": scores and ratios in float64 from float32 statistics (exact arithmetic; the default).
    # "model": the official code's arithmetic in the model's dtype (bf16 / fp16 / fp32): statistics captured in it
    # (head mean of per-head probabilities rounded to it) and every score / ratio operation rounded to it, so text
    # scores tie and budgets are quantised as in the official code. "bfloat16" / "float16" / "float32": the same
    # arithmetic in a named dtype (for `tgvkv.select` on given matrices, which are rounded to it first).
    # Only for tgv-kv's components: the official arithmetic exists for the full rule only.
    precision: str = "float64"

    def __post_init__(self) -> None:
        for opt, choices in zip(COMPONENTS, (BUDGETS, VISION_RANKS, TEXT_RANKS, RETENTIONS)):
            blocks.check_choice(opt, getattr(self, opt), choices)
        blocks.check_int("window_size", self.window_size, 1)
        blocks.check_int("sinks", self.sinks, 0)
        blocks.check_number("text_offset", self.text_offset, 0)
        blocks.check_bool("decode", self.decode)
        blocks.check_choice("precision", self.precision, PRECISIONS)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if not vars(type(self)).get("generic", False):  # a named configuration: its components are its identity
            for opt in COMPONENTS:
                if getattr(self, opt) != defaults[opt]:
                    raise ValueError(
                        f"{self.name} fixes {opt}={defaults[opt]!r}; use method 'tgv-ablation' to combine freely"
                    )
        official = all(getattr(self, c) == getattr(TGVKV, c) for c in COMPONENTS)
        if self.precision != "float64" and not official:
            raise ValueError(f"precision={self.precision!r} reproduces the official arithmetic, which exists for "
                             "tgv-kv's components only (budget 'tvb', vision_rank 'twr', text_rank 'tt', retention "
                             "'text-first')")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return cls.options

    # -- statistics ---------------------------------------------------------------------------------------------
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
        return StatRequest(query_positions=q, column_sums=cols, model_dtype=self.precision == "model")

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

    # -- ranking ------------------------------------------------------------------------------------------------
    def _window_sums(self, stats: PrefillStats, T: int) -> np.ndarray:
        """(L, T) attention summed over the observation window; window keys get the layer maximum."""
        win = self._window(T)
        sums = stats.rows_for(win).astype(np.float64).sum(axis=1)
        sums[:, win] = sums.max(axis=1, keepdims=True)
        return sums

    def vision_scores(self, stats: PrefillStats, layout: TokenLayout) -> tuple[np.ndarray, np.ndarray | None]:
        """(L, V) this configuration's score of every vision token (float64) and, for TWR, the (L, Q) text weights
        it used (None for the other vision ranks)."""
        if self.vision_rank == "twr":
            w = blocks.text_weights(stats, layout)
            return np.einsum("lqv,lq->lv", blocks.text_to_vision(stats, layout), w), w
        if self.vision_rank == "tv":
            return blocks.text_to_vision(stats, layout).sum(axis=1), None
        if self.vision_rank == "window":
            return self._window_sums(stats, layout.seq_len)[:, layout.vision_positions], None
        received = stats.column_sums_for(layout.vision_positions).astype(np.float64)
        if self.vision_rank == "self":
            return received, None
        return received - blocks.text_to_vision(stats, layout).sum(axis=1), None  # "vv"

    def text_scores(self, stats: PrefillStats, layout: TokenLayout) -> np.ndarray:
        """(L, n_text) this configuration's score of every text token (before the retention rule)."""
        if self.text_rank == "tt":
            return stats.column_sums_for(layout.text_positions).astype(np.float64)
        return self._window_sums(stats, layout.seq_len)[:, layout.text_positions]

    def retention_scores(self, vision: np.ndarray, text: np.ndarray, layout: TokenLayout) -> np.ndarray:
        """(L, T) the ranking the eviction uses: both modalities' scores combined by the retention rule."""
        if self.retention == "text-first":
            return blocks.text_priority_scores(vision, text, layout, self.text_offset)  # TPR
        if self.retention == "joint":
            return blocks.text_priority_scores(vision, text, layout, 0.0)
        return blocks.modality_first_scores(vision, text, layout, self.retention.split("-")[1])

    def layer_ratios(self, mass: np.ndarray, seq_len: int, keep_ratio: float) -> np.ndarray:
        """(L,) float32 forget fraction per layer (the budget component); zero when nothing is to prune."""
        if blocks.nothing_to_prune(seq_len, keep_ratio):  # official: nothing to prune
            return np.zeros(len(mass), dtype=np.float32)
        if self.budget == "tvb":
            return blocks.official_layer_ratios(mass, keep_ratio)
        return blocks.uniform_layer_ratios(len(mass), keep_ratio)

    # -- the policy ---------------------------------------------------------------------------------------------
    def select(self, stats: PrefillStats, layout: TokenLayout, keep_ratio: float) -> Selection:
        _require_vision(layout, self.name)
        T = layout.seq_len
        dtype = self._dtype(stats)
        if dtype is None:
            vision, weights = self.vision_scores(stats, layout)
            scores = self.retention_scores(vision, self.text_scores(stats, layout), layout)
            mass = blocks.tvb_statistic(stats, layout)
            ratios = self.layer_ratios(mass, T, keep_ratio)
        else:  # the official arithmetic, operation by operation in `dtype`
            off = official_scores(stats, layout, keep_ratio, dtype, self.text_offset)
            scores, vision, weights, mass = off["scores"], off["vision_scores"], off["text_weights"], off["tvb_mass"]
            ratios = self.layer_ratios(mass, T, keep_ratio)  # zeros when nothing is to prune, else
            if not blocks.nothing_to_prune(T, keep_ratio):
                ratios = off["layer_ratio"]  # the official ratios in `dtype`
        forget = blocks.official_forget_counts(ratios, T)
        kept = blocks.evict_per_layer(scores, forget, self.sinks)
        details = TGVDetails(tvb_mass=mass, layer_ratio=ratios, forget=forget, vision_scores=vision,
                             protected_suffix=blocks.protected_suffix(kept, layout.image_spans[-1][1]),
                             text_weights=weights)
        return Selection(kept=kept, budgets=np.array([len(k) for k in kept]), scores=scores, info=details.to_info())

    def decode_rule(self, selection: Selection, layout: TokenLayout) -> DecodeRule | None:
        from .decode_rules import OfficialDecodeRule  # torch: imported when a run decodes, not with the policy

        details = TGVDetails.from_info(selection.info)
        if not self.decode or not np.any(details.forget > 0):
            return None
        return OfficialDecodeRule(details.layer_ratio, details.protected_suffix, self.sinks)


@dataclass
class TGVAblation(TGVKV):
    """TGV-KV with every component selectable (defaults = full TGV-KV); see the module docstring."""

    name: ClassVar[str] = "tgv-ablation"
    kind: ClassVar[Kind] = "tgv-ablation"
    # a skeleton whose named configurations are registered too (evaluations list those instead of it)
    generic: ClassVar[bool] = True
    options: ClassVar[tuple[str, ...]] = (*COMPONENTS, "window_size", "sinks", "text_offset", "decode")


def ablation_row(class_name: str, name: str, doc: str, **components: str) -> type[TGVAblation]:
    """A row of the paper's ablation table: a `TGVAblation` registered as `name` whose components are fixed."""
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"{name}: {unknown} are not components of TGV-KV ({', '.join(COMPONENTS)})")
    cls = dataclasses.make_dataclass(class_name, [(c, str, v) for c, v in components.items()], bases=(TGVAblation,),
                                     namespace={"name": name, "generic": False, "__doc__": doc})
    cls.__module__ = __name__
    return cls


TGVUniformWindow = ablation_row(
    "TGVUniformWindow", "tgv-uniform-window", 'Row "uniform budget + observation window" (the SnapKV-like starting '
    "point): uniform budget, every key scored by the last `window_size` queries, one joint ranking.",
    budget="uniform", vision_rank="window", text_rank="window", retention="joint")
TGVSelfAttn = ablation_row(
    "TGVSelfAttn", "tgv-self-attn", 'Row "pure self-attention score": uniform budget, every key scored by its column '
    "sum over all queries (accumulated self-attention, no modality distinction), joint ranking.",
    budget="uniform", vision_rank="self", retention="joint")
TGVVisionVisionText = ablation_row(
    "TGVVisionVisionText", "tgv-vv-tt", 'Row "VV+TT": uniform budget, vision by vision->vision attention, text by TT, '
    "joint ranking.", budget="uniform", vision_rank="vv", retention="joint")
TGVTextVisionText = ablation_row(
    "TGVTextVisionText", "tgv-tv-tt", 'Row "TV+TT": uniform budget, vision by unweighted text->vision attention, text '
    "by TT, joint ranking.", budget="uniform", vision_rank="tv", retention="joint")
TGVBudgetTextVisionText = ablation_row(
    "TGVBudgetTextVisionText", "tgv-tvb-tv-tt", 'Row "TV budget + TV + TT": TVB budgets, TV vision scores, TT text '
    "scores, joint ranking (no TPR).", vision_rank="tv", retention="joint")
TGVEvictTextFirst = ablation_row(
    "TGVEvictTextFirst", "tgv-evict-text-first", 'Row "evict text first": uniform budget, TWR + TT scores, every '
    "window text token evicted before vision.", budget="uniform", retention="evict-text-first")
TGVEvictVisionFirst = ablation_row(
    "TGVEvictVisionFirst", "tgv-evict-vision-first", 'Row "evict vision first": uniform budget, TWR + TT scores, every '
    "window vision token evicted before text (strict order, unlike TPR's soft +100 offset).",
    budget="uniform", retention="evict-vision-first")

ABLATION_ROWS = (TGVUniformWindow, TGVSelfAttn, TGVVisionVisionText, TGVTextVisionText, TGVBudgetTextVisionText,
                 TGVEvictTextFirst, TGVEvictVisionFirst)


def _require_vision(layout: TokenLayout, method: str) -> None:
    if layout.n_vision == 0:
        raise ValueError(f"{method} needs at least one image span; the prompt has no vision tokens")
    if len(layout.text_query_positions) == 0:
        raise ValueError(f"{method} needs text after the first image (the question); the prompt ends with vision tokens")
