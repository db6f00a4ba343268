"""What each colour and box in a figure means, as data: figures draw their legends from these entries and captions
quote the same entries, so a caption can only name colours the figure actually uses.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Sequence

from matplotlib import colormaps

from . import palette

#: marks a legend entry can describe: how the colour appears on the figure
MARKS = ("outline", "patches", "boxes", "bars", "line", "dashed line", "dotted line", "scale")


@dataclass(frozen=True)
class LegendEntry:
    mark: str  # one of MARKS
    colour: str  # a palette hex colour, or a colour-map name for mark "scale"
    meaning: str

    def __post_init__(self) -> None:
        if self.mark not in MARKS:
            raise ValueError(f"legend mark must be one of {MARKS}, got {self.mark!r}")

    @property
    def words(self) -> str:
        """How a reader finds the mark: 'green outline', 'red-orange boxes', 'colour from dark purple to yellow'."""
        if self.mark == "scale":
            lo, hi = palette.COLORMAP_ENDS[self.colour]
            return f"colour from {lo} to {hi}"
        return f"{palette.name_of(self.colour)} {self.mark}"

    def sentence(self) -> str:
        return f"{self.words}: {self.meaning}"


def sentences(entries: list[LegendEntry]) -> str:
    """All entries as one caption line: 'green outline: ...; red-orange boxes: ...'."""
    return "; ".join(e.sentence() for e in entries)


def legend_html(entries: Sequence[LegendEntry], sep: str = "<br>") -> str:
    """Legend lines as HTML (plotly annotations, Markdown captions): a square in each entry's colour (both ends of a
    colour scale), then the entry's sentence."""
    def swatch(colour: str) -> str:
        return f'<span style="color:{colour}">■</span>'

    lines = []
    for e in entries:
        if e.mark == "scale":
            cmap = colormaps[e.colour]
            mark = swatch(palette.rgb_hex(cmap(0.0))) + "→" + swatch(palette.rgb_hex(cmap(1.0)))
        else:
            mark = swatch(e.colour)
        lines.append(f"{mark} {html.escape(e.sentence(), quote=False)}")
    return sep.join(lines)


def overlay_legend(kind: str, layer: int, num_layers: int, n_top: int, has_image: bool = True) -> list[LegendEntry]:
    """The marks of a retained-patch panel (`analysis.overlay`): kind 'kept' (one layer) or 'counts' (all layers)."""
    boxes = LegendEntry("boxes", palette.HIGHLIGHT, f"the {n_top} patches with the highest text→image score")
    if kind == "counts":
        scale = LegendEntry("scale", palette.SEQUENTIAL,
                            f"how many of the {num_layers} layers keep the patch (0 to {num_layers}, the number on "
                            "the patch where it fits)")
        return [scale] + ([boxes] if n_top else [])
    if kind != "kept":
        raise ValueError(f"overlay kind must be 'kept' or 'counts', got {kind!r}")
    if has_image:
        kept = LegendEntry("outline", palette.KEPT, f"patches kept at layer {layer}, pixels unchanged")
    else:
        kept = LegendEntry("patches", palette.KEPT, f"kept at layer {layer} (no image stored)")
    evicted = LegendEntry("patches", palette.EVICTED_FILL, f"evicted at layer {layer}, washed out")
    return [kept, evicted] + ([boxes] if n_top else [])


def modality_legend(what: str = "tokens") -> list[LegendEntry]:
    """Text / vision colours of bar charts."""
    return [LegendEntry("bars", palette.TEXT, f"text {what}"), LegendEntry("bars", palette.VISION, f"vision {what}")]


def accumulated_legend() -> list[LegendEntry]:
    return modality_legend() + [LegendEntry("scale", palette.SEQUENTIAL,
                                            "fraction of layers evicting the token (lower panel, 0 to 1)")]


def budgets_legend(uniform: float, n_text: int) -> list[LegendEntry]:
    return modality_legend("kept") + [
        LegendEntry("dashed line", palette.BOUNDARY, f"uniform budget ({uniform:.0f} tokens per layer)"),
        LegendEntry("dotted line", palette.TEXT, f"all text ({n_text} tokens)"),
    ]


def attention_legend() -> list[LegendEntry]:
    return [LegendEntry("scale", palette.ATTENTION, "log10 of the attention a query (row) gives a key (column)"),
            LegendEntry("line", palette.BOUNDARY, "boundaries between text and image tokens")]


def neighbours_legend() -> list[LegendEntry]:
    return [LegendEntry("line", palette.TEXT, "text tokens' neighbours (solid: among text, dashed: among vision)"),
            LegendEntry("line", palette.VISION, "vision tokens' neighbours (solid: among vision, dashed: among text)")]
