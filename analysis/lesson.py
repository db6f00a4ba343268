"""A lesson: the paper's claims walked through on one input, one figure and two or three computed sentences per step.

    python -m analysis.lesson --trace run.npz --out lesson.html [--full full.npz] [--strict strict.npz]
                              [--followup-probe probe.npz] [--image scene.png] [--pdf lesson.pdf]

Steps (each reads the traces; nothing here runs a model or re-implements a selection rule):
modality gap (cosine neighbours) -> uneven attention (accumulated attention) -> text-guided budgets (TVB) ->
text-weighted ranking (TWR) -> text-first retention (TPR) -> what eviction did to the answer (official and strict
protocol) -> a follow-up question about another region. Every step states plainly where the method (or the claim)
failed on this input when it did (``LessonStep.failure``).

Outputs: ``deck_html`` (the slides, for the app), ``lesson_html`` (one self-contained file: PNGs as data URIs,
plotly.js inlined, works offline) and ``write_pdf`` (one 16:9 page per step, matplotlib).
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import logging
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import matplotlib as mpl
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from PIL import Image

from tgvkv.trace import Trace

from . import arrays as A
from . import palette
from .compute import (compute_accumulated, compute_budgets, compute_neighbours, compute_overlay, hidden_label,
                      text_to_image_scores)
from .overlay import overlay_panels

log = logging.getLogger(__name__)

#: matplotlib style of lesson figures: sized so that text stays >= ~20 px when a figure fills a 1280x720 slide
SLIDE_STYLE: dict[str, Any] = {**palette.MPL_STYLE, "font.size": 17, "axes.titlesize": 18, "axes.labelsize": 17,
                               "xtick.labelsize": 15, "ytick.labelsize": 15, "legend.fontsize": 15,
                               "savefig.bbox": "tight", "figure.dpi": 110, "savefig.dpi": 110}
FIGSIZE = (8.4, 5.2)  # inches: about 920 x 570 px at 110 dpi, the left 60 % of a 1280 x 720 slide
KL_NOTICEABLE = 0.1  # nats, as in the app's divergence caption
TOP_PATCHES = 4


# -- inputs and records -------------------------------------------------------------------------------------------
@dataclass
class ProtocolRun:
    """The evicted run under one protocol and how it compares with the full-KV answer."""

    protocol: str  # "official" | "strict"
    evicted: Trace
    step_kl: np.ndarray | None = None  # (G_full,) KL(full || evicted) per full-answer step; None when not measured

    def first_divergence(self, full: Trace) -> int | None:
        return first_divergence(full.output_ids, self.evicted.output_ids)


@dataclass
class LessonInput:
    """What a lesson reads: the full-KV run, the evicted run(s) and, for the follow-up step, a probe run.

    `followup_probe` is a full-KV run with the follow-up asked as the first question: its text->image attention says
    which patches the follow-up needs, without any eviction.
    """

    full: Trace
    official: ProtocolRun
    strict: ProtocolRun | None = None
    followup_probe: Trace | None = None
    image: Image.Image | None = None

    @property
    def trace(self) -> Trace:
        return self.official.evicted


@dataclass
class LessonStep:
    key: str
    title: str
    text: str  # two or three sentences computed from the traces (**bold** allowed)
    failure: str | None  # where the method or the claim failed on this input; None when it did not
    png: bytes | None  # the step's figure (matplotlib), None when the trace lacks the data
    alt: str  # one line describing the figure
    plotly_json: str | None = None  # interactive version for the HTML export


@dataclass
class Lesson:
    title: str
    subtitle: str
    steps: list[LessonStep]
    meta: dict[str, Any] = field(default_factory=dict)


# -- small pure helpers -------------------------------------------------------------------------------------------
def first_divergence(a: Sequence[int] | None, b: Sequence[int] | None) -> int | None:
    """Index of the first generated token where two answers differ (None: identical), as `tgvkv.compare` counts it."""
    a = [] if a is None else [int(x) for x in a]
    b = [] if b is None else [int(x) for x in b]
    d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return d if d is not None or len(a) == len(b) else min(len(a), len(b))


def token_text(tok: str) -> str:
    """Readable form of a tokenizer piece (sentencepiece / byte-level space markers removed)."""
    return tok.replace("▁", " ").replace("Ġ", " ").replace("Ċ", "\\n").strip() or "␣"


def answer_tokens(trace: Trace) -> list[str]:
    if trace.output_tokens:
        return [token_text(t) for t in trace.output_tokens]
    return [f"#{int(i)}" for i in (trace.output_ids if trace.output_ids is not None else [])]


def place_name(row: int, col: int, rows: int, cols: int) -> str:
    """Words for a patch's place in its view: top/middle/bottom x left/middle/right ("center" in the middle)."""
    r, c = min(2, row * 3 // max(rows, 1)), min(2, col * 3 // max(cols, 1))
    return "center" if (r, c) == (1, 1) else f"{('top', 'middle', 'bottom')[r]} {('left', 'middle', 'right')[c]}"


def largest_budget_layer(trace: Trace) -> int:
    """The layer with the largest budget (ties: the deepest), as the app's default layer."""
    b = trace.budgets
    return int(len(b) - 1 - np.argmax(b[::-1])) if b is not None and len(b) else trace.num_layers - 1


def nearest_same_modality(hidden: np.ndarray, is_vision: np.ndarray) -> dict[str, float]:
    """Share of text / vision tokens whose nearest other token (cosine) has the same modality."""
    h = np.asarray(hidden, dtype=np.float64)
    h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    sim = h @ h.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argmax(sim, axis=1)
    same = is_vision[nn] == is_vision
    return {m: float(same[sel].mean()) if sel.any() else float("nan")
            for m, sel in (("text", ~is_vision), ("vision", is_vision))}


def _quote(s: str | None) -> str:
    s = (s or "").strip()
    return f"“{s}”" if s else "(an empty answer)"


def _list(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# -- figures --------------------------------------------------------------------------------------------------------
def _fig() -> Figure:
    return Figure(figsize=FIGSIZE, layout="constrained")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    with mpl.rc_context(SLIDE_STYLE):
        fig.savefig(buf, format="png")
    return buf.getvalue()


def _image_fig(panels: Sequence[tuple[str, Image.Image]], side: Figure | None = None) -> Figure:
    fig = _fig()
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(np.asarray(img), interpolation="nearest")
        ax.set_title(title, fontsize=16)
        ax.set_axis_off()
    return fig


# -- the steps --------------------------------------------------------------------------------------------------------
def step_modality_gap(li: LessonInput) -> LessonStep:
    t = li.trace
    key, title = "modality-gap", "1 · The modality gap: image tokens live apart from text"
    try:
        d = compute_neighbours(t, None, projection=None)
    except ValueError as e:
        return LessonStep(key, title, f"No hidden states in this trace, so the gap cannot be shown ({e}).", None, None,
                          "no figure")
    c = d.curves
    if not len(c.get("vision→vision", [])) or not len(c.get("text→text", [])):
        return LessonStep(key, title, "The prompt needs both text and image tokens for this step.", None, None,
                          "no figure")
    share = nearest_same_modality(t.hidden_states[d.layer_name], d.is_vision)
    vv, vt, tt, tv = c["vision→vision"][0], c["vision→text"][0], c["text→text"][0], c["text→vision"][0]
    where = hidden_label(d.layer_name)
    text = (f"In the {where}, **{share['vision']:.0%}** of the {int(d.is_vision.sum())} image tokens have an image "
            "token "
            f"as their nearest neighbour (cosine {vv:.2f}, against {vt:.2f} for the nearest text token), and "
            f"**{share['text']:.0%}** of the text tokens a text token ({tt:.2f} vs {tv:.2f}). "
            "Text and image keys live apart, so TGV-KV scores text→image attention on its own.")
    failure = None
    if vv <= vt or share["vision"] < 0.5:
        failure = (f"On this input the gap does not show: image tokens are about as close to text ({vt:.2f}) as to "
                   f"each other ({vv:.2f}).")
    with mpl.rc_context(SLIDE_STYLE):
        fig = _fig()
        ax = fig.subplots()
        for name, curve in c.items():
            q, k = name.split("→")
            ax.plot(np.arange(1, len(curve) + 1), curve, color=palette.MODALITY[q], ls="-" if q == k else "--",
                    marker="o", label=f"{q} → nearest {k}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="k nearest neighbours", ylabel="mean cosine similarity", title=f"hidden states, {where}")
        ax.legend(frameon=False, loc="best")
    go_fig = go.Figure([go.Scatter(x=np.arange(1, len(v) + 1), y=v, name=n, mode="lines+markers",
                                   line=dict(color=palette.MODALITY[n.split("→")[0]],
                                             dash="solid" if n.split("→")[0] == n.split("→")[1] else "dash"))
                        for n, v in c.items()])
    go_fig.update_layout(**palette.PLOTLY_LAYOUT, xaxis_title="k nearest neighbours", yaxis_title="mean cosine")
    return LessonStep(key, title, text, failure, _png(fig), "within-modality (solid) and cross-modality (dashed) "
                      "cosine similarity of the k nearest neighbours", go_fig.to_json())


def step_uneven_attention(li: LessonInput) -> LessonStep:
    t = li.trace
    key, title = "uneven-attention", "2 · Attention is uneven: attention-only eviction drops text"
    try:
        d = compute_accumulated(t)
    except ValueError as e:
        return LessonStep(key, title, f"No attention in this trace ({e}).", None, None, "no figure")
    acc, vis = d.accumulated, d.is_vision
    total = max(acc.sum(), 1e-12)
    top = np.argsort(-acc)[:3]
    names = _list([f"“{token_text(d.tokens[i])}” @{i}" for i in top])
    a_text, m_text = d.share_attention_only["text"], d.share_method["text"]
    text = (f"Three tokens ({names}) receive **{acc[top].sum() / total:.0%}** of all attention; the "
            f"{int(vis.sum())} image tokens together receive {acc[vis].sum() / total:.0%}. Ranking by this "
            f"accumulated attention with the same per-layer budgets would evict **{a_text:.0%}** of the text KV "
            f"entries; {t.method} evicts {m_text:.0%} of them.")
    failure = None
    if m_text > 0:
        failure = (f"{t.method} also lost {m_text:.0%} of the text entries (some layer budgets are smaller than the "
                   "text).")
    with mpl.rc_context(SLIDE_STYLE):
        fig = _fig()
        ax = fig.subplots()
        x = np.arange(len(acc))
        for m, sel in (("text", ~vis), ("vision", vis)):
            ax.bar(x[sel], acc[sel], width=1.0, color=palette.MODALITY[m], label=f"{m} tokens")
        ax.set(yscale="log", xlabel="prompt position", ylabel="attention received\n(sum over queries, layers)",
               title=f"text KV evicted: attention-only {a_text:.0%} · {t.method} {m_text:.0%}")
        ax.legend(frameon=False, loc="upper right")
    go_fig = go.Figure([go.Bar(x=np.flatnonzero(sel), y=acc[sel], name=m, marker_color=palette.MODALITY[m])
                        for m, sel in (("text", ~vis), ("vision", vis))])
    go_fig.update_layout(**palette.PLOTLY_LAYOUT, yaxis_type="log", xaxis_title="prompt position",
                         yaxis_title="attention received", bargap=0)
    return LessonStep(key, title, text, failure, _png(fig), "attention each prompt token receives, log scale, text "
                      "blue and image orange", go_fig.to_json())


def step_budgets(li: LessonInput) -> LessonStep:
    t = li.trace
    key, title = "budgets", "3 · Text-guided budgets (TVB): memory goes where the text looks at the image"
    L, T = t.num_layers, t.seq_len
    budgets = np.asarray(t.budgets if t.budgets is not None else np.full(L, T))
    uniform = t.keep_ratio * T
    details = t.tgv_details()
    if details is None:
        hi, lo = int(np.argmax(budgets)), int(np.argmin(budgets))
        text = (f"This run used **{t.method}**, which records no text→image mass: its budgets range from "
                f"{budgets[lo]} (layer {lo}) to {budgets[hi]} (layer {hi}) against a uniform {uniform:.0f}. "
                "Build the lesson with TGV-KV to see text-guided budgets.")
        return LessonStep(key, title, text, None, None, "no figure")
    mass = np.asarray(details.tvb_mass, dtype=np.float64)
    share = mass / max(mass.sum(), 1e-12)
    hi, lo = int(np.argmax(share)), int(np.argmin(share))
    capped = np.flatnonzero(budgets >= T) if t.keep_ratio < 1 else np.zeros(0, int)
    text = (f"Each layer's budget follows how much attention its text pays to the image: **layer {hi}** carries "
            f"**{share[hi]:.0%}** of it and keeps **{budgets[hi]}** of {T} tokens, layer {lo} carries {share[lo]:.0%} "
            "and "
            f"keeps {budgets[lo]}. A uniform split would keep {uniform:.0f} in every layer.")
    failure = None
    if len(capped):
        failure = (f"Layer{'s' if len(capped) > 1 else ''} {_list([str(int(x)) for x in capped])} asked for more than "
                   f"the whole prompt: the official rule keeps all {T} tokens there and gives the surplus to no other "
                   "layer, so the cache holds less than the budget allows.")
    with mpl.rc_context(SLIDE_STYLE):
        fig = _fig()
        ax = fig.subplots()
        x = np.arange(L)
        ax.bar(x, share * 100, color=palette.VISION, label="share of text→image attention (%)")
        ax.set(xlabel="layer", ylabel="text→image share (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2 = ax.twinx()
        ax2.plot(x, budgets, color=palette.TEXT, marker="o", label="kept tokens (TVB budget)")
        ax2.axhline(uniform, color=palette.BOUNDARY, ls="--", lw=2, label=f"uniform ({uniform:.0f})")
        ax2.set(ylabel="kept prompt tokens", ylim=(0, max(budgets.max(), uniform) * 1.15))
        ax2.spines["right"].set_visible(True)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2)
    go_fig = go.Figure([go.Bar(x=np.arange(L), y=share * 100, name="text→image share (%)", marker_color=palette.VISION),
                        go.Scatter(x=np.arange(L), y=budgets, name="kept tokens", yaxis="y2", mode="lines+markers",
                                   line=dict(color=palette.TEXT, width=3))])
    go_fig.update_layout(**palette.PLOTLY_LAYOUT, xaxis=dict(title="layer", dtick=1),
                         yaxis=dict(title="text→image share (%)"),
                         yaxis2=dict(title="kept tokens", overlaying="y", side="right", rangemode="tozero"))
    return LessonStep(key, title, text, failure, _png(fig), "bars: each layer's share of text-to-image attention; "
                      "line: the tokens it keeps", go_fig.to_json())


def _weights(t: Trace) -> tuple[np.ndarray, np.ndarray] | None:
    details = t.tgv_details()
    w = None if details is None else details.text_weights
    q = t.layout.text_query_positions
    if w is None or np.asarray(w).shape[-1] != len(q):
        return None
    return q, np.asarray(w, dtype=np.float64).mean(axis=0)


def step_ranking(li: LessonInput) -> LessonStep:
    t = li.trace
    key, title = "ranking", "4 · Text-weighted ranking (TWR): which patches the question points at"
    layer = largest_budget_layer(t)
    try:
        ov = compute_overlay(t, layer, top_k=TOP_PATCHES)
    except ValueError as e:
        return LessonStep(key, title, f"No patch geometry for this model ({e}).", None, None, "no figure")
    tokens = list(t.layout.tokens)
    places = [f"row {r} col {c} ({place_name(r, c, ov.views[v].rows, ov.views[v].cols)})" for v, r, c in ov.top]
    qw = _weights(t)
    failure = None
    if qw is not None:
        q, w = qw
        order = np.argsort(-w)[:3]
        words = _list([f"“{token_text(tokens[q[i]])}” ({w[i]:.2f})" for i in order])
        lead = f"The heaviest text tokens are {words}; they point most at {_list(places[:2])}."
        top_tok = token_text(tokens[q[order[0]]])
        question_words = {w_.strip(" ?.!,").lower() for w_ in t.question.split()}
        if top_tok.strip(" ?.!,").lower() not in question_words or not any(ch.isalnum() for ch in top_tok):
            failure = (f"The heaviest text token is “{top_tok}”, not a content word of the question: on this input "
                       "the ranking follows the prompt template more than the question's meaning.")
    else:
        lead = f"The question's tokens point most at {_list(places[:2])}."
    top_kept = sum(bool(ov.kept[v][r, c]) for v, r, c in ov.top)
    text = (f"{lead} Layer {layer} (the largest budget) keeps {ov.n_kept_vision} of {ov.n_vision} image tokens, "
            f"{top_kept} of the top {len(ov.top)} patches (red boxes) among them.")
    if top_kept < len(ov.top) and failure is None:
        failure = f"{len(ov.top) - top_kept} of the question's top {len(ov.top)} patches were evicted in layer {layer}."
    panels = overlay_panels(ov, [li.image] if li.image is not None else None, "kept")
    with mpl.rc_context(SLIDE_STYLE):
        fig = _image_fig([(f"layer {layer}: kept patches (top {len(ov.top)} boxed)", panels[0][1])])
        if qw is not None:
            fig.set_size_inches(FIGSIZE[0] * 1.25, FIGSIZE[1])
            ax0 = fig.axes[0]
            ax0.set_position([0.0, 0.05, 0.5, 0.85])
            ax = fig.add_axes([0.66, 0.12, 0.32, 0.75])
            q, w = qw
            order = np.argsort(-w)[:6][::-1]
            ax.barh([token_text(tokens[q[i]]) for i in order], w[order], color=palette.TEXT)
            ax.set(xlabel="text weight w", title="heaviest text tokens")
            fig.set_layout_engine("none")
    return LessonStep(key, title, text, failure, _png(fig), "the image with evicted patches greyed out and the top "
                      "text-to-image patches boxed in red")


def step_retention(li: LessonInput) -> LessonStep:
    t = li.trace
    key, title = "retention", "5 · Text-first retention (TPR): text is kept before any patch"
    d = compute_budgets([t])
    L = t.num_layers
    text_kept, vis_kept = d.text[0], d.vision[0]
    full = int(np.sum(text_kept == d.n_text))
    lost = np.flatnonzero(text_kept < d.n_text)
    text = (f"All {d.n_text} text tokens survive in **{full} of {L}** layers; the rest of each budget goes to the "
            f"best-ranked patches, {vis_kept.mean():.0f} of {d.n_vision} image tokens per layer on average "
            f"({vis_kept.min()}–{vis_kept.max()}).")
    failure = None
    if len(lost):
        failure = (f"Layer{'s' if len(lost) > 1 else ''} {_list([str(int(x)) for x in lost])} lost text: "
                   f"{'their budgets' if len(lost) > 1 else 'its budget'} "
                   f"({_list([str(int(text_kept[x] + vis_kept[x])) for x in lost])}) "
                   f"{'are' if len(lost) > 1 else 'is'} smaller than the {d.n_text} text tokens.")
    with mpl.rc_context(SLIDE_STYLE):
        fig = _fig()
        ax = fig.subplots()
        x = np.arange(L)
        ax.bar(x, text_kept, color=palette.TEXT, label="text kept")
        ax.bar(x, vis_kept, bottom=text_kept, color=palette.VISION, label="image kept")
        ax.axhline(d.n_text, color=palette.TEXT, ls=":", lw=2.5, label=f"all text ({d.n_text})")
        ax.axhline(d.uniform, color=palette.BOUNDARY, ls="--", lw=2, label=f"uniform ({d.uniform:.0f})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="layer", ylabel="kept prompt tokens")
        ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2)
    go_fig = go.Figure([go.Bar(x=x, y=text_kept, name="text kept", marker_color=palette.TEXT),
                        go.Bar(x=x, y=vis_kept, name="image kept", marker_color=palette.VISION)])
    go_fig.update_layout(**palette.PLOTLY_LAYOUT, barmode="stack", xaxis=dict(title="layer", dtick=1),
                         yaxis_title="kept prompt tokens")
    return LessonStep(key, title, text, failure, _png(fig), "kept text (blue) and image (orange) tokens per layer",
                      go_fig.to_json())


def _protocol_sentence(full: Trace, run: ProtocolRun) -> tuple[str, str | None]:
    e = run.evicted
    d = run.first_divergence(full)
    fa, ea = answer_tokens(full), answer_tokens(e)
    name = {"official": "Official protocol (first token from the full cache)",
            "strict": "Strict protocol (first token from the evicted cache too)"}.get(run.protocol, run.protocol)
    s = f"{name}: {_quote(e.output_text)}"
    failure = None
    if d is None:
        s += ", identical"
    else:
        was = f"“{fa[d]}”" if d < len(fa) else "the end of the answer"
        now = f"“{ea[d]}”" if d < len(ea) else "the end of the answer"
        s += f", departs at token {d}: {now} instead of {was}"
        failure = f"The answer changed under the {run.protocol} protocol from token {d} ({now} instead of {was})."
    if run.step_kl is not None and len(run.step_kl):
        j = int(np.argmax(run.step_kl))
        s += f"; largest per-step KL {run.step_kl[j]:.2f} nats at “{fa[j] if j < len(fa) else j}”"
    return s + ".", failure


def step_answer(li: LessonInput) -> LessonStep:
    key, title = "answer", "6 · What eviction did to the answer"
    full = li.full
    runs = [r for r in (li.official, li.strict) if r is not None]
    parts, failures = [f"Full KV cache: {_quote(full.output_text)}; TGV-KV keeps {li.trace.keep_ratio:.0%} of it."], []
    for r in runs:
        s, f = _protocol_sentence(full, r)
        parts.append(s)
        if f:
            failures.append(f)
    fa = answer_tokens(full)
    with mpl.rc_context(SLIDE_STYLE):
        fig = _fig()
        axes = fig.subplots(len(runs), 1, squeeze=False, sharex=True)[:, 0]
        for ax, r in zip(axes, runs):
            d = r.first_divergence(full)
            if r.step_kl is not None:
                kl = np.asarray(r.step_kl, dtype=np.float64)
                colours = [palette.TEXT if d is None or i < d else palette.HIGHLIGHT for i in range(len(kl))]
                ax.bar(np.arange(len(kl)), kl, color=colours)
                ax.axhline(KL_NOTICEABLE, color=palette.BOUNDARY, ls=":", lw=1.5)
                ax.set_ylabel("KL (nats)")
            else:
                same = [d is None or i < d for i in range(len(fa))]  # no KL measured: which tokens still match
                ax.bar(np.arange(len(fa)), np.ones(len(fa)),
                       color=[palette.TEXT if v else palette.HIGHLIGHT for v in same])
                ax.set(yticks=[], ylabel="token")
            verdict = "identical answer" if d is None else f"diverges at token {d}"
            ax.set_title(f"{r.protocol}: {verdict}", fontsize=16)
        tilt = len(fa) > 8
        axes[-1].set_xticks(np.arange(len(fa)), fa, rotation=45 if tilt else 0, ha="right" if tilt else "center")
        axes[-1].set_xlabel("full-KV answer token")
        fig.legend(handles=[Patch(color=palette.TEXT, label="before the first divergence"),
                            Patch(color=palette.HIGHLIGHT, label="from the first divergence")],
                   loc="outside lower center", ncols=2, frameon=False)
    go_fig = go.Figure([go.Bar(x=[f"{i}:{tok}" for i, tok in enumerate(fa)], y=np.asarray(r.step_kl), name=r.protocol,
                               marker_color=palette.method_colour(k))
                        for k, r in enumerate(runs) if r.step_kl is not None])
    go_fig.update_layout(**palette.PLOTLY_LAYOUT, barmode="group", yaxis_title="KL(full ‖ evicted), nats",
                         xaxis_title="full-KV answer token")
    has_kl = any(r.step_kl is not None for r in runs)
    return LessonStep(key, title, " ".join(parts), " ".join(failures) or None, _png(fig),
                      "per answer step: KL of the evicted model's next-token distribution from the full model's, "
                      "one panel per protocol" if has_kl else "which answer tokens match the full answer",
                      go_fig.to_json() if has_kl else None)


def followup_region(probe: Trace, top_k: int = TOP_PATCHES) -> list[tuple[int, int, int]]:
    """(view, row, col) of the patches the follow-up attends to most, summed over layers of its own full-KV run."""
    scores = np.nansum([text_to_image_scores(probe, layer) for layer in range(probe.num_layers)], axis=0)
    scores[~probe.layout.is_vision] = np.nan
    return A.top_cells(A.scatter_to_views(probe.layout, scores), top_k)


def step_followup(li: LessonInput) -> LessonStep:
    t, full = li.trace, li.full
    key, title = "followup", "7 · A follow-up about another region, on the evicted cache"
    if not t.followup_question:
        return LessonStep(key, title, "No follow-up question was asked. Type one about another part of the image to "
                          "see whether the first question's selection kept what the second one needs.", None, None,
                          "no figure")
    same = (full.followup_ids is not None and t.followup_ids is not None
            and first_divergence(full.followup_ids, t.followup_ids) is None)
    text = (f"Follow-up **{t.followup_question}** Full KV: {_quote(full.followup_text)}; after the first question's "
            f"eviction: {_quote(t.followup_text)} ({'the same' if same else 'different'}).")
    failure = None if same else "The follow-up answer changed after eviction."
    layer = largest_budget_layer(t)
    png, alt = None, "no figure"
    try:
        ov = compute_overlay(t, layer, top_k=TOP_PATCHES)
    except ValueError:
        ov = None
    if ov is not None and li.followup_probe is not None:
        region = followup_region(li.followup_probe)
        pos = [int(ov.positions[v][r, c]) for v, r, c in region]
        kept_here = sum(bool(ov.kept[v][r, c]) for v, r, c in region)
        kept_mask = t.kept_mask if t.kept_mask is not None else np.ones((t.num_layers, t.seq_len), bool)
        share = float(kept_mask[:, pos].mean()) if pos else 1.0
        places = _list([f"row {r} col {c} ({place_name(r, c, ov.views[v].rows, ov.views[v].cols)})"
                        for v, r, c in region[:2]])
        text += (f" It looks most at {places}; the first selection kept {kept_here} of its top {len(region)} patches "
                 f"in layer {layer} and {share:.0%} of their entries over all layers.")
        if not same and share < 0.5:
            failure = ("The follow-up answer changed, and the first question's selection had dropped most of the "
                       f"region the follow-up needs ({share:.0%} of its entries kept over all layers).")
        images = [li.image] if li.image is not None else None
        first_panel = overlay_panels(ov, images, "kept")[0][1]
        ov.top = list(region)
        second_panel = overlay_panels(ov, images, "kept")[0][1]
        with mpl.rc_context(SLIDE_STYLE):
            fig = _image_fig([("first question's top patches", first_panel),
                              ("follow-up's top patches", second_panel)])
            fig.legend(handles=[Patch(facecolor="white", edgecolor=palette.HIGHLIGHT, lw=3, label="top patches"),
                                Patch(facecolor="#D9D9D9", label=f"evicted in layer {layer}")],
                       loc="outside lower center", ncols=2, frameon=False)
        png, alt = _png(fig), (f"kept patches of layer {layer}: left boxed the first question's top patches, right "
                               "the follow-up's")
    elif ov is None:
        text += " This model has no patch geometry, so the region cannot be drawn."
    else:
        text += " (No probe run of the follow-up: the region it needs is not known.)"
    return LessonStep(key, title, text, failure, png, alt)


STEPS = (step_modality_gap, step_uneven_attention, step_budgets, step_ranking, step_retention, step_answer,
         step_followup)


def build_lesson(li: LessonInput) -> Lesson:
    """All steps of the lesson for one input (pure: traces in, texts and PNGs out)."""
    t = li.trace
    steps = [step(li) for step in STEPS]
    failed = [s.key for s in steps if s.failure]
    subtitle = (f"Question: “{t.question}” · {t.model or 'model'} · {t.method} keeping {t.keep_ratio:.0%} of the KV "
                f"cache · {t.seq_len} prompt tokens ({t.layout.n_vision} image) · {t.num_layers} layers")
    meta = {"model": t.model, "method": t.method, "keep_ratio": t.keep_ratio, "question": t.question,
            "followup_question": t.followup_question, "full_answer": li.full.output_text,
            "official_answer": t.output_text, "strict_answer": li.strict.evicted.output_text if li.strict else None,
            "failed_steps": failed}
    return Lesson("How TGV-KV decides what to keep, on this input", subtitle, steps, meta)


# -- rendering ----------------------------------------------------------------------------------------------------
DECK_CSS = """
.lesson-deck {font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #111; background: #fff;
  font-size: 24px; line-height: 1.45; border: 1px solid #d0d7de; border-radius: 10px; padding: 14px 20px;}
.lesson-deck .lesson-head {display: flex; align-items: baseline; justify-content: space-between; gap: 12px;}
.lesson-deck .lesson-title {font-size: 26px; font-weight: 700; margin: 0;}
.lesson-deck .lesson-sub {font-size: 18px; color: #444; margin: 2px 0 10px;}
.lesson-deck .lesson-step {display: none;}
.lesson-deck .lesson-step.active {display: block;}
.lesson-deck .lesson-step h2 {font-size: 30px; margin: 4px 0 10px; line-height: 1.2;}
.lesson-deck .lesson-body {display: grid; grid-template-columns: minmax(0, 58fr) minmax(0, 42fr); gap: 20px;
  align-items: start;}
.lesson-deck .lesson-figure img {width: 100%; max-height: 60vh; object-fit: contain; display: block;}
.lesson-deck .lesson-text p {margin: 0 0 12px; font-size: 24px;}
.lesson-deck .lesson-failure {border-left: 6px solid #D55E00; background: #fdf0e6; padding: 8px 12px;
  font-size: 24px; margin-top: 8px;}
.lesson-deck .lesson-ok {border-left: 6px solid #009E73; background: #e8f6f1; padding: 8px 12px; font-size: 24px;}
.lesson-deck .lesson-nav {display: flex; gap: 10px; align-items: center; margin-top: 10px; font-size: 20px;}
.lesson-deck .lesson-nav button {font-size: 20px; padding: 6px 16px; border-radius: 8px; border: 1px solid #888;
  background: #f6f8fa; cursor: pointer; color: #111;}
.lesson-deck .lesson-counter {font-weight: 600; min-width: 5em; text-align: center;}
.lesson-deck .lesson-plotly {margin-top: 10px;}
.lesson-deck.present {position: fixed; inset: 0; z-index: 10000; border-radius: 0; border: 0; overflow: auto;
  padding: 14px 28px 60px; font-size: 24px;}
.lesson-deck.present .lesson-step h2 {font-size: 30px; margin: 2px 0 8px;}
.lesson-deck.present .lesson-sub {margin-bottom: 4px;}
.lesson-deck.present .lesson-figure img {max-height: 72vh;}
.lesson-deck.present .lesson-nav {position: fixed; right: 16px; bottom: 8px; margin: 0; padding: 4px 8px;
  background: rgba(255, 255, 255, 0.92); border-radius: 8px; font-size: 18px;}
.lesson-deck.present .lesson-nav button {font-size: 18px; padding: 4px 12px;}
.lesson-deck.present .lesson-keys {display: none;}
.lesson-deck.present .lesson-plotly {display: none;}
.lesson-deck.print .lesson-step {display: block; break-after: page; margin-bottom: 28px;}
@media print {.lesson-deck .lesson-step {display: block; break-after: page;} .lesson-deck .lesson-nav {display: none;}}
"""

#: navigation: buttons, ArrowRight/PageDown/Space next, ArrowLeft/PageUp previous, Home/End, "p" presentation, Esc
DECK_JS = """
function lessonShow(deck, i) {
  const steps = deck.querySelectorAll('.lesson-step');
  if (!steps.length) return;
  i = Math.max(0, Math.min(steps.length - 1, i));
  steps.forEach((s, k) => s.classList.toggle('active', k === i));
  deck.dataset.step = String(i);
  const c = deck.querySelector('.lesson-counter');
  if (c) c.textContent = (i + 1) + ' / ' + steps.length;
  if (window.Plotly) steps[i].querySelectorAll('.js-plotly-plot').forEach(p => window.Plotly.Plots.resize(p));
}
function lessonVisibleDeck() {
  const decks = Array.from(document.querySelectorAll('.lesson-deck'));
  return decks.find(d => d.classList.contains('present')) || decks.find(d => d.offsetParent !== null);
}
function lessonInit(root) {
  const deck = root.classList && root.classList.contains('lesson-deck') ? root : root.querySelector('.lesson-deck');
  if (!deck) return;
  lessonShow(deck, 0);
  if (window.__lessonKeys) return;
  window.__lessonKeys = true;
  document.addEventListener('click', e => {
    const b = e.target.closest && e.target.closest('[data-lesson]');
    if (!b) return;
    const d = b.closest('.lesson-deck');
    const i = Number(d.dataset.step || 0), act = b.dataset.lesson;
    if (act === 'next') lessonShow(d, i + 1);
    else if (act === 'prev') lessonShow(d, i - 1);
    else if (act === 'present') d.classList.toggle('present');
  });
  document.addEventListener('toggle', e => {  // a plotly figure drawn while its <details> was closed has no width
    const d = e.target;
    if (d.matches && d.matches('details.lesson-plotly') && d.open && window.Plotly)
      d.querySelectorAll('.js-plotly-plot').forEach(p => window.Plotly.Plots.resize(p));
  }, true);
  document.addEventListener('keydown', e => {
    const t = e.target;
    if (t && (t.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(t.tagName))) return;
    const d = lessonVisibleDeck();
    if (!d || !d.querySelector('.lesson-step')) return;
    const i = Number(d.dataset.step || 0), n = d.querySelectorAll('.lesson-step').length;
    const moves = {ArrowRight: i + 1, PageDown: i + 1, ' ': i + 1, ArrowLeft: i - 1, PageUp: i - 1,
                   Home: 0, End: n - 1};
    if (e.key in moves) { lessonShow(d, moves[e.key]); e.preventDefault(); }
    else if (e.key === 'Escape') d.classList.remove('present');
    else if (e.key === 'p' || e.key === 'P') d.classList.toggle('present');
  });
}
"""


def _md(text: str) -> str:
    """Escape, then the one markup the texts use: **bold**."""
    parts = html.escape(text).split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def deck_html(lesson: Lesson, interactive: bool = False) -> str:
    """The slides as one HTML fragment (images as data URIs); `interactive` adds plotly divs (needs plotly.js)."""
    out = [f'<div class="lesson-deck" data-step="0"><div class="lesson-head"><p class="lesson-title">'
           f'{html.escape(lesson.title)}</p></div><p class="lesson-sub">{html.escape(lesson.subtitle)}</p>']
    for i, s in enumerate(lesson.steps):
        fig = (f'<img src="{_data_uri(s.png)}" alt="{html.escape(s.alt)}">' if s.png is not None
               else '<p class="lesson-nofig">(no figure for this input)</p>')
        verdict = (f'<div class="lesson-failure"><strong>Where it failed:</strong> {_md(s.failure)}</div>'
                   if s.failure else '<div class="lesson-ok">No failure on this input.</div>')
        extra = ""
        if interactive and s.plotly_json:
            fig_obj = pio.from_json(s.plotly_json)
            fig_obj.update_layout(height=420, autosize=True, legend=dict(orientation="h", x=0, y=1.18))
            extra = ('<details class="lesson-plotly"><summary>interactive figure</summary>'
                     + fig_obj.to_html(full_html=False, include_plotlyjs=False, div_id=f"lesson-plot-{s.key}",
                                       config={"responsive": True, "displaylogo": False})
                     + "</details>")
        out.append(f'<section class="lesson-step{" active" if i == 0 else ""}" data-key="{s.key}" '
                   f'data-failed="{"true" if s.failure else "false"}"><h2>{html.escape(s.title)}</h2>'
                   f'<div class="lesson-body"><div class="lesson-figure">{fig}</div><div class="lesson-text">'
                   f'<p>{_md(s.text)}</p>{verdict}</div></div>{extra}</section>')
    out.append('<div class="lesson-nav"><button type="button" data-lesson="prev">← previous</button>'
               f'<span class="lesson-counter">1 / {len(lesson.steps)}</span>'
               '<button type="button" data-lesson="next">next →</button>'
               '<button type="button" data-lesson="present" class="lesson-present-btn">presentation view (p)</button>'
               '<span class="lesson-keys">keys: ← → · p · Esc</span></div></div>')
    return "".join(out)


def lesson_html(lesson: Lesson) -> str:
    """One self-contained HTML file: PNG figures inlined, plotly.js embedded (no network needed)."""
    from plotly.offline import get_plotlyjs

    has_plotly = any(s.plotly_json for s in lesson.steps)
    plotly_js = f"<script>{get_plotlyjs()}</script>" if has_plotly else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(lesson.title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>body {{margin: 0; padding: 16px; background: #fff}}{DECK_CSS}</style>{plotly_js}</head><body>"
            f"{deck_html(lesson, interactive=has_plotly)}"
            f"<script>{DECK_JS}\nlessonInit(document.querySelector('.lesson-deck'));</script></body></html>")


def write_html(lesson: Lesson, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(lesson_html(lesson), encoding="utf-8")
    return path


def write_pdf(lesson: Lesson, path: str | Path) -> Path:
    """One 16:9 page per step (title, figure, wrapped text, failure), plus a title page; matplotlib's PdfPages."""
    from matplotlib.backends.backend_pdf import PdfPages

    path = Path(path)
    page_style = {**SLIDE_STYLE, "savefig.bbox": "standard"}  # whole 16:9 pages, not cropped to their content
    with mpl.rc_context(page_style), PdfPages(path, metadata={"Title": lesson.title}) as pdf:
        page = Figure(figsize=(13.33, 7.5))
        page.text(0.5, 0.6, lesson.title, ha="center", fontsize=30, fontweight="bold")
        page.text(0.5, 0.45, "\n".join(textwrap.wrap(lesson.subtitle, 90)), ha="center", va="top", fontsize=18)
        pdf.savefig(page)
        for s in lesson.steps:
            page = Figure(figsize=(13.33, 7.5))
            page.text(0.03, 0.95, s.title, fontsize=20, fontweight="bold", va="top")
            if s.png is not None:
                ax = page.add_axes([0.02, 0.04, 0.56, 0.82])
                ax.imshow(np.asarray(Image.open(io.BytesIO(s.png)).convert("RGB")), interpolation="none")
                ax.set_axis_off()
            body = "\n".join(textwrap.wrap(s.text.replace("**", ""), 44))
            page.text(0.61, 0.86, body, fontsize=16, va="top", linespacing=1.4)
            verdict = ("Where it failed: " + s.failure) if s.failure else "No failure on this input."
            page.text(0.61, 0.86 - 0.047 * (body.count("\n") + 2), "\n".join(textwrap.wrap(verdict, 38)), fontsize=16,
                      va="top", linespacing=1.4, color=palette.HIGHLIGHT if s.failure else palette.KEPT,
                      fontweight="bold")
            pdf.savefig(page)
    return path


# -- command line ------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.lesson", description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True, type=Path, help="the evicted run's trace (.npz/.json), official protocol")
    p.add_argument("--out", required=True, type=Path, help="output .html (self-contained) or .pdf")
    p.add_argument("--pdf", type=Path, default=None, help="also write the PDF here")
    p.add_argument("--full", type=Path, default=None, help="the full-KV run's trace (answers are compared with it)")
    p.add_argument("--strict", type=Path, default=None, help="the evicted run under the strict protocol")
    p.add_argument("--followup-probe", type=Path, default=None,
                   help="a full-KV run with the follow-up as its question (shows the region the follow-up needs)")
    p.add_argument("--image", type=Path, default=None, help="the prompt's image (overlays are drawn on it)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.out.suffix not in (".html", ".pdf"):
        raise SystemExit(f"--out must end in .html or .pdf, got {args.out.name!r}")
    trace = Trace.load(args.trace)
    full = Trace.load(args.full) if args.full else trace
    if args.full is None:
        log.warning("no --full trace: the answer steps compare the evicted run with itself")
    strict = ProtocolRun("strict", Trace.load(args.strict)) if args.strict else None
    probe = Trace.load(args.followup_probe) if args.followup_probe else None
    image = Image.open(args.image).convert("RGB") if args.image else None
    lesson = build_lesson(LessonInput(full, ProtocolRun(trace.protocol, trace), strict, probe, image))
    written = [write_html(lesson, args.out) if args.out.suffix == ".html" else write_pdf(lesson, args.out)]
    if args.pdf:
        written.append(write_pdf(lesson, args.pdf))
    for s in lesson.steps:
        log.info("%-17s %s", s.key, "FAILED: " + s.failure if s.failure else "ok")
    log.info("wrote %s", ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
