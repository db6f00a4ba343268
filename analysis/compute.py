"""Trace -> figure data. Each `compute_x(trace, ...)` is pure and returns a small dataclass of numpy arrays that the
matching `plot_x` functions (plotly and matplotlib) draw. Nothing here runs a model or reads a file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from tgvkv.layout import ImageView
from tgvkv.trace import Trace

from . import arrays as A


def _tokens(trace: Trace) -> list[str]:
    toks = list(trace.layout.tokens)
    return toks if len(toks) == trace.seq_len else [f"#{i}" for i in range(trace.seq_len)]


def _check_layer(trace: Trace, layer: int) -> int:
    if not -trace.num_layers <= layer < trace.num_layers:
        raise ValueError(f"layer {layer} is out of range: the trace has {trace.num_layers} layers")
    return layer % trace.num_layers


# -- 1. neighbourhoods -----------------------------------------------------------------------------------------------
@dataclass
class NeighbourData:
    layer_name: str
    curves: dict[str, np.ndarray]  # "text→text" ... -> (K,) mean cosine similarity with the k nearest neighbours
    projection: np.ndarray | None  # (T, 2) or None
    projection_method: str
    is_vision: np.ndarray  # (T,)
    tokens: list[str]


def hidden_layer_name(trace: Trace, layer: int | None) -> str:
    """Key of the stored hidden states closest to the *output* of language layer `layer` (the deepest when None).

    The engine stores transformers' `hidden_states` tuple: "layer_0" is the input embeddings and "layer_k" the
    output of decoder layer k - 1, possibly subsampled; so layer l's output is "layer_{l+1}".
    """
    if not trace.hidden_states:
        raise ValueError("the trace holds no hidden states (run with hidden states captured)")
    stored = sorted(trace.hidden_states, key=_hidden_index)
    if layer is None:
        return stored[-1]
    return min(stored, key=lambda k: abs(_hidden_index(k) - (layer + 1)))


def hidden_label(name: str) -> str:
    """Readable name of a hidden-state key: 'input embeddings' or 'output of layer k'."""
    k = _hidden_index(name)
    return "input embeddings" if k == 0 else f"output of layer {k - 1}"


def _hidden_index(name: str) -> int:
    return int(name.rsplit("_", 1)[-1])


def compute_neighbours(trace: Trace, layer: int | None = None, k_max: int = 10, projection: str | None = "pca",
                       seed: int = 0) -> NeighbourData:
    name = hidden_layer_name(trace, layer)
    h = np.asarray(trace.hidden_states[name], dtype=np.float64)
    vis = trace.layout.is_vision
    proj = A.project_2d(h, projection, seed) if projection else None
    return NeighbourData(name, A.neighbour_curves(h, vis, k_max), proj, projection or "", vis, _tokens(trace))


# -- 2. attention map ----------------------------------------------------------------------------------------------
@dataclass
class AttentionData:
    layer: int
    full: bool  # True: the whole T x T map; False: only the captured text-query rows
    log_rows: np.ndarray  # (R, T) log10(attention + 1e-6), NaN where causally masked
    row_positions: np.ndarray  # (R,)
    is_vision: np.ndarray  # (T,)
    block_sums: np.ndarray  # (2, 2) [query, key] totals, TEXT=0, VISION=1
    block_entries: np.ndarray  # (2, 2) causally visible entries per block (density = sums / entries)
    label_boxes: dict  # (q, k) -> (row0, row1, col0, col1) in row/column index space of log_rows
    text_positions: np.ndarray  # for the text-text zoom
    tokens: list[str]


def compute_attention(trace: Trace, layer: int) -> AttentionData:
    layer = _check_layer(trace, layer)
    vis = trace.layout.is_vision
    if trace.attention_maps is not None:
        rows, rpos = np.asarray(trace.attention_maps[layer], dtype=np.float64), np.arange(trace.seq_len)
        sums = A.block_sums_from_map(rows, vis)
    elif trace.query_rows is not None:
        rows, rpos = np.asarray(trace.query_rows[layer], dtype=np.float64), np.asarray(trace.query_positions)
        sums = np.asarray(trace.block_sums[layer], dtype=np.float64) if trace.block_sums is not None else \
            A.block_sums_from_map(rows, vis, rpos)
    else:
        raise ValueError("the trace has neither full attention maps nor captured query rows")
    boxes = A.block_rectangles(vis) if rows.shape[0] == len(vis) else _row_boxes(rpos, vis)
    entries = A.block_entries(vis, None if trace.attention_maps is not None else rpos)
    return AttentionData(layer, trace.attention_maps is not None, A.causal_log_attention(rows, rpos), rpos, vis,
                         sums, entries, boxes, trace.layout.text_positions, _tokens(trace))


def _row_boxes(rpos: np.ndarray, vis: np.ndarray) -> dict:
    """Label boxes for captured (text) query rows only: one band per key modality."""
    out = {}
    for km, sel in enumerate((~vis, vis)):
        cols = np.flatnonzero(sel)
        if len(cols):
            out[(0, km)] = (0, len(rpos), int(cols[0]), int(cols[-1]) + 1)
    return out


# -- 3. accumulated attention ----------------------------------------------------------------------------------------
@dataclass
class AccumulatedData:
    method: str
    source: str  # which queries the accumulation covers
    accumulated: np.ndarray  # (T,) attention received, summed over queries and layers
    is_vision: np.ndarray  # (T,)
    evicted_attention_only: np.ndarray  # (T,) fraction of layers an accumulated-attention ranking evicts the token
    evicted_method: np.ndarray  # (T,) fraction of layers the traced method evicts it
    share_attention_only: dict[str, float]  # modality -> evicted fraction of its (layer, token) slots
    share_method: dict[str, float]
    tokens: list[str]

    def eviction_rows(self) -> list[tuple[str, np.ndarray]]:
        """The strips of the lower panel, top to bottom (both back-ends draw them in this order; captions say so)."""
        return [(self.method, self.evicted_method), ("attention-only", self.evicted_attention_only)]


def accumulated_attention(trace: Trace) -> tuple[np.ndarray, str]:
    """(L, T) attention each token receives, and a description of the queries it covers."""
    if trace.attention_maps is not None:
        return np.asarray(trace.attention_maps, dtype=np.float64).sum(axis=1), "all queries"
    if trace.column_sums is not None and np.all(np.isfinite(trace.column_sums)):
        return np.asarray(trace.column_sums, dtype=np.float64), "all queries"
    if trace.query_rows is not None:
        return np.asarray(trace.query_rows, dtype=np.float64).sum(axis=1), "captured text queries only"
    raise ValueError("the trace holds no attention (maps, column sums or query rows) to accumulate")


def compute_accumulated(trace: Trace) -> AccumulatedData:
    acc, source = accumulated_attention(trace)
    kept = trace.kept_mask if trace.kept_mask is not None else np.ones(acc.shape, dtype=bool)
    budgets = kept.sum(axis=1)
    naive = A.top_budget_keep(acc, budgets)  # H2O-style: same per-layer budgets, ranked by accumulated attention
    vis = trace.layout.is_vision
    return AccumulatedData(trace.method, source, acc.sum(axis=0), vis, (~naive).mean(axis=0), (~kept).mean(axis=0),
                           A.eviction_share(naive, vis), A.eviction_share(kept, vis), _tokens(trace))


# -- 4. retained-patch overlay -----------------------------------------------------------------------------------------
@dataclass
class OverlayData:
    method: str
    layer: int
    num_layers: int
    views: list[ImageView]
    image_sizes: list[tuple[int, int]]
    kept: list[np.ndarray]  # per view (rows, cols) bool, kept at `layer` (layout tokens excluded)
    layer_counts: list[np.ndarray]  # per view (rows, cols) int, number of layers keeping each patch
    scores: list[np.ndarray]  # per view (rows, cols) float text->image score at `layer` (NaN: no token)
    positions: list[np.ndarray]  # per view (rows, cols) prompt position (-1: no token)
    top: list[tuple[int, int, int]]  # (view, row, col) of the top-k text->image patches, best first
    n_kept_vision: int = 0  # kept vision tokens at `layer`, layout tokens included
    n_vision: int = 0


def text_to_image_scores(trace: Trace, layer: int) -> np.ndarray:
    """(T,) text->image score of each vision token at `layer` (NaN on text): TWR scores for tgv-kv, otherwise the
    attention the captured text queries give it."""
    out = np.full(trace.seq_len, np.nan)
    vpos = trace.layout.vision_positions
    details = trace.tgv_details()
    if details is not None:
        out[vpos] = details.vision_scores[layer]
    elif trace.query_rows is not None:
        text_q = ~trace.layout.is_vision[np.asarray(trace.query_positions)]
        out[vpos] = np.asarray(trace.query_rows[layer], dtype=np.float64)[text_q][:, vpos].sum(axis=0)
    return out


def compute_overlay(trace: Trace, layer: int, top_k: int = 5) -> OverlayData:
    layer = _check_layer(trace, layer)
    lay = trace.layout
    if not lay.views:
        raise ValueError("the trace's layout has no image grid geometry (views); cannot place patches")
    kept = trace.kept_mask if trace.kept_mask is not None else np.ones((trace.num_layers, trace.seq_len), bool)
    scores = A.scatter_to_views(lay, text_to_image_scores(trace, layer))
    vis = lay.vision_positions
    return OverlayData(
        trace.method, layer, trace.num_layers, list(lay.views), list(lay.image_sizes),
        A.scatter_to_views(lay, kept[layer], fill=False), A.scatter_to_views(lay, kept.sum(axis=0), fill=0),
        scores, A.view_position_grids(lay), A.top_cells(scores, top_k),
        int(kept[layer, vis].sum()), len(vis),
    )


# -- 5. budgets ----------------------------------------------------------------------------------------------------------
@dataclass
class BudgetData:
    methods: list[str]
    text: np.ndarray  # (M, L) kept text tokens per layer and method
    vision: np.ndarray  # (M, L) kept vision tokens
    seq_len: int
    n_text: int
    n_vision: int
    uniform: float  # keep_ratio * T, the budget of a uniform allocation
    never_evicted: np.ndarray | None = None  # (L,) bool: layers the engine never evicts (Gemma 3's sliding window)


def compute_budgets(traces: Sequence[Trace]) -> BudgetData:
    vis = traces[0].layout.is_vision
    counts = np.stack([A.kept_by_modality(_kept(t), vis) for t in traces])  # (M, L, 2)
    return BudgetData(_names(traces), counts[..., 0], counts[..., 1], traces[0].seq_len, int((~vis).sum()),
                      int(vis.sum()), traces[0].keep_ratio * traces[0].seq_len, ~traces[0].evictable_layers())


# -- 6. comparison -------------------------------------------------------------------------------------------------------
@dataclass
class ComparisonData:
    methods: list[str]
    pairs: list[tuple[int, int]]
    jaccard: np.ndarray  # (P, L) Jaccard of kept sets per layer, all prompt tokens
    jaccard_vision: np.ndarray  # (P, L) the same restricted to vision tokens
    overlays: list[OverlayData] = field(default_factory=list)  # one per method, at the compared layer


def compute_comparison(traces: Sequence[Trace], layer: int, top_k: int = 5) -> ComparisonData:
    if len(traces) < 2:
        raise ValueError("a comparison needs at least two traces")
    T = traces[0].seq_len
    if any(t.seq_len != T or t.num_layers != traces[0].num_layers for t in traces):
        raise ValueError("compared traces must share the input: same prompt length and number of layers")
    vis = traces[0].layout.is_vision
    masks = [_kept(t) for t in traces]
    pairs, jac = A.pairwise_jaccard(masks)
    _, jac_v = A.pairwise_jaccard([m[:, vis] for m in masks])
    overlays = [compute_overlay(t, layer, top_k) for t in traces] if traces[0].layout.views else []
    for ov in overlays[1:]:  # highlight the same (first trace's) text->image patches in every panel
        ov.top = overlays[0].top
    return ComparisonData(_names(traces), pairs, jac, jac_v, overlays)


def _kept(trace: Trace) -> np.ndarray:
    return trace.kept_mask if trace.kept_mask is not None else np.ones((trace.num_layers, trace.seq_len), bool)


def _names(traces: Sequence[Trace]) -> list[str]:
    names = [t.method for t in traces]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]
