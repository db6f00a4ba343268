"""The rows of TGV-KV's ablation table (arXiv 2606.03075; LLaVA-1.5, 5% retention) as named `TGVAblation`s.

The named rows fix the four components of `TGVAblation`. The paper names each row only by a few words, so the
mapping is ours:
- the rows are single-component changes where the words allow; rows without "TV budget" use "uniform";
- "+ TT" means text tokens are scored by TT (official text score), "TV"/"VV" the vision score; retention is
  "joint" in the scoring rows (the issue reads "TV budget + TV + TT" as TGV-KV without TPR's text-first rule, and
  TV (not TWR) as its vision score);
- "evict text/vision first" ablate retention only: uniform budget, TWR + TT scores, strict modality order.
Each row only overrides the component defaults; asking a row for another component raises `ValueError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .tgv_ablations import TGVAblation


@dataclass
class TGVUniformWindow(TGVAblation):
    """Row "uniform budget + observation window" (the SnapKV-like starting point): uniform budget, every key scored
    by the last `window_size` queries, one joint ranking."""

    name: ClassVar[str] = "tgv-uniform-window"
    budget: str = "uniform"
    vision_rank: str = "window"
    text_rank: str = "window"
    retention: str = "joint"


@dataclass
class TGVSelfAttn(TGVAblation):
    """Row "pure self-attention score": uniform budget, every key scored by its column sum over all queries
    (accumulated self-attention, no modality distinction), joint ranking."""

    name: ClassVar[str] = "tgv-self-attn"
    budget: str = "uniform"
    vision_rank: str = "self"
    text_rank: str = "tt"
    retention: str = "joint"


@dataclass
class TGVVisionVisionText(TGVAblation):
    """Row "VV+TT": uniform budget, vision by vision->vision attention, text by TT, joint ranking."""

    name: ClassVar[str] = "tgv-vv-tt"
    budget: str = "uniform"
    vision_rank: str = "vv"
    text_rank: str = "tt"
    retention: str = "joint"


@dataclass
class TGVTextVisionText(TGVAblation):
    """Row "TV+TT": uniform budget, vision by unweighted text->vision attention, text by TT, joint ranking."""

    name: ClassVar[str] = "tgv-tv-tt"
    budget: str = "uniform"
    vision_rank: str = "tv"
    text_rank: str = "tt"
    retention: str = "joint"


@dataclass
class TGVBudgetTextVisionText(TGVAblation):
    """Row "TV budget + TV + TT": TVB budgets, TV vision scores, TT text scores, joint ranking (no TPR)."""

    name: ClassVar[str] = "tgv-tvb-tv-tt"
    budget: str = "tvb"
    vision_rank: str = "tv"
    text_rank: str = "tt"
    retention: str = "joint"


@dataclass
class TGVEvictTextFirst(TGVAblation):
    """Row "evict text first": uniform budget, TWR + TT scores, every window text token evicted before vision."""

    name: ClassVar[str] = "tgv-evict-text-first"
    budget: str = "uniform"
    vision_rank: str = "twr"
    text_rank: str = "tt"
    retention: str = "evict-text-first"


@dataclass
class TGVEvictVisionFirst(TGVAblation):
    """Row "evict vision first": uniform budget, TWR + TT scores, every window vision token evicted before text
    (strict order, unlike TPR's soft +100 offset)."""

    name: ClassVar[str] = "tgv-evict-vision-first"
    budget: str = "uniform"
    vision_rank: str = "twr"
    text_rank: str = "tt"
    retention: str = "evict-vision-first"


ABLATION_ROWS = (
    TGVUniformWindow,
    TGVSelfAttn,
    TGVVisionVisionText,
    TGVTextVisionText,
    TGVBudgetTextVisionText,
    TGVEvictTextFirst,
    TGVEvictVisionFirst,
)
