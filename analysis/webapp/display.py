"""How a run reads on the page: the two answers, the metrics table, the per-step KL figure and its caption, the JSON
summary, and the placeholders a failed request leaves. Pure functions of a ``RunState``.
"""
from __future__ import annotations

import html
from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go

from tgvkv.trace import Trace

from .state import RunState

KL_NOTICEABLE = 0.1  # nats: from here on the evicted model's next-token distribution is visibly different
KL_MAX_LABELS = 16  # token labels on the KL axis (long answers label every 2nd, 4th ... token)
FAILED_NOTE = "the last request failed (see the message); nothing from an earlier run is shown"


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


def failed_answer_html(which: str) -> str:
    title = "Full KV cache" if which == "full" else "Evicted KV"
    return (f'<div class="answer answer-{which} answer-failed"><div class="answer-title">{title}</div>'
            f'<div class="answer-text" data-testid="answer-{which}"><span class="empty">no answer: {FAILED_NOTE}'
            '</span></div></div>')




__all__ = ["answer_html", "fmt_bytes", "summary", "metrics_markdown", "token_label", "answer_labels", "kl_figure",
           "kl_caption", "empty_figure", "failed_answer_html", "FAILED_NOTE", "KL_NOTICEABLE", "KL_MAX_LABELS"]
