"""Interactive plotly figures for the app: the same data and colours as `plots_mpl`, with hover text."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

from . import explain, palette, ticks
from .arrays import MODALITIES
from .compute import AccumulatedData, AttentionData, BudgetData, ComparisonData, NeighbourData, OverlayData
from .explain import BLOCK
from .legend import LegendEntry, legend_html, overlay_legend
from .overlay import cell_edges, overlay_panels, views_with_image


_PROJ = {"pca": "PCA", "tsne": "t-SNE"}


def _finish(fig: go.Figure, title: str, height: int) -> go.Figure:
    """Shared layout; the template's shape defaults (opacity 0.3) are overridden per line so a black line is black."""
    fig.update_layout(**palette.PLOTLY_LAYOUT, height=height, margin=dict(t=90))
    fig.update_layout(title=dict(text=title, x=0.5, xanchor="center"))
    return fig


def add_legend_below(fig: go.Figure, entries: Sequence[LegendEntry], height: int) -> int:
    """Legend lines under the plot area; returns the figure height grown by the room they take."""
    room = 26 * len(entries) + 20
    fig.add_annotation(text=legend_html(entries), xref="paper", yref="paper", x=0, y=0, yshift=-12, xanchor="left",
                       yanchor="top", align="left", showarrow=False, font=dict(size=14))
    fig.update_layout(margin=dict(b=room + 20))
    return height + room


def set_integer_axis(fig: go.Figure, n: int, row: int | None = None, col: int | None = None, max_ticks: int = 20,
                     start: int = 0) -> None:
    """Whole-number ticks (layers 0..n-1, or k = 1..n with start=1): never 0.5."""
    vals = [start + v for v in ticks.integer_ticks(n, max_ticks)]
    fig.update_xaxes(tickmode="array", tickvals=vals, ticktext=[str(v) for v in vals], row=row, col=col)


def set_log_axis(fig: go.Figure, values: np.ndarray, row: int | None = None, col: int | None = None) -> None:
    """Log y axis labelled once per decade (1, 10, 100 ...) over whole decades."""
    vals, labels = ticks.decade_ticks(values)
    lo, hi = ticks.decade_range(values)
    fig.update_yaxes(type="log", tickmode="array", tickvals=vals, ticktext=labels, range=[lo, hi], row=row, col=col)


def plot_neighbours(d: NeighbourData) -> go.Figure:
    cols = 2 if d.projection is not None else 1
    fig = make_subplots(1, cols, subplot_titles=["within (solid) vs across (dashed)", f"{_PROJ.get(d.projection_method, d.projection_method)} of hidden states"][:cols])
    for name, curve in d.curves.items():
        q, t = name.split("→")
        fig.add_trace(go.Scatter(x=np.arange(1, len(curve) + 1), y=curve, name=name, mode="lines+markers",
                                 line=dict(color=palette.MODALITY[q], width=3, dash="solid" if q == t else "dash"),
                                 hovertemplate=f"{name}<br>k=%{{x}}<br>similarity %{{y:.3f}}<extra></extra>"), 1, 1)
    if d.projection is not None:
        for m, sel in zip(MODALITIES, (~d.is_vision, d.is_vision)):
            pos = np.flatnonzero(sel)
            fig.add_trace(go.Scatter(x=d.projection[sel, 0], y=d.projection[sel, 1], mode="markers", name=m,
                                     marker=dict(color=palette.MODALITY[m], size=7, opacity=0.8),
                                     hovertext=[f"{d.tokens[p]!r} @ {p}" for p in pos], hoverinfo="text"), 1, 2)
    fig.update_xaxes(title_text="k nearest neighbours", row=1, col=1)
    set_integer_axis(fig, max(len(c) for c in d.curves.values()), 1, 1, max_ticks=12, start=1)
    fig.update_yaxes(title_text="mean cosine similarity", row=1, col=1)
    return _finish(fig, explain.neighbours(d), 520)


def _attention_hover(d: AttentionData, rows: np.ndarray, cols: np.ndarray) -> list[list[str]]:
    tok = d.tokens
    return [[f"query {tok[r]!r} @ {r}<br>key {tok[c]!r} @ {c}" for c in cols] for r in rows]


def plot_attention(d: AttentionData) -> go.Figure:
    fig = make_subplots(1, 2, column_widths=[0.55, 0.45], horizontal_spacing=0.08,
                        subplot_titles=["head-averaged attention (log10)" if d.full else "captured text-query rows (log10)",
                                        "zoom: text queries → text keys"])
    T = d.log_rows.shape[1]
    cols = np.arange(T)
    vmin = float(np.nanpercentile(d.log_rows, 1))
    heat = dict(colorscale=palette.ATTENTION.capitalize(), zmin=vmin, zmax=0, hoverinfo="text+z")
    fig.add_trace(go.Heatmap(z=d.log_rows, y=np.arange(len(d.row_positions)), x=cols, colorbar=dict(title="log10"),
                             hovertext=_attention_hover(d, d.row_positions, cols), **heat), 1, 1)
    rsel = np.isin(d.row_positions, d.text_positions)
    fig.add_trace(go.Heatmap(z=d.log_rows[rsel][:, d.text_positions], showscale=False,
                             hovertext=_attention_hover(d, d.row_positions[rsel], d.text_positions), **heat), 1, 2)
    for e in np.flatnonzero(np.diff(d.is_vision.astype(int))) + 0.5:
        fig.add_vline(x=e, line=dict(color=palette.BOUNDARY, width=2), opacity=1, row=1, col=1)
        if d.full:
            fig.add_hline(y=e, line=dict(color=palette.BOUNDARY, width=2), opacity=1, row=1, col=1)
    total = d.block_sums.sum()
    table = "<br>".join(f"{BLOCK[qk]}: {d.block_sums[qk]:.1f} ({d.block_sums[qk] / total:.0%})" for qk in sorted(BLOCK))
    fig.add_annotation(text=table, xref="x domain", yref="y domain", x=0.98, y=0.98, showarrow=False, align="left",
                       bgcolor="white", bordercolor=palette.BOUNDARY, xanchor="right", yanchor="top")
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text="key position", row=1, col=1)
    fig.update_yaxes(title_text="query position" if d.full else "captured query (index)", row=1, col=1)
    return _finish(fig, explain.attention(d), 620)


def plot_accumulated(d: AccumulatedData) -> go.Figure:
    fig = make_subplots(2, 1, row_heights=[0.68, 0.32], shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[f"attention each token receives ({d.source})", "fraction of layers evicting each token"])
    x = np.arange(len(d.accumulated))
    for m, sel in zip(MODALITIES, (~d.is_vision, d.is_vision)):
        fig.add_trace(go.Bar(x=x[sel], y=d.accumulated[sel], name=m, marker_color=palette.MODALITY[m],
                             hovertext=[f"{d.tokens[p]!r} @ {p}" for p in x[sel]], hoverinfo="text+y"), 1, 1)
    rows = d.eviction_rows()  # top to bottom
    hover = [[f"{d.tokens[p]!r} @ {p}" for p in x]] * len(rows)
    fig.add_trace(go.Heatmap(z=np.stack([v for _, v in rows]), x=x, y=[label for label, _ in rows],
                             colorscale=palette.SEQUENTIAL.capitalize(), zmin=0, zmax=1, hovertext=hover,
                             hoverinfo="text+z", colorbar=dict(title="fraction of<br>layers evicting", y=0.15,
                                                               len=0.35)), 2, 1)
    set_log_axis(fig, d.accumulated, 1, 1)
    fig.update_yaxes(title_text="accumulated attention", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=2, col=1)  # first row on top, as eviction_rows() lists them
    fig.update_xaxes(title_text="prompt position", row=2, col=1)
    fig.update_layout(bargap=0)
    return _finish(fig, explain.accumulated(d), 620)


def _add_panel(fig: go.Figure, img: Image.Image, grid_values: dict[str, np.ndarray], row: int, col: int) -> None:
    """The rendered panel plus an invisible heatmap over its cells that carries the hover text."""
    fig.add_trace(go.Image(z=np.asarray(img), hoverinfo="skip"), row, col)
    pos = grid_values["position"]
    rows, cols = pos.shape
    text = np.empty(pos.shape, dtype=object)
    for (r, c), p in np.ndenumerate(pos):
        text[r, c] = f"row {r}, col {c}<br>position {p}<br>" + "<br>".join(
            f"{k} {v[r, c]:.3g}" for k, v in grid_values.items() if k != "position")
    xe, ye = cell_edges(img.size, rows, cols)
    fig.add_trace(go.Heatmap(z=np.zeros(pos.shape), x=(xe[:-1] + xe[1:]) / 2, y=(ye[:-1] + ye[1:]) / 2, opacity=0,
                             showscale=False, hovertext=text, hoverinfo="text"), row, col)
    xname, yname = fig.data[-1].xaxis or "x", fig.data[-1].yaxis or "y"  # this panel's axes: square pixels, y down
    fig.layout["yaxis" + yname[1:]].update(autorange="reversed", scaleanchor=xname, constrain="domain", visible=False)
    fig.layout["xaxis" + xname[1:]].update(constrain="domain", visible=False)


def _overlay_cells(d: OverlayData, vi: int) -> dict[str, np.ndarray]:
    return {"position": d.positions[vi], "kept": d.kept[vi].astype(float), "layers keeping": d.layer_counts[vi],
            "text→image score": d.scores[vi]}


def plot_overlay(d: OverlayData, images: Sequence[Image.Image] | None = None) -> go.Figure:
    kept, counts = overlay_panels(d, images, "kept"), overlay_panels(d, images, "counts")
    titles = [t for pair in zip(kept, counts) for t, _ in pair]
    fig = make_subplots(len(d.views), 2, subplot_titles=titles, vertical_spacing=0.06, horizontal_spacing=0.04)
    for vi in range(len(d.views)):
        _add_panel(fig, kept[vi][1], _overlay_cells(d, vi), vi + 1, 1)
        _add_panel(fig, counts[vi][1], _overlay_cells(d, vi), vi + 1, 2)
    has_image = all(views_with_image(d, images))
    entries = overlay_legend("kept", d.layer, d.num_layers, len(d.top), has_image)
    entries += overlay_legend("counts", d.layer, d.num_layers, 0)
    height = add_legend_below(fig, entries, 120 + 430 * len(d.views))
    return _finish(fig, explain.overlay(d), height)


def plot_budgets(d: BudgetData) -> go.Figure:
    fig = go.Figure()
    layers = np.arange(d.text.shape[1])
    for m, name in enumerate(d.methods):
        line = dict(color=palette.method_colour(m), width=2 if len(d.methods) > 1 else 0)
        for label, vals, base, colour in (("text", d.text[m], None, palette.TEXT), ("vision", d.vision[m], d.text[m], palette.VISION)):
            fig.add_trace(go.Bar(x=layers, y=vals, base=base, offsetgroup=m, name=f"{name}: {label} kept",
                                 marker=dict(color=colour, line=line, pattern_shape="" if m == 0 else "/"),
                                 hovertemplate=f"{name}<br>layer %{{x}}<br>{label} kept %{{y}}<extra></extra>"))
    fig.add_hline(y=d.uniform, line=dict(color=palette.BOUNDARY, dash="dash", width=2), opacity=1,
                  annotation_text=f"uniform budget {d.uniform:.0f}")
    fig.add_hline(y=d.n_text, line=dict(color=palette.TEXT, dash="dot", width=2), opacity=1,
                  annotation_text=f"all text {d.n_text}",
                  annotation_position="bottom right")
    never = np.flatnonzero(d.never_evicted) if d.never_evicted is not None else []
    for layer in never:  # layers that keep everything by construction
        fig.add_vrect(x0=layer - 0.45, x1=layer + 0.45, fillcolor=palette.NEVER_EVICTED, opacity=0.45, line_width=0,
                      layer="below")
    if len(never):
        fig.add_trace(go.Bar(x=[None], y=[None], name="never evicted (own window)", marker_color=palette.NEVER_EVICTED,
                             opacity=0.45, hoverinfo="skip"))
    fig.update_layout(barmode="group", xaxis_title="layer", yaxis_title="kept prompt tokens")
    set_integer_axis(fig, len(layers))
    return _finish(fig, explain.budgets(d), 520)


def plot_comparison(d: ComparisonData, images: Sequence[Image.Image] | None = None) -> go.Figure:
    M, V = len(d.methods), len(d.overlays[0].views) if d.overlays else 0
    specs = [[{"colspan": M}] + [None] * (M - 1)] + [[{}] * M for _ in range(V)]
    panels = [overlay_panels(ov, images, "kept") for ov in d.overlays]
    titles = ["Jaccard of kept sets per layer"] + [f"{d.methods[m]}: {panels[m][v][0]}" for v in range(V) for m in range(M)]
    fig = make_subplots(1 + V, M, specs=specs, subplot_titles=titles, vertical_spacing=0.08)
    layers = np.arange(d.jaccard.shape[1])
    for p, (i, j) in enumerate(d.pairs):
        c = palette.method_colour(p)
        for vals, dash, what in ((d.jaccard[p], "solid", "all tokens"), (d.jaccard_vision[p], "dash", "vision only")):
            fig.add_trace(go.Scatter(x=layers, y=vals, mode="lines+markers", line=dict(color=c, width=3, dash=dash),
                                     name=f"{d.methods[i]} vs {d.methods[j]}: {what}",
                                     hovertemplate="layer %{x}<br>Jaccard %{y:.2f}<extra></extra>"), 1, 1)
    for m, ov in enumerate(d.overlays):
        for v in range(V):
            _add_panel(fig, panels[m][v][1], _overlay_cells(ov, v), 2 + v, 1 + m)
    fig.update_yaxes(range=[0, 1.05], title_text="Jaccard", row=1, col=1)
    fig.update_xaxes(title_text="layer", row=1, col=1)
    set_integer_axis(fig, len(layers), 1, 1)
    height = 380 + 420 * V
    if d.overlays:
        ov = d.overlays[0]
        entries = overlay_legend("kept", ov.layer, ov.num_layers, len(ov.top), all(views_with_image(ov, images)))
        height = add_legend_below(fig, entries, height)
    return _finish(fig, explain.comparison(d), height)
