"""Synthetic-but-realistic traces for tests, demos and figure reviews (no model is run).

`layout_*` build the token layouts the engine produces for each grid geometry; `synthetic_trace` fills a `Trace`
with structured random attention (strong intra-modality blocks, attention sinks, a text-relevant image region) and a
real `tgvkv.run_selection`, so budgets, scores and kept masks are exactly what the engine would record.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from tgvkv.layout import ImageView, TokenLayout, VisionTokenMap, contiguous_runs
from tgvkv.select import run_selection
from tgvkv.trace import Trace

from .arrays import block_sums_from_map

# A segment is ("text", n_tokens) or (ImageView, newline_per_row: bool).
Segment = tuple


def build_layout(segments: Sequence[Segment], image_sizes: Sequence[tuple[int, int]]) -> TokenLayout:
    """Token layout from an ordered list of text runs and view grids (row-major cells, optional row newlines)."""
    words = "what colour is the shape in the top left corner of the picture ? answer briefly please".split()
    tokens, views, pos, img, vidx, rows, cols = [], [], [], [], [], [], []
    for seg in segments:
        if seg[0] == "text":
            tokens += [words[(len(tokens) + i) % len(words)] for i in range(seg[1])]
            continue
        view, newline = seg
        views.append(view)
        for r in range(view.rows):
            cells = [(r, c) for c in range(view.cols)] + ([(-1, -1)] if newline else [])
            for rr, cc in cells:
                pos.append(len(tokens))
                img.append(view.image_index)
                vidx.append(len(views) - 1 if rr >= 0 else -1)
                rows.append(rr)
                cols.append(cc)
                tokens.append("<image>" if rr >= 0 else "<newline>")
    T = len(tokens)
    is_vision = np.zeros(T, dtype=bool)
    is_vision[pos] = True
    tm = VisionTokenMap(*(np.asarray(a, dtype=d) for a, d in zip((pos, img, vidx, rows, cols), ("i8",) + ("i4",) * 4)))
    return TokenLayout(T, contiguous_runs(is_vision), views, tm, list(image_sizes), tokens)


def layout_square(n: int = 12, prefix: int = 5, question: int = 20) -> TokenLayout:
    """The bundled demo model: one 96x96 image, n x n patch grid."""
    return build_layout([("text", prefix), (ImageView(0, "image", n, n), False), ("text", question)], [(96, 96)])


def layout_next(prefix: int = 5, question: int = 15) -> TokenLayout:
    """LLaVA-NeXT-like: base view 4x4, then a 6x8 tile mosaic with a newline token closing each row."""
    views = [(ImageView(0, "base", 4, 4), False), (ImageView(0, "tiles", 6, 8), True)]
    return build_layout([("text", prefix), *views, ("text", question)], [(640, 480)])


def layout_dynamic(prefix: int = 5, question: int = 15) -> TokenLayout:
    """Qwen-like dynamic grid: 6 x 10 cells covering a central band of a wide image."""
    view = ImageView(0, "image", 6, 10, box=(0.1, 0.0, 0.9, 1.0))
    return build_layout([("text", prefix), (view, False), ("text", question)], [(500, 240)])


def layout_two_images(prefix: int = 4, between: int = 5, question: int = 12) -> TokenLayout:
    """Two 4x4 images with text between them."""
    segs = [("text", prefix), (ImageView(0, "image 1", 4, 4), False), ("text", between),
            (ImageView(1, "image 2", 4, 4), False), ("text", question)]
    return build_layout(segs, [(64, 64), (64, 64)])


def synthetic_attention(layout: TokenLayout, num_layers: int, seed: int = 0, relevant: float = 0.25) -> np.ndarray:
    """(L, T, T) head-averaged causal attention with the structure of real VLM maps.

    Intra-modality blocks are brighter than text->vision; position 0 is a sink; a "relevant" image region (the
    first `relevant` fraction of each view's rows, left half) draws extra attention from the question, with a
    strength that varies by layer so that TVB budgets differ.
    """
    rng = np.random.default_rng(seed)
    T, vis = layout.seq_len, layout.is_vision
    same = vis[:, None] == vis[None, :]
    hot = np.zeros(T, dtype=bool)
    tm = layout.token_map
    for vi, v in enumerate(layout.views):
        sel = (tm.view_index == vi) & (tm.row < max(1, int(v.rows * relevant))) & (tm.col < max(1, v.cols // 2))
        hot[tm.positions[sel]] = True
    text_q = ~vis[:, None] & (np.arange(T)[:, None] > layout.first_vision)
    out = np.empty((num_layers, T, T))
    for l in range(num_layers):
        tv_gain = 1.0 + 2.5 * np.sin(np.pi * (l + 0.5) / num_layers) ** 2
        logits = rng.normal(0.0, 0.8, (T, T)) + 1.8 * same + tv_gain * (text_q & hot[None, :])
        logits[:, 0] += 4.0  # attention sink
        logits += 1.5 * np.eye(T)
        logits[np.triu_indices(T, 1)] = -np.inf
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        out[l] = e / e.sum(axis=1, keepdims=True)
    return out


def synthetic_hidden(layout: TokenLayout, dim: int = 48, seed: int = 0, mix: float = 0.35) -> np.ndarray:
    """(T, d) hidden states: one direction per modality plus noise; `mix` moves vision towards text."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(2, dim))
    vis = layout.is_vision.astype(int)
    h = base[vis] + rng.normal(0.0, 0.9, (layout.seq_len, dim))
    h[layout.is_vision] += mix * base[0]
    return h.astype(np.float16)


def synthetic_trace(layout: TokenLayout | None = None, num_layers: int = 8, keep_ratio: float = 0.2, seed: int = 0,
                    full_maps: bool = True, method: str = "tgv-kv", kept_mask: np.ndarray | None = None) -> Trace:
    """A complete prefill `Trace` for `layout`, selected by the registered policy `method` on synthetic attention.

    Hidden states follow the engine's keys: "layer_0" = embeddings, "layer_k" = output of layer k - 1.
    kept_mask (L, T) overrides the selection (e.g. a hand-made method for comparisons). Column sums are recorded for
    text keys only and attention maps only when `full_maps`, as the engine does for tgv-kv on long prompts.
    """
    layout = layout or layout_square()
    attn = synthetic_attention(layout, num_layers, seed)
    sel = run_selection(method, attn, layout.image_spans, keep_ratio)
    q = layout.text_query_positions
    col = np.full((num_layers, layout.seq_len), np.nan)
    col[:, layout.text_positions] = attn[:, :, layout.text_positions].sum(axis=1)
    mask = sel.kept_mask(layout.seq_len) if kept_mask is None else np.asarray(kept_mask, dtype=bool)
    hidden = {f"layer_{l}": synthetic_hidden(layout, seed=seed + l, mix=0.1 + 0.1 * l) for l in (0, num_layers // 2, num_layers)}
    return Trace(
        model="synthetic", method=method, keep_ratio=keep_ratio, protocol="official",
        question=" ".join(layout.tokens[-8:]), layout=layout, prompt_ids=np.arange(layout.seq_len, dtype=np.int64),
        num_layers=num_layers, seed=seed, budgets=mask.sum(axis=1).astype(np.int64), kept_mask=mask,
        scores=sel.scores.astype(np.float32), selection_info={k: np.asarray(v) for k, v in sel.info.items()},
        block_sums=block_sums_from_map(attn, layout.is_vision).astype(np.float32), query_positions=q,
        query_rows=attn[:, q, :].astype(np.float32), column_sums=col.astype(np.float32),
        attention_maps=attn.astype(np.float16) if full_maps else None, hidden_states=hidden,
    )
