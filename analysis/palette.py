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
EVICTED_FILL = "#D9D9D9"  # evicted patches are washed out towards this light grey
HIGHLIGHT = OKABE_ITO["vermillion"]
BOUNDARY = OKABE_ITO["black"]
NEVER_EVICTED = "#B0B0B0"  # background band behind layers the engine never evicts (Gemma 3's sliding window)
REFERENCE = "#555555"  # reference lines (uniform budget, KL threshold)
AGREE = TEXT  # per-step bars before the answers part
DIVERGED = HIGHLIGHT  # ... and from the first differing token on

#: the word a caption uses for each colour: captions are built from these, never typed next to a hex code
COLOUR_NAMES = {
    OKABE_ITO["black"]: "black",
    OKABE_ITO["orange"]: "orange",
    OKABE_ITO["sky_blue"]: "sky-blue",
    OKABE_ITO["bluish_green"]: "green",
    OKABE_ITO["yellow"]: "yellow",
    OKABE_ITO["blue"]: "blue",
    OKABE_ITO["vermillion"]: "red-orange",
    OKABE_ITO["reddish_purple"]: "pink",
    EVICTED: "grey",
    EVICTED_FILL: "light grey",
    REFERENCE: "grey",
}
#: how the ends of the sequential colour maps look, for captions ("dark purple = 0 layers, yellow = all")
COLORMAP_ENDS = {"viridis": ("dark purple", "yellow"), "cividis": ("dark blue", "yellow")}
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


def name_of(colour: str) -> str:
    """The caption word for a palette colour; a colour without a name is a bug (its caption would be wrong)."""
    try:
        return COLOUR_NAMES[colour.upper()]
    except KeyError:
        raise KeyError(f"colour {colour!r} has no caption name in analysis.palette.COLOUR_NAMES") from None


def method_colour(i: int) -> str:
    """Colour of the i-th compared method."""
    return METHODS[i % len(METHODS)]


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def rgb_hex(rgba: tuple[float, ...]) -> str:
    """'#RRGGBB' of a matplotlib (r, g, b[, a]) colour with components in [0, 1]."""
    return "#" + "".join(f"{round(255 * c):02X}" for c in rgba[:3])
