"""Static matplotlib figures (object-oriented `Figure`, never pyplot) for papers and slides.

Every `plot_x(data)` takes the dataclass of `compute.compute_x` and returns a `matplotlib.figure.Figure` styled for a
projector (fonts >= 14 pt, thick lines, 150 dpi); the title states the finding (`explain`).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import matplotlib as mpl
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from PIL import Image

from . import explain, palette, ticks
from .arrays import MODALITIES
from .compute import AccumulatedData, AttentionData, BudgetData, ComparisonData, NeighbourData, OverlayData
from .explain import BLOCK
from .legend import LegendEntry, accumulated_legend, budgets_legend, overlay_legend
from .overlay import overlay_panels, views_with_image


def projector_style(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    """Build the figure inside `rc_context(palette.MPL_STYLE)`: the style never leaks into global rcParams."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> Figure:
        with mpl.rc_context(palette.MPL_STYLE):
            return fn(*args, **kwargs)
    return wrapper


def _title(fig: Figure, text: str) -> None:
    """Finding as a suptitle, wrapped to two lines if long."""
    if len(text) > 80:
        cut = text.rfind(" ", 0, len(text) // 2 + 15)
        text = text[:cut] + "\n" + text[cut + 1 :]
    fig.suptitle(text, fontweight="bold")


@projector_style
def plot_neighbours(d: NeighbourData) -> Figure:
    fig = Figure(figsize=(14 if d.projection is not None else 8, 6), layout="constrained")
    axes = fig.subplots(1, 2 if d.projection is not None else 1, squeeze=False)[0]
    for name, curve in d.curves.items():
        q, t = name.split("→")
        k = np.arange(1, len(curve) + 1)
        axes[0].plot(k, curve, color=palette.MODALITY[q], ls="-" if q == t else "--", marker="o", label=name)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set(xlabel="k nearest neighbours", ylabel="mean cosine similarity", title="within (solid) vs across (dashed)")
    axes[0].legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2)
    if d.projection is not None:
        for m, sel in zip(MODALITIES, (~d.is_vision, d.is_vision)):
            axes[1].scatter(*d.projection[sel].T, s=36, color=palette.MODALITY[m], label=m, alpha=0.8, edgecolor="none")
        axes[1].set(title=f"{ {'pca': 'PCA', 'tsne': 't-SNE'}.get(d.projection_method, d.projection_method)} of hidden states", xticks=[], yticks=[])
        axes[1].legend(frameon=False, markerscale=1.5)
    _title(fig, explain.neighbours(d))
    return fig


def _draw_blocks(ax, d: AttentionData, rows: int) -> None:
    """Modality boundaries on the key axis (and the query axis of full maps), block totals at block centres."""
    edges = np.flatnonzero(np.diff(d.is_vision.astype(int))) + 0.5
    for e in edges:
        ax.axvline(e, color=palette.BOUNDARY, lw=1.5)
        if d.full:
            ax.axhline(e, color=palette.BOUNDARY, lw=1.5)
    total = d.block_sums.sum()
    n_rows, n_cols = d.log_rows.shape
    for (q, k), (r0, r1, c0, c1) in d.label_boxes.items():
        if d.full and (r1 - r0) >= 0.12 * n_rows and (c1 - c0) >= 0.12 * n_cols:  # label big blocks in place
            ax.text((c0 + c1) / 2, (r0 + r1) / 2, BLOCK[(q, k)], ha="center", va="center", fontsize=15,
                    fontweight="bold", bbox=dict(facecolor="white", alpha=0.85, edgecolor="none", pad=2))
    if d.full:  # the causally masked upper-right triangle is empty: room for the totals
        table = "query→key  total  share\n" + "\n".join(
            f"{BLOCK[qk]:>9}  {d.block_sums[qk]:5.1f}  {d.block_sums[qk] / total:5.0%}" for qk in sorted(BLOCK))
        ax.text(0.98, 0.98, table, transform=ax.transAxes, ha="right", va="top", family="monospace", fontsize=14,
                bbox=dict(facecolor="white", alpha=0.9, edgecolor=palette.BOUNDARY, pad=4))
    else:
        cells = [f"{BLOCK[qk]} {d.block_sums[qk]:.1f} ({d.block_sums[qk] / total:.0%})" for qk in sorted(BLOCK)]
        ax.set_xlabel(f"key position\nblock totals: {cells[0]} · {cells[1]}\n{cells[2]} · {cells[3]}")


@projector_style
def plot_attention(d: AttentionData) -> Figure:
    fig = Figure(figsize=(16, 7.5), layout="constrained")
    ax_map, ax_tt = fig.subplots(1, 2, width_ratios=[1.15, 1])
    vmin = np.nanpercentile(d.log_rows, 1)
    im = ax_map.imshow(d.log_rows, cmap=palette.ATTENTION, vmin=vmin, vmax=0, aspect="auto", interpolation="nearest")
    _draw_blocks(ax_map, d, len(d.row_positions))
    ax_map.set(ylabel="query position", title="head-averaged attention (log10)" if d.full else "captured text-query rows")
    if d.full:
        ax_map.set_xlabel("key position")
    else:
        _token_ticks(ax_map, [], [str(p) for p in d.row_positions], max_labels=12)
    tpos = d.text_positions
    rsel = np.isin(d.row_positions, tpos)
    tt = d.log_rows[rsel][:, tpos]
    ax_tt.imshow(tt, cmap=palette.ATTENTION, vmin=vmin, vmax=0, aspect="auto", interpolation="nearest")
    _token_ticks(ax_tt, [d.tokens[p] for p in tpos], [d.tokens[p] for p in d.row_positions[rsel]])
    ax_tt.set(title="zoom: text queries → text keys")
    fig.colorbar(im, ax=[ax_map, ax_tt], label="log10(attention + 1e-6)", shrink=0.9)
    _title(fig, explain.attention(d))
    return fig


def _token_ticks(ax, xtoks: Sequence[str], ytoks: Sequence[str], max_labels: int = 24) -> None:
    for axis, toks, rot in ((ax.xaxis, xtoks, 90), (ax.yaxis, ytoks, 0)):
        if not toks:
            continue
        step = max(1, int(np.ceil(len(toks) / max_labels)))
        ticks = np.arange(0, len(toks), step)
        axis.set_ticks(ticks, [toks[i] for i in ticks], rotation=rot, fontsize=14)


@projector_style
def plot_accumulated(d: AccumulatedData) -> Figure:
    fig = Figure(figsize=(16, 8), layout="constrained")
    ax, ax_ev = fig.subplots(2, 1, height_ratios=[2.2, 1], sharex=True)
    x = np.arange(len(d.accumulated))
    for m, sel in zip(MODALITIES, (~d.is_vision, d.is_vision)):
        ax.bar(x[sel], d.accumulated[sel], width=1.0, color=palette.MODALITY[m], label=m)
    ax.set(yscale="log", ylabel="accumulated attention\n(sum over queries, layers)",
           title=f"attention each token receives ({d.source}); attention-only = top tokens by it, same per-layer budgets")
    set_log_ticks(ax, d.accumulated)
    ax.legend(handles=legend_handles(accumulated_legend()[:2]), frameon=False, loc="upper right")
    rows = d.eviction_rows()  # top to bottom
    im = ax_ev.imshow(np.stack([v for _, v in rows]), aspect="auto", cmap=palette.SEQUENTIAL, vmin=0, vmax=1,
                      interpolation="nearest", extent=(-0.5, len(x) - 0.5, len(rows) - 0.5, -0.5))
    ax_ev.set_yticks(np.arange(len(rows)), [label for label, _ in rows])
    ax_ev.set(xlabel="prompt position", title="fraction of layers evicting each token")
    fig.colorbar(im, ax=ax_ev, label="fraction of layers evicting", shrink=0.9)
    _title(fig, explain.accumulated(d))
    return fig


def set_log_ticks(ax, values, which: str = "y") -> None:
    """Log axis with one labelled tick per decade (1, 10, 100 ...), unlabelled minor ticks, limits at whole decades."""
    from matplotlib.ticker import NullFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = ticks.decade_range(values)
    (ax.set_ylim if which == "y" else ax.set_xlim)(10.0 ** lo, 10.0 ** hi)
    axis.set_ticks(*ticks.decade_ticks(values))
    axis.set_minor_formatter(NullFormatter())


def set_integer_ticks(axis, n: int, max_ticks: int = 20) -> None:
    """Whole-number ticks 0..n-1 (a layer axis never shows 0.5)."""
    axis.set_ticks(ticks.integer_ticks(n, max_ticks))


def legend_handles(entries: Sequence[LegendEntry]) -> list:
    """matplotlib legend handles drawn like the marks they describe, labelled with the entries' meanings."""
    handles = []
    for e in entries:
        label = e.meaning
        if e.mark in ("outline", "boxes"):
            handles.append(Patch(facecolor="none", edgecolor=e.colour, lw=3, label=label))
        elif e.mark in ("patches", "bars"):
            handles.append(Patch(facecolor=e.colour, label=label))
        elif e.mark.endswith("line"):
            ls = {"line": "-", "dashed line": "--", "dotted line": ":"}[e.mark]
            handles.append(Line2D([], [], color=e.colour, ls=ls, lw=2.5, label=label))
        else:
            raise ValueError(f"legend mark {e.mark!r} has no matplotlib handle (colour scales get a colour bar)")
    return handles


def _show_panels(axes, panels: list[tuple[str, Image.Image]]) -> None:
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(np.asarray(img), interpolation="nearest")
        ax.set_title(title, fontsize=14)
        ax.set_axis_off()


@projector_style
def plot_overlay(d: OverlayData, images: Sequence[Image.Image] | None = None) -> Figure:
    """Rows: views; columns: kept at the layer / number of layers keeping each patch."""
    kept, counts = overlay_panels(d, images, "kept"), overlay_panels(d, images, "counts")
    heights = [img.size[1] / img.size[0] for _, img in kept]  # rows sized to each view's aspect ratio
    fig = Figure(figsize=(11, 4.3 * sum(heights) + 0.6 * len(heights) + 1.4), layout="constrained")
    axes = fig.subplots(len(d.views), 2, squeeze=False, height_ratios=heights)
    _show_panels(axes[:, 0], kept)
    _show_panels(axes[:, 1], counts)
    entries = overlay_legend("kept", d.layer, d.num_layers, len(d.top), all(views_with_image(d, images)))
    fig.legend(handles=legend_handles(entries), loc="outside lower center", ncols=1, frameon=False)
    sm = ScalarMappable(Normalize(0, d.num_layers), palette.SEQUENTIAL)
    cbar = fig.colorbar(sm, ax=axes[:, 1], label="layers keeping the patch", shrink=0.8)
    cbar.locator = MaxNLocator(integer=True)
    cbar.update_ticks()
    _title(fig, explain.overlay(d))
    return fig


@projector_style
def plot_budgets(d: BudgetData) -> Figure:
    M, L = d.text.shape
    fig = Figure(figsize=(max(10, 0.5 * L * M + 4), 6.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / M
    for m in range(M):
        x = np.arange(L) + (m - (M - 1) / 2) * width
        ax.bar(x, d.text[m], width, color=palette.TEXT, edgecolor=palette.method_colour(m), lw=2 if M > 1 else 0,
               hatch=None if m == 0 else "//")
        ax.bar(x, d.vision[m], width, bottom=d.text[m], color=palette.VISION, edgecolor=palette.method_colour(m),
               lw=2 if M > 1 else 0, hatch=None if m == 0 else "//")
    ax.axhline(d.uniform, color=palette.BOUNDARY, ls="--", lw=2)
    ax.axhline(d.n_text, color=palette.TEXT, ls=":", lw=2.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    never = np.flatnonzero(d.never_evicted) if d.never_evicted is not None else []
    for layer in never:  # layers that keep everything by construction, behind the bars
        ax.axvspan(layer - 0.45, layer + 0.45, color=palette.NEVER_EVICTED, alpha=0.45, lw=0, zorder=0)
    handles = legend_handles(budgets_legend(d.uniform, d.n_text))
    if len(never):
        handles.append(Patch(color=palette.NEVER_EVICTED, alpha=0.45, label="never evicted (own window)"))
    handles += [Patch(facecolor="white", edgecolor=palette.method_colour(m), lw=2, hatch=None if m == 0 else "//",
                      label=name) for m, name in enumerate(d.methods)] if M > 1 else []
    ax.legend(handles=handles, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set(xlabel="layer", ylabel="kept prompt tokens")
    set_integer_ticks(ax.xaxis, L)
    _title(fig, explain.budgets(d))
    return fig


@projector_style
def plot_comparison(d: ComparisonData, images: Sequence[Image.Image] | None = None) -> Figure:
    """Top: Jaccard of kept sets per layer; below: the methods' overlays side by side (one row per view)."""
    M, V = len(d.methods), len(d.overlays[0].views) if d.overlays else 0
    fig = Figure(figsize=(max(12, 5 * M), 5 + 4.8 * V), layout="constrained")
    grid = fig.add_gridspec(1 + V, M, height_ratios=[1.0] + [1.2] * V)
    ax = fig.add_subplot(grid[0, :])
    for p, (i, j) in enumerate(d.pairs):
        c = palette.method_colour(p)
        ax.plot(d.jaccard[p], color=c, marker="o", label=f"{d.methods[i]} vs {d.methods[j]}")
        ax.plot(d.jaccard_vision[p], color=c, ls="--", marker="s")
    set_integer_ticks(ax.xaxis, d.jaccard.shape[1])
    ax.set(xlabel="layer", ylabel="Jaccard of kept sets", ylim=(-0.02, 1.05),
           title="solid: all prompt tokens · dashed: vision tokens only")
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for m, ov in enumerate(d.overlays):
        axes = [fig.add_subplot(grid[1 + v, m]) for v in range(V)]
        _show_panels(axes, [(f"{d.methods[m]}: {t}", img) for t, img in overlay_panels(ov, images, "kept")])
    if d.overlays:
        ov = d.overlays[0]
        entries = overlay_legend("kept", ov.layer, ov.num_layers, len(ov.top), all(views_with_image(ov, images)))
        fig.legend(handles=legend_handles(entries), loc="outside lower center", ncols=1, frameon=False)
    _title(fig, explain.comparison(d))
    return fig
