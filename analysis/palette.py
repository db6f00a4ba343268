"""One colour-blind-safe palette (Okabe & Ito 2008) shared by the plotly and matplotlib figures.

Modalities and kept/evicted states get the same colour in every figure. Sequential data (counts, attention) use
`viridis` / `cividis`, which stay ordered for the common colour-vision deficiencies and in greyscale.
"""
from __future__ import annotations

from typing import Any

OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}

TEXT = OKABE_ITO["blue"]
VISION = OKABE_ITO["orange"]
KEPT = OKABE_ITO["bluish_green"]
EVICTED = "#8C8C8C"  # neutral grey, never used for data series
HIGHLIGHT = OKABE_ITO["vermillion"]
BOUNDARY = OKABE_ITO["black"]
NEVER_EVICTED = "#B0B0B0"  # background band behind layers the engine never evicts (Gemma 3's sliding window)
MODALITY = {"text": TEXT, "vision": VISION}
#: series colours for compared methods (first = the trace's own method), distinct from TEXT / VISION
METHODS = [OKABE_ITO[k] for k in ("bluish_green", "reddish_purple", "sky_blue", "vermillion", "black", "yellow")]
SEQUENTIAL = "viridis"  # layer-keep counts
ATTENTION = "cividis"  # log attention maps

#: matplotlib rcParams for figures readable on a projector (used through `matplotlib.rc_context`, never set globally)
MPL_STYLE: dict[str, Any] = {
    "font.size": 15,
    "axes.titlesize": 16,
    "axes.labelsize": 15,
    "xtick.labelsize": 14,
    "ytick.labelsize": 14,
    "legend.fontsize": 14,
    "figure.titlesize": 17,
    "lines.linewidth": 3.0,
    "axes.linewidth": 1.4,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 150,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "image.interpolation": "nearest",
}

#: plotly layout defaults (font sizes for the app, white template)
PLOTLY_LAYOUT: dict[str, Any] = {"template": "simple_white", "font": {"size": 14}, "title": {"font": {"size": 16}}}


def method_colour(i: int) -> str:
    """Colour of the i-th compared method."""
    return METHODS[i % len(METHODS)]


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)
