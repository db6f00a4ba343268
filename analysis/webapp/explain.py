"""The Explain tab: a guided TVB -> TWR -> TPR walkthrough of the current run, computed from its trace.

Every number comes from TGV-KV's own code: for a run whose policy ranked vision by TWR (tgv-kv and the ablations
that keep TWR) the ones its selection recorded (`Trace.tgv_details`); for any other method the same policy functions
(`TGVKV.vision_scores`, `blocks.tvb_statistic`) applied to the text-query attention rows the trace stored, so a
visitor can see what TGV-KV *would* have looked at, next to what the chosen method actually kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tgvkv.policies import TGVKV, blocks
from tgvkv.stats import PrefillStats
from tgvkv.trace import Trace

if TYPE_CHECKING:
    from .state import RunState

FONT = dict(size=17)  # projector-readable
TOP_TEXT = 3  # heaviest text tokens named in step 2


@dataclass
class TGVQuantities:
    """TVB mass per layer, TWR text weights and vision scores (`TGVDetails`' arrays, as float64)."""

    mass: np.ndarray  # (L,) text->vision attention mass s_l
    text_positions: np.ndarray  # (Q,) the text queries after the first image (official "post" region)
    text_weights: np.ndarray  # (L, Q) w_k: attention a text token receives from later text, per seeing query
    vision_scores: np.ndarray  # (L, V) sum_q TI[q, v] * w_q
    from_policy: bool  # True: read from the run's own selection record; False: TGV-KV's functions on stored rows


def tgv_quantities(trace: Trace) -> TGVQuantities:
    q = trace.layout.text_query_positions
    details = trace.tgv_details()
    if details is not None and details.text_weights is not None:  # the run ranked vision by TWR: its own numbers
        return TGVQuantities(np.asarray(details.tvb_mass, float), q, np.asarray(details.text_weights, float),
                             np.asarray(details.vision_scores, float), True)
    if trace.query_rows is None or trace.query_positions is None or not np.all(np.isin(q, trace.query_positions)):
        raise ValueError("the trace holds no attention rows for the text queries; cannot explain text grounding")
    stats = PrefillStats(rows=np.asarray(trace.query_rows), query_positions=np.asarray(trace.query_positions))
    vision, weights = TGVKV().vision_scores(stats, trace.layout)
    return TGVQuantities(blocks.tvb_statistic(stats, trace.layout), q, weights, vision, False)


@dataclass
class ExplainNumbers:
    """Every number the walkthrough quotes or draws besides the patch overlay, from the trace alone."""

    quantities: TGVQuantities
    share: np.ndarray  # (L,) each layer's share of the text->vision attention mass
    budgets: np.ndarray  # (L,) kept prompt tokens per layer: the run's own budgets, whatever its method
    mean_text_weights: np.ndarray  # (Q,) text weight of each text query, averaged over layers
    top_text: np.ndarray  # (TOP_TEXT,) indices into `quantities.text_positions`, heaviest first
    text_kept: np.ndarray  # (L,) text tokens the run kept per layer


def explain_numbers(trace: Trace) -> ExplainNumbers:
    """The walkthrough's numbers; ValueError when the trace cannot explain text grounding (no text-query rows)."""
    tq = tgv_quantities(trace)
    L, T = trace.num_layers, trace.seq_len
    kept = trace.kept_mask if trace.kept_mask is not None else np.ones((L, T), bool)
    w = tq.text_weights.mean(axis=0)
    return ExplainNumbers(
        quantities=tq,
        share=tq.mass / max(tq.mass.sum(), 1e-12),
        budgets=trace.budgets if trace.budgets is not None else np.full(L, T),
        mean_text_weights=w,
        top_text=np.argsort(-w)[:TOP_TEXT],
        text_kept=kept[:, ~trace.layout.is_vision].sum(axis=1),
    )


def _place(row: int, col: int, rows: int, cols: int) -> str:
    """Words for where a patch is: the 3x3 position names of the demo scenes."""
    r, c = min(2, row * 3 // max(rows, 1)), min(2, col * 3 // max(cols, 1))
    if (r, c) == (1, 1):
        return "center"
    return f"{('top', 'middle', 'bottom')[r]} {('left', 'middle', 'right')[c]}"


def _token(tokens: list[str], p: int) -> str:
    t = tokens[p] if p < len(tokens) else f"#{p}"
    return t.replace("▁", " ").replace("Ġ", " ").strip() or "␣"


def tvb_figure(trace: Trace, nums: ExplainNumbers) -> go.Figure:
    from analysis import palette
    from analysis.ticks import integer_ticks

    L, T = trace.num_layers, trace.seq_len
    share, budgets = nums.share, nums.budgets
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=np.arange(L), y=share * 100, name="share of text→image attention (%)",
                         marker_color=palette.VISION, hovertemplate="layer %{x}: %{y:.1f}%<extra></extra>"),
                  secondary_y=False)
    fig.add_trace(go.Scatter(x=np.arange(L), y=budgets, name=f"kept prompt tokens ({trace.method})", mode="lines+markers",
                             line=dict(color=palette.TEXT, width=4), marker=dict(size=11)), secondary_y=True)
    fig.add_trace(go.Scatter(x=[-0.5, L - 0.5], y=[trace.keep_ratio * T] * 2, name="uniform budget", mode="lines",
                             line=dict(color=palette.REFERENCE, dash="dash", width=2)), secondary_y=True)
    fig.update_layout(template="simple_white", height=380, font=FONT, margin=dict(t=30, b=50),
                      legend=dict(orientation="h", y=1.12, x=0), bargap=0.25)
    layer_ticks = integer_ticks(L)
    fig.update_xaxes(title_text="layer", tickmode="array", tickvals=layer_ticks, ticktext=[str(v) for v in layer_ticks])
    fig.update_yaxes(title_text="text→image share (%)", secondary_y=False)
    fig.update_yaxes(title_text="kept tokens", secondary_y=True, rangemode="tozero")
    return fig


def twr_figure(trace: Trace, nums: ExplainNumbers) -> go.Figure:
    from analysis import palette

    tokens = list(trace.layout.tokens)
    w = nums.mean_text_weights
    labels = [f"{_token(tokens, p)} @{p}" for p in nums.quantities.text_positions]
    best = set(nums.top_text.tolist())
    colours = [palette.HIGHLIGHT if i in best else palette.TEXT for i in range(len(w))]
    fig = go.Figure(go.Bar(x=w, y=labels, orientation="h", marker_color=colours,
                           hovertemplate="%{y}: weight %{x:.3f}<extra></extra>"))
    fig.update_layout(template="simple_white", height=max(260, 34 * len(w) + 90), font=FONT, margin=dict(t=20, l=10),
                      xaxis_title="text weight w (mean over layers)")
    fig.update_yaxes(autorange="reversed", automargin=True)
    return fig


def walkthrough(run: "RunState") -> dict[str, Any]:
    """Markdown + figures for the Explain tab: keys intro, tvb, tvb_figure, twr, twr_figure, tpr, tpr_image."""
    from analysis import compute_overlay, overlay_panels, palette

    colour = palette.name_of
    trace = run.evicted
    lay, L, T = trace.layout, trace.num_layers, trace.seq_len
    n_text, n_vis = T - lay.n_vision, lay.n_vision
    out: dict[str, Any] = {"tvb_figure": None, "twr_figure": None, "tpr_image": None}
    try:
        nums = explain_numbers(trace)
    except ValueError as e:
        out.update(intro=f"### Walkthrough unavailable\n{e}", tvb="", twr="", tpr="")
        return out
    tq = nums.quantities
    source = ("These are the numbers TGV-KV used for this run." if tq.from_policy else
              f"This run used **{trace.method}**, not TGV-KV: the numbers below are what TGV-KV *would* compute from "
              "the same attention; the budgets and kept patches shown are the ones **" + trace.method + "** chose.")
    out["intro"] = (
        f"### How TGV-KV decides what to keep\nQuestion: **{run.question}** · prompt of **{T} tokens** "
        f"({n_vis} image tokens, {n_text} text tokens) · **{L} layers** · keep **{trace.keep_ratio:.0%}** of the KV "
        f"cache, i.e. about **{trace.keep_ratio * T:.0f} tokens per layer** on average.\n\n"
        "TGV-KV lets the **text** decide, in three steps: **TVB** splits the memory between layers, **TWR** ranks the "
        "image patches, **TPR** protects the text. " + source)

    # Step 1: TVB
    share, budgets = nums.share, nums.budgets
    order = np.argsort(-share)
    hi, lo = int(order[0]), int(order[-1])
    capped = np.flatnonzero(budgets >= T)
    out["tvb_figure"] = tvb_figure(trace, nums)
    out["tvb"] = (
        "#### Step 1 · TVB, text-vision budgeting: which layers get memory\n"
        f"Each layer's budget is proportional to how much attention its text tokens pay to the image. "
        f"**Layer {hi}** carries **{share[hi]:.0%}** of all text→image attention and keeps **{budgets[hi]}** tokens; "
        f"**layer {lo}** carries only {share[lo]:.0%} and keeps **{budgets[lo]}**"
        + (" (the floor: 4 sink tokens + the last token)" if budgets[lo] <= 5 else "") + ". "
        f"A uniform split would give every layer {trace.keep_ratio * T:.0f}."
        + (f" Layers {', '.join(map(str, capped))} asked for more than the whole prompt; the official rule keeps "
           f"all {T} there and does not hand the surplus to other layers." if len(capped) and trace.keep_ratio < 1 else "")
        + (f"\n\n*What to notice:* the {colour(palette.VISION)} bars (attention share) and the "
           f"{colour(palette.TEXT)} line (kept tokens) rise and fall together: memory goes where the question "
           "actually looks at the image." if tq.from_policy else
           f"\n\n*What to notice:* the {colour(palette.TEXT)} line is {trace.method}'s own budget per layer; where "
           f"it departs from the {colour(palette.VISION)} bars, this method spends memory on layers whose text barely "
           "looks at the image.")
        + f" The {colour(palette.REFERENCE)} dashed line is the uniform budget.")

    # Step 2: TWR
    tokens = list(lay.tokens)
    w = nums.mean_text_weights
    names = ", ".join(f"**{_token(tokens, int(tq.text_positions[i]))!s}** ({w[i]:.2f})" for i in nums.top_text)
    out["twr_figure"] = twr_figure(trace, nums)
    out["twr"] = (
        "#### Step 2 · TWR, text-weighted ranking: which words count\n"
        "An image patch scores the attention it gets from each text token, weighted by how important that text token "
        "is, and a text token is important when later text tokens attend to it (its weight w = attention received "
        f"per text token that can see it). The heaviest text tokens here: {names} ({colour(palette.HIGHLIGHT)} "
        f"bars; the others are {colour(palette.TEXT)}).\n\n"
        "*What to notice:* content words of the question (the object, the colour, the position) should outweigh "
        "template tokens; if punctuation or chat-template tokens win, the ranking is driven by position, not meaning.")

    # Step 3: TPR + winners
    layer = run.default_layer()
    text_kept = nums.text_kept
    full_text_layers = np.flatnonzero(text_kept == n_text)
    lost = np.flatnonzero(text_kept < n_text)
    tpr = (f"#### Step 3 · TPR, text-prioritised retention: text first, then the best patches\n"
           f"Text is kept before any image patch: all {n_text} text tokens survive in **{len(full_text_layers)} of {L}** "
           "layers" + (f"; layers {', '.join(map(str, lost))} lose some text because their budget "
                       f"({', '.join(str(int(budgets[l])) for l in lost)}) is smaller than the text." if len(lost) else ".")
           + " The rest of each budget goes to the top-ranked patches.")
    try:
        ov = compute_overlay(trace, layer, top_k=5)
        panels = overlay_panels(ov, [run.image], "kept")
        out["tpr_image"] = panels[0][1]
        wins = []
        for v, r, c in ov.top:
            view = ov.views[v]
            wins.append(f"row {r}, col {c} ({_place(r, c, view.rows, view.cols)})")
        tpr += (f"\n\nIn **layer {layer}** (largest budget) the image keeps **{ov.n_kept_vision} of {ov.n_vision}** "
                f"patches. Top text→image patches ({colour(palette.HIGHLIGHT)} boxes): {'; '.join(wins)}.")
    except (ValueError, AttributeError) as e:
        tpr += f"\n\n(No patch overlay for this model: {e})"
    out["tpr"] = tpr + (f"\n\n*What to notice:* the patches inside the {colour(palette.KEPT)} outline keep their "
                        f"pixels: they are what the model can still see; {colour(palette.EVICTED_FILL)} patches are "
                        "evicted. On the demo scenes the answer needs the 2×2 patches of the object the question "
                        f"names, so check that the {colour(palette.HIGHLIGHT)} boxes sit on it. Compare with a "
                        "baseline in the *Compare methods* tab.")
    return out
