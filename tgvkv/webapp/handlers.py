"""The app's handlers: plain value-in/value-out functions, callable directly (tests, scripts) and from Gradio.

Two layers:
- core functions (``run_comparison``, ``overlay_view``, ``attention_view``, ``diagnostics``, ``compare_methods``)
  take plain values, raise ``ValueError`` on bad input and return a ``RunState`` or display values;
- ``on_*`` functions are what the UI and the named API endpoints call: the same, with inputs validated, progress
  reported, and every ``ValueError`` re-raised as ``gr.Error`` so the visitor sees the reason.

Per-session data is one ``RunState`` (numpy traces + the input image, deep-copyable) kept in ``gr.State``; the only
shared object is the cached model in ``models``, used under its lock.
"""
from __future__ import annotations

import functools
import html
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image

import gradio as gr

from .. import POLICIES, CaptureOptions, RunOptions, compare, generate
from ..errors import report_unexpected
from ..images import MAX_PIXELS, MAX_SIDE, load_image_file, normalise_image
from ..policies import method_sort_key
from ..trace import Trace
from ..validation import validate_question
from . import models

log = logging.getLogger(__name__)

KEEP_PERCENT_RANGE = (5.0, 100.0)
MAX_NEW_TOKENS_UI = 64
MAX_QUESTION_CHARS = 400
DEFAULT_KEEP_PERCENT = 10
DEFAULT_MAX_NEW_TOKENS = 32
SEED = 0
PROTOCOL = "official"
#: what a session's trace may hold: full maps up to 768 tokens, hidden states up to 16 MB (a few layers of a 7B model)
CAPTURE = CaptureOptions(max_map_tokens=768, max_hidden_bytes=16 * 2**20)
KL_NOTICEABLE = 0.1  # nats: from here on the evicted model's next-token distribution is visibly different
KL_MAX_LABELS = 16  # token labels on the KL axis (long answers label every 2nd, 4th ... token)


# -- GPU scheduling on Hugging Face ZeroGPU (a no-op elsewhere) ------------------------------------------------
def _gpu(duration: int) -> Callable[[Callable], Callable]:
    try:
        import spaces  # type: ignore[import-not-found]  # present on Hugging Face Spaces only
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


# -- per-session state ----------------------------------------------------------------------------------------------
@dataclass
class RunState:
    """Everything one comparison produced; small (numpy traces), deep-copyable, kept per session in gr.State."""

    model: str
    source: str
    device: str
    dtype: str
    method: str
    keep_ratio: float
    max_new_tokens: int
    question: str
    image: Image.Image
    full: Trace
    evicted: Trace
    step_kl: np.ndarray  # (G_full,) KL(full || evicted) per full-answer step, full answer teacher-forced
    first_divergence: int | None
    full_pieces: list[str] = field(default_factory=list)  # display text of each generated token
    evicted_pieces: list[str] = field(default_factory=list)
    seed: int = SEED
    protocol: str = PROTOCOL
    wall_s: float = 0.0
    created: float = field(default_factory=time.time)

    @property
    def num_layers(self) -> int:
        return self.evicted.num_layers

    def default_layer(self) -> int:
        """The evicted layer with the largest budget (ties: the deepest): where the method keeps most."""
        return self.evicted.largest_evicted_layer()


# -- validation ------------------------------------------------------------------------------------------------------
def check_image(image: Any) -> Image.Image:
    """RGB PIL image from a PIL image or an uploaded file path (Gradio's upload cache); ValueError otherwise.

    Alpha/palette/CMYK/16-bit images are converted to RGB; the longer side is downscaled to MAX_SIDE px; anything
    above MAX_PIXELS is refused.
    """
    if image is None:
        raise ValueError("please upload an image (or click one of the examples)")
    if isinstance(image, Image.Image):
        return normalise_image(image)
    if isinstance(image, (str, Path)):
        return load_image_file(image)
    raise ValueError(f"expected an image, got {type(image).__name__}")


def check_question(question: Any, processor: Any | None = None) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("please type a question about the image")
    if len(question) > MAX_QUESTION_CHARS:  # the length as typed, before runs of whitespace are collapsed
        raise ValueError(f"the question is too long ({len(question):,} characters; the limit is {MAX_QUESTION_CHARS})")
    q = " ".join(question.split())
    if processor is not None:
        token = getattr(processor, "image_token", None) or "<image>"
        specials = {token, getattr(processor, "video_token", None) or token}
        for s in specials:
            if s and s in q:
                raise ValueError(f"the question must not contain the image placeholder {s!r}; the image is added for you")
    return validate_question(q, processor, max_chars=MAX_QUESTION_CHARS)  # control characters, other special tokens


def check_keep_percent(keep_percent: Any) -> float:
    """Keep ratio in (0, 1] from a percentage in [5, 100]."""
    try:
        k = float(keep_percent)
    except (TypeError, ValueError):
        raise ValueError(f"the keep ratio must be a number of percent, got {keep_percent!r}") from None
    lo, hi = KEEP_PERCENT_RANGE
    if not (math.isfinite(k) and lo <= k <= hi):
        raise ValueError(f"the keep ratio must be between {lo:.0f}% and {hi:.0f}%, got {keep_percent!r}")
    return k / 100.0


def check_max_new_tokens(n: Any) -> int:
    try:
        f = float(n)
    except (TypeError, ValueError):
        raise ValueError(f"max new tokens must be a whole number, got {n!r}") from None
    if not (math.isfinite(f) and f == int(f) and 1 <= f <= MAX_NEW_TOKENS_UI):
        raise ValueError(f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS_UI}, got {n!r}")
    return int(f)


def check_method(method: Any) -> str:
    if not isinstance(method, str) or method not in POLICIES:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(POLICIES))}")
    return method


def check_layer(layer: Any, num_layers: int) -> int:
    try:
        f = float(layer)
    except (TypeError, ValueError):
        raise ValueError(f"layer must be a whole number, got {layer!r}") from None
    if not (math.isfinite(f) and f == int(f) and 0 <= f < num_layers):
        raise ValueError(f"layer must be between 0 and {num_layers - 1}, got {layer!r}")
    return int(f)


def method_choices() -> list[tuple[str, str]]:
    """(label, name) for every registered policy, read at call time: TGV-KV first, then baselines, then ablations."""
    labels = {"tgv": "{} (the paper's method)", "baseline": "{} (baseline)", "probe": "{} (probe)",
              "tgv-ablation": "{} (ablation)"}
    return [(labels[POLICIES[n].kind].format("TGV-KV" if n == "tgv-kv" else n), n)
            for n in sorted(POLICIES, key=method_sort_key)]


# -- core: one comparison ------------------------------------------------------------------------------------------
def _answer_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Display text of each generated token (prefix-difference decoding keeps the spaces right)."""
    pieces, prev = [], ""
    ids = [int(i) for i in ids]
    for i in range(len(ids)):
        cur = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        pieces.append(cur[len(prev):] if cur.startswith(prev) else tokenizer.decode([ids[i]], skip_special_tokens=True))
        prev = cur
    return pieces


@_gpu(duration=120)
def _compare_locked(loaded: models.LoadedModel, image: Image.Image, question: str, method: str, keep_ratio: float,
                    max_new_tokens: int, seed: int) -> Any:
    with loaded.lock:
        torch.manual_seed(seed)
        return compare(
            loaded.model, loaded.processor, [image], question, method, keep_ratio, max_new_tokens,
            options=RunOptions(max_new_tokens=max_new_tokens, protocol=PROTOCOL, seed=seed),
            capture=CAPTURE, model_name=loaded.name,
        )


def run_comparison(image: Any, question: Any, model_name: str, method: str, keep_percent: Any, max_new_tokens: Any,
                   policy: models.ModelPolicy = models.ModelPolicy(), progress: Callable[[float, str], None] | None = None
                   ) -> RunState:
    """Full KV vs `method` at `keep_percent` % on one image + question. Raises ValueError on any bad input."""
    report = progress or (lambda f, d: None)
    img = check_image(image)
    method = check_method(method)
    keep = check_keep_percent(keep_percent)
    n_new = check_max_new_tokens(max_new_tokens)
    check_question(question)
    report(0.05, "loading the model (first use only)")
    loaded = models.get_model(model_name, policy)
    q = check_question(question, loaded.processor)
    report(0.25, f"generating: full KV, {method} at {keep:.0%}, and the teacher-forced divergence")
    t0 = time.perf_counter()
    cmp = _compare_locked(loaded, img, q, method, keep, n_new, SEED)
    wall = time.perf_counter() - t0
    tok = loaded.processor.tokenizer
    return RunState(
        model=loaded.name, source=loaded.source, device=loaded.device, dtype=loaded.dtype, method=method,
        keep_ratio=keep, max_new_tokens=n_new, question=q, image=img, full=cmp.full.trace, evicted=cmp.evicted.trace,
        step_kl=np.asarray(cmp.step_kl, dtype=np.float64), first_divergence=cmp.first_divergence,
        full_pieces=_answer_pieces(tok, cmp.full.token_ids), evicted_pieces=_answer_pieces(tok, cmp.evicted.token_ids),
        wall_s=wall,
    )


# -- views of a run -------------------------------------------------------------------------------------------------
def answer_html(run: RunState, which: str) -> str:
    """One answer, tokens from the first divergence on highlighted."""
    pieces = run.full_pieces if which == "full" else run.evicted_pieces
    trace = run.full if which == "full" else run.evicted
    title = "Full KV cache" if which == "full" else f"{run.method} · {run.keep_ratio:.0%} of KV kept"
    d = run.first_divergence
    spans = []
    for i, p in enumerate(pieces):
        cls = "tok div" if d is not None and i >= d else "tok"
        spans.append(f'<span class="{cls}" title="token {i}">{html.escape(p)}</span>')
    text = "".join(spans) or '<span class="empty">(empty answer)</span>'
    if d is None:
        status = '<span class="same">identical answers</span>'
    else:
        status = f'<span class="differs">answers diverge at token {d} (highlighted from there on)</span>'
    kv = int(trace.kv_bytes_kept.sum())
    return (f'<div class="answer answer-{which}"><div class="answer-title">{html.escape(title)}</div>'
            f'<div class="answer-text" data-testid="answer-{which}">{text}</div>'
            f'<div class="answer-meta">{len(pieces)} tokens · KV after prefill {fmt_bytes(kv)} · {status}</div></div>')


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def summary(run: RunState) -> dict[str, Any]:
    """The numbers shown in the metrics table, as JSON (also the scripting view of a run)."""
    f, e = run.full, run.evicted
    budgets = e.budgets if e.budgets is not None else np.full(e.num_layers, e.seq_len)

    def side(t: Trace, pieces: list[str]) -> dict[str, Any]:
        return {
            "answer": t.output_text,
            "tokens": pieces,
            "token_ids": [int(x) for x in t.output_ids],
            "kv_bytes_full": int(t.kv_bytes_full.sum()),
            "kv_bytes_kept": int(t.kv_bytes_kept.sum()),
            "kv_bytes_final": int(t.kv_bytes_final.sum()),
            "kept_tokens_per_layer": [int(x) for x in (t.budgets if t.budgets is not None else [])],
            "timings": {k: float(v) for k, v in t.timings.items()},
        }

    return {
        "model": run.model, "device": run.device, "dtype": run.dtype, "method": run.method,
        "keep_ratio": run.keep_ratio, "max_new_tokens": run.max_new_tokens, "seed": run.seed, "protocol": run.protocol,
        "question": run.question, "image": {"size": list(run.image.size), "sha256": _first(e.image_sha256)},
        "prompt_tokens": e.seq_len, "vision_tokens": e.layout.n_vision,
        "num_layers": e.num_layers, "kept_prompt_tokens_mean": float(budgets.mean()),
        "first_divergence": run.first_divergence, "step_kl": [float(x) for x in run.step_kl],
        "full": side(f, run.full_pieces), "evicted": side(e, run.evicted_pieces),
    }


def _first(values: Sequence[str]) -> str | None:
    return values[0] if values else None


def metrics_markdown(run: RunState) -> str:
    f, e = run.full, run.evicted
    T, L = e.seq_len, e.num_layers
    b = e.budgets if e.budgets is not None else np.full(L, T)
    kvf, kve = int(f.kv_bytes_kept.sum()), int(e.kv_bytes_kept.sum())
    rows = [
        ("KV bytes after prefill", fmt_bytes(kvf), f"{fmt_bytes(kve)} ({kve / max(kvf, 1):.1%})"),
        ("KV bytes at the end", fmt_bytes(int(f.kv_bytes_final.sum())), fmt_bytes(int(e.kv_bytes_final.sum()))),
        ("prompt tokens (vision)", f"{T} ({e.layout.n_vision})", f"{T} ({e.layout.n_vision})"),
        ("kept prompt tokens per layer", f"{T}", f"{b.min()}–{b.max()} (mean {b.mean():.1f}, {b.mean() / T:.1%})"),
        ("prefill", f"{f.timings['prefill_s'] * 1e3:.1f} ms", f"{e.timings['prefill_s'] * 1e3:.1f} ms"),
        ("selection", "—", f"{e.timings['select_s'] * 1e3:.1f} ms"),
        ("decode", f"{f.timings['decode_s'] * 1e3:.1f} ms", f"{e.timings['decode_s'] * 1e3:.1f} ms"),
        ("tokens/s (all / decode only)", _tps(f), _tps(e)),
    ]
    head = "| | Full KV | Evicted |\n|---|---:|---:|\n"
    body = "\n".join(f"| {a} | {x} | {y} |" for a, x, y in rows)
    foot = (f"\n\n<sub>{run.model} on {run.device} ({run.dtype}) · {L} layers · seed {run.seed} · "
            f"protocol {run.protocol} · comparison wall time {run.wall_s:.2f} s "
            "(3 runs: full, evicted, teacher-forced)</sub>")
    return head + body + foot


def _tps(t: Trace) -> str:
    return f"{t.timings.get('tokens_per_s', 0):.0f} / {t.timings.get('decode_tokens_per_s', 0):.0f}"


def token_label(piece: str, raw_token: str = "") -> str:
    """Readable text of one answer token for an axis: its text; a token that decodes to nothing (a special token such
    as the end of sequence) by its own name; pure whitespace spelled out ('\\n', '(space)')."""
    text = piece.strip()
    if text:
        return text
    if not piece:
        return raw_token or "(empty)"
    escaped = piece.encode("unicode_escape").decode("ascii").strip()
    return escaped or "(space)"


def answer_labels(run: RunState) -> list[str]:
    """Axis label of each full-answer token, e.g. 'triangle' or '</s>'."""
    raw = list(run.full.output_tokens)
    return [token_label(p, raw[i] if i < len(raw) else "") for i, p in enumerate(run.full_pieces)]


def kl_figure(run: RunState, max_labels: int = KL_MAX_LABELS) -> go.Figure:
    """Per full-answer step: KL(full || evicted) of the next-token distributions (full answer teacher-forced).

    Every bar has its token in the hover text; the axis labels at most `max_labels` of them ("step:token", the first
    divergence always among them) so long answers stay readable."""
    from analysis import palette
    from analysis.ticks import thinned

    kl = run.step_kl
    n = len(kl)
    x = np.arange(n)
    labels = answer_labels(run)[:n] + [f"#{i}" for i in range(len(run.full_pieces), n)]
    d = run.first_divergence
    colours = [palette.AGREE if d is None or i < d else palette.DIVERGED for i in x]
    shown = thinned(n, max_labels, [] if d is None else [d])
    shown_text = [html.escape(f"{i}:{_short(labels[i])}") for i in shown]  # plotly reads '</s>' as markup
    fig = go.Figure(go.Bar(x=x, y=kl, marker_color=colours, customdata=[html.escape(t) for t in labels],
                           hovertemplate="step %{x}: %{customdata}<br>KL %{y:.4f} nats<extra></extra>"))
    fig.add_hline(y=KL_NOTICEABLE, line=dict(color=palette.REFERENCE, dash="dot", width=1.5), opacity=1,
                  annotation_text=f"{KL_NOTICEABLE} nats", annotation_position="top left")
    fig.update_layout(template="simple_white", height=320, margin=dict(t=50, b=40, l=60, r=20), font=dict(size=14),
                      title=dict(text="KL(full ‖ evicted) of the next-token distribution per answer step", x=0.5,
                                 font=dict(size=16)),
                      yaxis_title="KL, nats", xaxis_title="full-answer token (step:token)", showlegend=False)
    fig.update_xaxes(tickmode="array", tickvals=shown, ticktext=shown_text,
                     tickangle=-45 if len(shown) > 8 else 0, automargin=True)
    return fig


def _short(label: str, width: int = 12) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def kl_caption(run: RunState) -> str:
    from analysis import palette

    kl, pieces = run.step_kl, answer_labels(run)
    if len(kl) == 0:
        return "**What to notice:** the full answer is empty, so there is nothing to compare."
    first = next((i for i, v in enumerate(kl) if v >= KL_NOTICEABLE), None)
    j = int(np.argmax(kl))
    when = ("never exceeds %.1f nats: eviction barely changes the model's next-token beliefs" % KL_NOTICEABLE
            if first is None else f"first exceeds {KL_NOTICEABLE} nats at step {first} ({_piece(pieces, first)!r})")
    agree, diverged = palette.name_of(palette.AGREE), palette.name_of(palette.DIVERGED)
    div = (f"the evicted answer is identical (all bars {agree})" if run.first_divergence is None
           else f"the evicted answer changes at token {run.first_divergence} ({agree} bars before it, {diverged} bars "
                "from there on)")
    return (f"**What to notice:** the divergence {when}; the largest is {kl[j]:.3f} nats at step {j} "
            f"({_piece(pieces, j)!r}); {div}; the {palette.name_of(palette.REFERENCE)} dotted line marks "
            f"{KL_NOTICEABLE} nats. Each bar asks: given the same (full-KV) answer so far, how different is "
            "the evicted model's next-token distribution? Under the official protocol step 0 comes from the full "
            "cache, so it is always 0.")


def _piece(labels: list[str], i: int) -> str:
    return labels[i] if i < len(labels) else f"#{i}"


def empty_figure(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=16))
    fig.update_layout(template="simple_white", height=260, xaxis_visible=False, yaxis_visible=False)
    return fig


# -- diagnostics --------------------------------------------------------------------------------------------------
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


# -- method comparison ---------------------------------------------------------------------------------------------
@_gpu(duration=120)
def _generate_locked(loaded: models.LoadedModel, image: Image.Image, question: str, methods: Sequence[str],
                     keep_ratio: float, max_new_tokens: int, seed: int) -> list[Any]:
    opts = RunOptions(max_new_tokens=max_new_tokens, protocol=PROTOCOL, seed=seed)
    cap = CaptureOptions(hidden_states=False)
    out = []
    with loaded.lock:
        for m in methods:
            torch.manual_seed(seed)
            out.append(generate(loaded.model, loaded.processor, [image], question, m, keep_ratio, max_new_tokens,
                                options=opts, capture=cap, model_name=loaded.name))
    return out


def compare_methods(image: Any, question: Any, model_name: str, method_a: str, method_b: str, keep_percent: Any,
                    max_new_tokens: Any, layer: Any = None, policy: models.ModelPolicy = models.ModelPolicy()
                    ) -> tuple[go.Figure, go.Figure, str, list[Trace]]:
    """Two methods on the same input: (overlay + Jaccard figure, budgets figure, markdown table, traces)."""
    from analysis import compute_budgets, compute_comparison
    from analysis import explain as ax
    from analysis.plots_plotly import plot_budgets, plot_comparison

    img = check_image(image)
    a, b = check_method(method_a), check_method(method_b)
    keep = check_keep_percent(keep_percent)
    n_new = check_max_new_tokens(max_new_tokens)
    check_question(question)
    loaded = models.get_model(model_name, policy)
    q = check_question(question, loaded.processor)
    results = _generate_locked(loaded, img, q, [a, b], keep, n_new, SEED)
    traces = [r.trace for r in results]
    L = traces[0].num_layers
    layer = traces[0].largest_evicted_layer() if layer is None or layer == "" else check_layer(layer, L)
    cmp = compute_comparison(traces, layer)
    fig = plot_comparison(cmp, [img]) if cmp.overlays else empty_figure("no patch geometry for this model")
    bud = plot_budgets(compute_budgets(traces))
    rows = "\n".join(
        f"| {html.escape(t.method)} | {html.escape(t.output_text) or '(empty)'} | {fmt_bytes(int(t.kv_bytes_kept.sum()))} "
        f"| {t.budgets.min()}–{t.budgets.max()} | {t.timings['total_s'] * 1e3:.0f} ms |" for t in traces)
    md = (f"| method | answer | KV after prefill | kept tokens/layer | time |\n|---|---|---:|---:|---:|\n{rows}\n\n"
          f"**{ax.comparison(cmp)}.** What to notice: a Jaccard near 1 means both methods keep the same tokens in "
          "that layer; where it drops, look at the overlays below to see which patches each one chose. Budgets "
          "(second figure) show where each method spends its memory.")
    return fig, bud, md, traces


# -- Gradio-facing wrappers ------------------------------------------------------------------------------------------
def user_errors(fn: Callable) -> Callable:
    """Re-raise ValueError (bad input, unloadable model) as gr.Error so the visitor sees the message; anything else
    is logged with its traceback under an error id, and the visitor sees one line with that id."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ValueError as e:
            raise gr.Error(str(e), duration=None) from e
        except torch.OutOfMemoryError as e:
            raise gr.Error("the model ran out of memory on this input; try a smaller image or fewer new tokens") from e
        except Exception as e:  # a bug or an environment failure: the traceback stays in the server log
            error_id = report_unexpected(e, log, fn.__name__)
            raise gr.Error(unexpected_message(error_id), duration=None) from e

    return wrapper


def unexpected_message(error_id: str) -> str:
    return (f"something went wrong on the server (error id {error_id}); the details are in the server log. "
            "Please try again, or report the id to the operator")


def _progress(progress: Any) -> Callable[[float, str], None]:
    def report(frac: float, desc: str) -> None:
        if progress is not None:
            progress(frac, desc=desc)

    return report


def make_ui_handlers(policy: models.ModelPolicy) -> dict[str, Callable]:
    """The functions app.py wires to events (each one is a named API endpoint); `policy` is the operator's."""

    @user_errors
    def on_run(image, question, model_name, method, keep_percent, max_new_tokens, progress=gr.Progress()):
        """Full KV vs `method` keeping `keep_percent` % of the KV cache: answers, per-step KL, metrics, summary JSON."""
        run = run_comparison(image, question, model_name, method, keep_percent, max_new_tokens, policy, _progress(progress))
        progress(0.9, desc="rendering answers")
        return (run, answer_html(run, "full"), answer_html(run, "evicted"), kl_figure(run), kl_caption(run),
                metrics_markdown(run), summary(run))

    @user_errors
    def on_rerun(run, image, question, model_name, method, keep_percent, max_new_tokens, progress=gr.Progress()):
        """A settings change re-runs the comparison, but only once there is a run to update."""
        if run is None or image is None or not (question or "").strip():
            return tuple(gr.skip() for _ in range(7))
        return on_run(image, question, model_name, method, keep_percent, max_new_tokens, progress)

    @user_errors
    def on_diagnostics_if_run(run, overlay_mode="layer", layer=None, progress=gr.Progress()):
        """After a settings change: the same views, keeping the visitor's overlay mode and layer when it exists."""
        if run is None:
            return tuple(gr.skip() for _ in range(20))
        keep = layer is not None and _is_layer(layer, run.num_layers)
        return _diagnostics_outputs(run, overlay_mode, int(layer) if keep else None, progress)

    @user_errors
    def on_diagnostics(run, overlay_mode="layer", progress=gr.Progress()):
        """Every diagnostic figure and the Explain walkthrough of this session's last /compare; the overlay in
        `overlay_mode` ('layer' or 'all layers')."""
        return _diagnostics_outputs(run, overlay_mode, None, progress)

    def _diagnostics_outputs(run, overlay_mode, layer, progress):
        if run is None:
            raise ValueError("run a comparison first")
        progress(0.1, desc="rendering diagnostics")
        d = diagnostics(run, layer, overlay_mode)
        slider = gr.Slider(minimum=0, maximum=run.num_layers - 1, value=d["layer"], step=1, interactive=True)
        e = d["explain"]
        return (slider, slider, slider, d["overlay"], d["overlay_caption"], d["budgets"], d["budgets_caption"],
                d["attention"],
                d["attention_caption"], d["neighbours"], d["neighbours_caption"], d["accumulated"],
                d["accumulated_caption"], e["intro"], e["tvb_figure"], e["tvb"], e["twr_figure"], e["twr"],
                e["tpr_image"], e["tpr"])

    def on_run_failed():
        """After a failed /compare or /diagnostics: no answer, figure or number of an earlier run stays on screen
        under the error (the inputs stay as the visitor left them)."""
        return cleared_run_outputs()

    def on_compare_failed():
        return cleared_compare_outputs()

    @user_errors
    def on_overlay(run, layer, mode):
        """Retained patches of one layer (mode 'layer') or layers keeping each patch (mode 'all layers')."""
        if run is None:
            raise ValueError("run a comparison first")
        return overlay_view(run, layer, mode)

    @user_errors
    def on_attention(run, layer):
        """Head-averaged prefill attention map of one layer."""
        if run is None:
            raise ValueError("run a comparison first")
        return attention_view(run, layer)

    @user_errors
    def on_compare_methods(image, question, model_name, method_a, method_b, keep_percent, max_new_tokens, layer,
                           progress=gr.Progress()):
        """Two methods on the same input: overlays + Jaccard of kept sets per layer, budgets, answers."""
        progress(0.1, desc=f"running {method_a} and {method_b}")
        fig, bud, md, _ = compare_methods(image, question, model_name, method_a, method_b, keep_percent,
                                          max_new_tokens, layer, policy)
        return fig, bud, md

    @user_errors
    def on_export(run, progress=gr.Progress()):
        """Trace (NPZ/JSON), figures (PNG/SVG), run card and a zip of this session's last /compare."""
        from .export import export_run

        if run is None:
            raise ValueError("run a comparison first, then export it")
        progress(0.1, desc="writing trace, figures and run card")
        files = export_run(run)
        names = ", ".join(f"`{Path(f).name}`" for f in files)
        return [str(f) for f in files], f"Exported {len(files)} files: {names}"

    return {"run": on_run, "rerun": on_rerun, "diagnostics": on_diagnostics, "diagnostics_if_run": on_diagnostics_if_run,
            "overlay": on_overlay, "attention": on_attention, "run_failed": on_run_failed,
            "compare_methods": on_compare_methods, "compare_failed": on_compare_failed, "export": on_export}


FAILED_NOTE = "the last request failed (see the message); nothing from an earlier run is shown"


def _is_layer(layer: Any, num_layers: int) -> bool:
    try:
        check_layer(layer, num_layers)
    except ValueError:
        return False
    return True


def failed_answer_html(which: str) -> str:
    title = "Full KV cache" if which == "full" else "Evicted KV"
    return (f'<div class="answer answer-{which} answer-failed"><div class="answer-title">{title}</div>'
            f'<div class="answer-text" data-testid="answer-{which}"><span class="empty">no answer: {FAILED_NOTE}'
            '</span></div></div>')


def cleared_run_outputs() -> tuple:
    """Values for the run, diagnostics and export outputs (app.py's `run_outputs + diag_outputs + export_outputs`
    order): the run state is dropped (so Export cannot hand out an earlier run either), layer sliders stay as they
    are, and every view says why it is empty."""
    note = f"*{FAILED_NOTE}.*"
    run = (None, failed_answer_html("full"), failed_answer_html("evicted"), empty_figure("no run"), note, note, None)
    sliders = tuple(gr.skip() for _ in range(3))
    diag = (None, note, empty_figure("no run"), note, empty_figure("no run"), note, empty_figure("no run"), note,
            empty_figure("no run"), note, "### Walkthrough unavailable\n" + note, None, "", None, "", None, "")
    export = (None, note)
    return run + sliders + diag + export


def cleared_compare_outputs() -> tuple:
    """Values for the Compare-methods outputs (figure, budgets figure, table) after a failed comparison."""
    return empty_figure("no comparison"), empty_figure("no comparison"), f"*{FAILED_NOTE}.*"


__all__ = ["RunState", "run_comparison", "diagnostics", "overlay_view", "attention_view", "compare_methods",
           "summary", "answer_html", "metrics_markdown", "kl_figure", "make_ui_handlers", "method_choices",
           "check_image", "check_question", "check_keep_percent", "check_max_new_tokens", "MAX_SIDE", "MAX_PIXELS"]
