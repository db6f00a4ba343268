"""The diagnostics of a run, one view per tab: retained patches, budgets, attention map, cosine neighbours,
accumulated attention, and the Explain walkthrough. Each view is a figure (or image) plus a caption that says what
to notice; the data and figures come from ``analysis`` (``compute_x`` / ``plot_x``).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from .display import empty_figure
from .inputs import check_layer
from .state import RunState

OVERLAY_MODES = ("layer", "all layers")


def legend_markdown(entries: Sequence[Any]) -> str:
    """Caption lines for `analysis.legend` entries: a swatch in the drawn colour, then the same words as the figure."""
    from analysis.legend import legend_html

    return legend_html(entries)


def overlay_view(run: RunState, layer: Any, mode: str = "layer") -> tuple[Image.Image | None, str]:
    """Retained patches of `layer` (mode "layer") or how many layers keep each patch (mode "all layers")."""
    from analysis import compute_overlay, overlay_panels
    from analysis import explain as ax
    from analysis.legend import overlay_legend

    if mode not in OVERLAY_MODES:
        raise ValueError(f"the overlay mode must be one of {', '.join(map(repr, OVERLAY_MODES))}, got {mode!r}")
    layer = check_layer(layer, run.num_layers)
    try:
        data = compute_overlay(run.evicted, layer)
    except ValueError as e:
        return None, f"**No overlay:** {e}"
    kind = "counts" if mode == "all layers" else "kept"
    panels = overlay_panels(data, [run.image], kind)
    img = _hstack([p for _, p in panels])
    legend = legend_markdown(overlay_legend(kind, layer, run.num_layers, len(data.top)))
    if kind == "kept":
        note = ("good eviction keeps the patches that hold the answer (on the demo scenes: the 2×2 patches of the "
                "object asked about); the boxes mark what the question pointed at.")
        head = ax.overlay(data)
    else:
        note = ("patches kept by every layer are the ones every layer agrees matter; a method that is text-grounded "
                "concentrates them on the object the question names.")
        head = f"{run.method}: layers keeping each patch, summed over {run.num_layers} layers"
    return img, f"**{head}.**<br>{legend}<br>What to notice: {note}"


def _hstack(images: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    if len(images) == 1:
        return images[0]
    w = sum(i.width for i in images) + gap * (len(images) - 1)
    h = max(i.height for i in images)
    out = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def attention_view(run: RunState, layer: Any) -> tuple[go.Figure, str]:
    from analysis import compute_attention
    from analysis import explain as ax
    from analysis.legend import attention_legend
    from analysis.plots_plotly import plot_attention

    layer = check_layer(layer, run.num_layers)
    try:
        data = compute_attention(run.evicted, layer)
    except ValueError as e:
        return empty_figure(str(e)), f"**No attention map:** {e}"
    return lighten_heatmaps(plot_attention(data)), (
        f"**{ax.attention(data)}.**<br>{legend_markdown(attention_legend())}<br>What to notice: the box gives each block's share of all attention (T = text, "
        "V = vision, query→key); per entry, text queries favour text keys over image keys (the modality gap), so a "
        "ranking over all tokens together under-rates the image. TGV-KV therefore measures text→image attention on "
        "its own. Bright vertical stripes are sink tokens that every query attends to.")


def lighten_heatmaps(fig: go.Figure, max_cells: int = 4096) -> go.Figure:
    """Replace per-cell hover strings of large heatmaps by a position template (the browser draws 10x faster).

    A 150-token prompt has 22,500 cells: their token-labelled hover strings are ~2 MB of JSON; positions are enough
    there, and the text-only zoom panel keeps its token labels.
    """
    for tr in fig.data:
        if tr.type == "heatmap" and tr.z is not None and np.size(tr.z) > max_cells and tr.hovertext is not None:
            tr.hovertext = None
            tr.hoverinfo = None
            tr.hovertemplate = "query %{y}<br>key %{x}<br>log10 attention %{z:.2f}<extra></extra>"
    return fig


def budgets_view(run: RunState) -> tuple[go.Figure, str]:
    from analysis import compute_budgets
    from analysis import explain as ax
    from analysis.plots_plotly import plot_budgets

    from analysis.legend import budgets_legend

    data = compute_budgets([run.evicted])
    return plot_budgets(data), (
        f"**{ax.budgets(data)}.**<br>{legend_markdown(budgets_legend(data.uniform, data.n_text))}<br>"
        "What to notice: TGV-KV gives each layer a "
        "budget in proportion to how much its text looks at the image (TVB), so the bars differ by layer, and it "
        "keeps text first (TPR): a layer loses text only when its budget is smaller than the text.")


def neighbours_view(run: RunState) -> tuple[go.Figure, str]:
    from analysis import compute_neighbours
    from analysis import explain as ax
    from analysis import palette as P
    from analysis.legend import neighbours_legend
    from analysis.plots_plotly import plot_neighbours

    try:
        data = compute_neighbours(run.evicted, None, projection="pca", seed=run.seed)
    except ValueError as e:
        return empty_figure(str(e)), f"**No neighbour plot:** {e}"
    return plot_neighbours(data), (
        f"**{ax.neighbours(data)}.**<br>{legend_markdown(neighbours_legend())}<br>What to notice: solid lines (neighbours of the same modality) above dashed "
        "ones (the other modality) mean text and vision hidden states live in separate neighbourhoods, the second "
        f"sign of the modality gap; in the PCA panel the {P.name_of(P.TEXT)} (text) and {P.name_of(P.VISION)} "
        "(vision) points form separate clouds.")


def accumulated_view(run: RunState) -> tuple[go.Figure, str]:
    from analysis import compute_accumulated
    from analysis import explain as ax
    from analysis.plots_plotly import plot_accumulated

    from analysis.legend import accumulated_legend

    try:
        data = compute_accumulated(run.evicted)
    except ValueError as e:
        return empty_figure(str(e)), f"**No accumulated attention:** {e}"
    where = {label: ax.row_position(i, len(data.eviction_rows())) for i, (label, _) in enumerate(data.eviction_rows())}
    return plot_accumulated(data), (
        f"**{ax.accumulated(data)}.**<br>{legend_markdown(accumulated_legend())}<br>"
        f"Lower panel, {ax.eviction_rows(data)}.<br>"
        "What to notice: accumulated attention (what H2O-style methods rank by, log scale) is very uneven: a few sink "
        "tokens take most of it, and ranking by it alone evicts much of the text (the 'attention-only' strip, "
        f"{where['attention-only']} of the lower panel); {run.method}'s own evictions are the "
        f"{where[data.method]}.")


def diagnostics(run: RunState, layer: int | None = None, overlay_mode: str = "layer") -> dict[str, Any]:
    """Every diagnostics view of a run, at `layer` (default: the layer with the largest budget); the overlay in
    `overlay_mode` ('layer' or 'all layers', the visitor's choice survives re-runs)."""
    from . import explain

    layer = run.default_layer() if layer is None else check_layer(layer, run.num_layers)
    out: dict[str, Any] = {"layer": layer, "overlay_mode": overlay_mode}
    out["overlay"], out["overlay_caption"] = overlay_view(run, layer, overlay_mode)
    out["budgets"], out["budgets_caption"] = budgets_view(run)
    out["attention"], out["attention_caption"] = attention_view(run, layer)
    out["neighbours"], out["neighbours_caption"] = neighbours_view(run)
    out["accumulated"], out["accumulated_caption"] = accumulated_view(run)
    out["explain"] = explain.walkthrough(run)
    return out


__all__ = ["diagnostics", "overlay_view", "attention_view", "budgets_view", "neighbours_view", "accumulated_view",
           "lighten_heatmaps", "legend_markdown", "OVERLAY_MODES"]
