"""Analysis of TGV-KV traces: pure `compute_x(trace)` data builders and `plot_x(data)` figures (plotly + matplotlib).

Nothing here runs a model: every function takes a `tgvkv.trace.Trace` (and, for overlays, the original image).
"""
from .compute import (
    compute_accumulated,
    compute_attention,
    compute_budgets,
    compute_comparison,
    compute_neighbours,
    compute_overlay,
    text_to_image_scores,
)
from .overlay import overlay_panels

__all__ = [
    "compute_neighbours",
    "compute_attention",
    "compute_accumulated",
    "compute_overlay",
    "compute_budgets",
    "compute_comparison",
    "text_to_image_scores",
    "overlay_panels",
]
