"""Accuracy-vs-budget figures from a summary table: matplotlib PNG and plotly HTML.

Columns: (protocol, turn); rows: TGV-KV vs baselines, TGV-KV vs ablations; one line per method (x: KV budget kept, log scale; y: accuracy); full KV as a
horizontal dashed reference. TGV-KV is drawn thick, baselines solid, TGV-KV ablations dashed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..policies import method_kind, method_sort_key
from .runner import FULL, TURNS

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


def _groups(methods: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Figure rows: TGV-KV against the baselines, then TGV-KV against its ablations (when there are any).

    Kinds come from the registry; a method it does not hold (a row of an older results folder) is drawn with the
    baselines."""
    kinds = {m: method_kind(m) for m in methods}
    base = [m for m in methods if kinds[m] != "tgv-ablation"]
    abl = [m for m in methods if kinds[m] in ("tgv", "tgv-ablation")]
    groups = [("TGV-KV vs baselines", base)]
    if any(kinds[m] == "tgv-ablation" for m in abl):
        groups.append(("TGV-KV vs its ablations", abl))
    return groups


_PALETTE = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#ff7f0e",
            "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]


def _style(method: str, i: int) -> dict:
    if method == "tgv-kv":
        return {"color": "#d62728", "lw": 3.0, "ls": "-", "marker": "o"}
    ablation = method_kind(method) == "tgv-ablation"
    return {"color": _PALETTE[i % len(_PALETTE)], "lw": 1.6, "ls": "--" if ablation else "-",
            "marker": "s" if ablation else "^"}


def _hex(c) -> str:
    if isinstance(c, str):
        return c
    return "#%02x%02x%02x" % tuple(int(round(255 * v)) for v in c[:3])


def plot_accuracy(table: Sequence[dict], png: str | Path, html: str | Path | None = None, title: str = "",
                  plotly_js: str = "cdn") -> None:
    """Write the PNG (and the interactive HTML when `html` is given). Columns: protocol x turn; rows: TGV-KV vs the
    baselines, TGV-KV vs its ablations. plotly_js: "cdn" (small file, loads plotly.js from the web) or "inline"
    (self-contained, ~4 MB)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _panels(table)
    if not panels:
        raise ValueError("nothing to plot: the summary table is empty")
    methods = sorted({r["method"] for r in table if r["method"] != FULL}, key=method_sort_key)
    groups = _groups(methods)
    styles = {}
    for _, ms in groups:
        for i, m in enumerate(x for x in ms if x != "tgv-kv"):
            styles[m] = _style(m, i)
    styles["tgv-kv"] = _style("tgv-kv", 0)
    keeps = sorted({r["keep"] for r in table if r["method"] != FULL})

    width = 5.6 * len(panels) + 3.0
    fig = Figure(figsize=(width, 4.3 * len(groups)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), len(panels), squeeze=False)
    for gi, (gname, gmethods) in enumerate(groups):
        for ax, (protocol, turn) in zip(axes[gi], panels):
            series, full = _series(table, protocol, turn)
            for m in gmethods:
                if m not in series:
                    continue
                rows, st = series[m], styles[m]
                ax.plot([r["keep"] * 100 for r in rows], [r["accuracy"] * 100 for r in rows], label=m,
                        color=st["color"], lw=st["lw"], ls=st["ls"], marker=st["marker"], ms=4, zorder=3 if m == "tgv-kv" else 2)
            if full is not None:
                ax.axhline(full * 100, color="black", ls=":", lw=1.5, label="full KV")
            ax.set_xscale("log")
            if keeps:
                ax.set_xticks([k * 100 for k in keeps])
                ax.set_xticklabels([f"{k * 100:g}%" for k in keeps])
                ax.minorticks_off()
            ax.set_ylim(-2, 102)
            ax.set_xlabel("KV cache budget (prompt tokens kept)")
            ax.set_ylabel("accuracy (%)")
            ax.set_title(f"{gname}: {TURN_LABEL[turn]}, {protocol}", fontsize=9)
            ax.grid(alpha=0.3)
        handles, labels = axes[gi][0].get_legend_handles_labels()
        axes[gi][-1].legend(handles, labels, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=110, metadata={"Software": None})

    if html is not None:
        _plotly(table, panels, groups, styles, html, title, plotly_js)


def _plotly(table, panels, groups, styles, html, title, plotly_js) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    titles = [f"{g}: {TURN_LABEL[t]}, {p}" for g, _ in groups for p, t in panels]
    fig = make_subplots(rows=len(groups), cols=len(panels), subplot_titles=titles, vertical_spacing=0.12)
    shown: set[str] = set()
    for gi, (_, gmethods) in enumerate(groups, 1):
        for col, (protocol, turn) in enumerate(panels, 1):
            series, full = _series(table, protocol, turn)
            for m in gmethods:
                if m not in series:
                    continue
                rows, st = series[m], styles[m]
                fig.add_trace(go.Scatter(
                    x=[r["keep"] * 100 for r in rows], y=[r["accuracy"] * 100 for r in rows], mode="lines+markers",
                    name=m, legendgroup=m, showlegend=m not in shown,
                    line={"color": _hex(st["color"]), "width": st["lw"] + 0.5, "dash": "dash" if st["ls"] == "--" else "solid"},
                    customdata=[[r["relative_to_full"], r["kv_fraction"], r["n"], r["agree_full"]] for r in rows],
                    hovertemplate=(f"<b>{m}</b><br>keep %{{x:g}}%<br>accuracy %{{y:.1f}}%<br>relative to full %{{customdata[0]:.3f}}"
                                   "<br>KV kept %{customdata[1]:.3f}<br>same answer as full %{customdata[3]:.3f}"
                                   "<br>n %{customdata[2]}<extra></extra>"),
                ), row=gi, col=col)
                shown.add(m)
            if full is not None:
                fig.add_hline(y=full * 100, line_dash="dot", line_color="black", row=gi, col=col,
                              annotation_text=f"full KV {full * 100:.1f}%", annotation_position="bottom right")
            fig.update_xaxes(type="log", title_text="KV cache budget (%)", row=gi, col=col)
            fig.update_yaxes(range=[-2, 102], title_text="accuracy (%)", row=gi, col=col)
    fig.update_layout(title=title, template="plotly_white", height=460 * len(groups), width=520 * len(panels) + 240)
    fig.write_html(str(html), include_plotlyjs="cdn" if plotly_js == "cdn" else True, full_html=True,
                   div_id="accuracy-vs-budget")
