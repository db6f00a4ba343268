"""Accuracy-vs-budget figures from a summary table: matplotlib PNG and plotly HTML.

One panel per (protocol, turn); one line per method (x: KV budget kept, log scale; y: accuracy); full KV as a
horizontal dashed reference. TGV-KV is drawn thick, baselines solid, TGV-KV ablations dashed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .runner import FULL, TURNS, method_sort_key

TURN_LABEL = {"first": "first question", "followup": "follow-up question (2nd turn, evicted cache)"}


def _panels(table: Sequence[dict]) -> list[tuple[str, str]]:
    protocols = list(dict.fromkeys(r["protocol"] for r in table))
    return [(p, t) for p in protocols for t in TURNS if any(r["protocol"] == p and r["turn"] == t for r in table)]


def _series(table: Sequence[dict], protocol: str, turn: str) -> tuple[dict[str, list[dict]], float | None]:
    rows = [r for r in table if r["protocol"] == protocol and r["turn"] == turn and r["qtype"] == "all"]
    full = next((r["accuracy"] for r in rows if r["method"] == FULL), None)
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] != FULL:
            series.setdefault(r["method"], []).append(r)
    return {m: sorted(series[m], key=lambda r: r["keep"]) for m in sorted(series, key=method_sort_key)}, full


def _style(method: str, i: int) -> dict:
    if method == "tgv-kv":
        return {"color": "#d62728", "lw": 3.0, "ls": "-", "marker": "o"}
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    colors = [cmap(k) for k in range(20) if k not in (6, 7)]  # skip the reds of tgv-kv
    ablation = method.startswith("tgv-")
    return {"color": colors[i % len(colors)], "lw": 1.4, "ls": "--" if ablation else "-", "marker": "s" if ablation else "^"}


def _hex(c) -> str:
    if isinstance(c, str):
        return c
    return "#%02x%02x%02x" % tuple(int(round(255 * v)) for v in c[:3])


def plot_accuracy(table: Sequence[dict], png: str | Path, html: str | Path | None = None, title: str = "",
                  plotly_js: str = "cdn") -> None:
    """Write the PNG (and the interactive HTML when `html` is given). plotly_js: "cdn" (small file, loads plotly.js
    from the web) or "inline" (self-contained, ~4 MB)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _panels(table)
    if not panels:
        raise ValueError("nothing to plot: the summary table is empty")
    methods = sorted({r["method"] for r in table if r["method"] != FULL}, key=method_sort_key)
    styles = {m: _style(m, i) for i, m in enumerate(methods)}
    keeps = sorted({r["keep"] for r in table if r["method"] != FULL})

    fig = Figure(figsize=(6.2 * len(panels) + 2.6, 4.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (protocol, turn) in zip(axes, panels):
        series, full = _series(table, protocol, turn)
        for m, rows in series.items():
            st = styles[m]
            ax.plot([r["keep"] * 100 for r in rows], [r["accuracy"] * 100 for r in rows], label=m, color=st["color"],
                    lw=st["lw"], ls=st["ls"], marker=st["marker"], ms=4)
        if full is not None:
            ax.axhline(full * 100, color="black", ls=":", lw=1.5, label="full KV")
        ax.set_xscale("log")
        if keeps:
            ax.set_xticks([k * 100 for k in keeps])
            ax.set_xticklabels([f"{k * 100:g}%" for k in keeps])
            ax.minorticks_off()
        ax.set_ylim(-2, 102)
        ax.set_xlabel("KV cache budget (fraction of prompt tokens kept)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{TURN_LABEL[turn]}, {protocol} protocol", fontsize=10)
        ax.grid(alpha=0.3)
    right = 1 - 2.4 / (6.2 * len(panels) + 2.6)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(right, 0.5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, right, 1))
    fig.savefig(png, dpi=110, metadata={"Software": None})

    if html is not None:
        _plotly(table, panels, methods, styles, html, title, plotly_js)


def _plotly(table, panels, methods, styles, html, title, plotly_js) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[f"{TURN_LABEL[t]}, {p}" for p, t in panels])
    for col, (protocol, turn) in enumerate(panels, 1):
        series, full = _series(table, protocol, turn)
        for m, rows in series.items():
            st = styles[m]
            fig.add_trace(go.Scatter(
                x=[r["keep"] * 100 for r in rows], y=[r["accuracy"] * 100 for r in rows], mode="lines+markers", name=m,
                legendgroup=m, showlegend=col == 1,
                line={"color": _hex(st["color"]), "width": st["lw"] + 0.5, "dash": "dash" if st["ls"] == "--" else "solid"},
                customdata=[[r["relative_to_full"], r["kv_fraction"], r["n"], r["agree_full"]] for r in rows],
                hovertemplate=(f"<b>{m}</b><br>keep %{{x:g}}%<br>accuracy %{{y:.1f}}%<br>relative to full %{{customdata[0]:.3f}}"
                               "<br>KV kept %{customdata[1]:.3f}<br>same answer as full %{customdata[3]:.3f}"
                               "<br>n %{customdata[2]}<extra></extra>"),
            ), row=1, col=col)
        if full is not None:
            fig.add_hline(y=full * 100, line_dash="dot", line_color="black", row=1, col=col,
                          annotation_text=f"full KV {full * 100:.1f}%", annotation_position="bottom right")
        fig.update_xaxes(type="log", title_text="KV cache budget (%)", row=1, col=col)
        fig.update_yaxes(range=[-2, 102], title_text="accuracy (%)", row=1, col=col)
    fig.update_layout(title=title, template="plotly_white", height=520, width=560 * len(panels) + 220)
    fig.write_html(str(html), include_plotlyjs="cdn" if plotly_js == "cdn" else True, full_html=True,
                   div_id="accuracy-vs-budget")
