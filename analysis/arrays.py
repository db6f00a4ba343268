"""Pure array functions behind every figure: no trace, no plotting, no I/O.

Shapes: L layers, T prompt tokens, d hidden size, K neighbours; a view grid is (rows, cols).
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.neighbors import NearestNeighbors

from tgvkv.layout import TokenLayout

MODALITIES = ("text", "vision")  # index = tgvkv.trace.TEXT / VISION


# -- attention blocks ------------------------------------------------------------------------------------------
def block_sums_from_map(attn: np.ndarray, is_vision: np.ndarray, row_positions: np.ndarray | None = None) -> np.ndarray:
    """(..., 2, 2) attention totals [query modality, key modality] of (..., R, T) rows (TEXT=0, VISION=1).

    row_positions: prompt positions of the R rows (default: all T, i.e. a full map).
    """
    attn = np.asarray(attn, dtype=np.float64)
    key_onehot = np.stack([~is_vision, is_vision], axis=1).astype(np.float64)  # (T, 2)
    rows = np.arange(attn.shape[-1]) if row_positions is None else np.asarray(row_positions)
    query_onehot = key_onehot[rows]  # (R, 2)
    return np.einsum("ra,...rt,tb->...ab", query_onehot, attn, key_onehot)


def block_entries(is_vision: np.ndarray, row_positions: np.ndarray | None = None) -> np.ndarray:
    """(2, 2) number of causally visible (query, key) entries per block, to turn block totals into densities."""
    T = len(is_vision)
    rows = np.arange(T) if row_positions is None else np.asarray(row_positions)
    visible = (np.arange(T)[None, :] <= rows[:, None]).astype(np.float64)
    return block_sums_from_map(visible, is_vision, rows)


def block_rectangles(is_vision: np.ndarray) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """Largest causal rectangle (row0, row1, col0, col1) of each [query, key] modality block, to place labels."""
    runs = _modality_runs(is_vision)
    best: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    for (qs, qe, qm) in runs:
        for (ks, ke, km) in runs:
            if ks >= qe:  # entirely above the diagonal: masked by causality
                continue
            area = (qe - qs) * (min(ke, qe) - ks)
            cur = best.get((qm, km))
            if cur is None or area > (cur[1] - cur[0]) * (cur[3] - cur[2]):
                best[(qm, km)] = (qs, qe, ks, min(ke, qe))
    return best


def _modality_runs(is_vision: np.ndarray) -> list[tuple[int, int, int]]:
    """Half-open runs (start, end, modality) of equal modality."""
    m = np.asarray(is_vision, dtype=int)
    edges = np.flatnonzero(np.diff(m)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(m)]])
    return [(int(s), int(e), int(m[s])) for s, e in zip(starts, ends)]


def causal_log_attention(rows: np.ndarray, row_positions: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """(R, T) log10(attention + eps), NaN right of each query (keys it cannot see)."""
    out = np.log10(np.asarray(rows, dtype=np.float64) + eps)
    future = np.arange(rows.shape[-1])[None, :] > np.asarray(row_positions)[:, None]
    out[future] = np.nan
    return out


# -- neighbourhoods ----------------------------------------------------------------------------------------------
def knn_similarity(queries: np.ndarray, targets: np.ndarray, k_max: int, same_set: bool) -> np.ndarray:
    """(K,) mean over queries of the mean cosine similarity to their k nearest targets, k = 1..K.

    same_set: queries are the targets themselves; each query's own entry is excluded. K is clipped to the number
    of available neighbours.
    """
    n_avail = len(targets) - int(same_set)
    k = int(min(k_max, n_avail))
    if len(queries) == 0 or k <= 0:
        return np.zeros(0)
    nn = NearestNeighbors(n_neighbors=k + int(same_set), metric="cosine").fit(targets)
    dist, idx = nn.kneighbors(queries)
    if same_set:
        own = idx == np.arange(len(queries))[:, None]
        own[~own.any(axis=1), -1] = True  # self lost among exact ties: drop the farthest instead
        dist = dist[~own].reshape(len(queries), k)
    sim = 1.0 - dist  # (n, k), sorted by decreasing similarity
    return (np.cumsum(sim, axis=1) / np.arange(1, k + 1)).mean(axis=0)


def neighbour_curves(hidden: np.ndarray, is_vision: np.ndarray, k_max: int = 10) -> dict[str, np.ndarray]:
    """Within- and cross-modality k-NN cosine similarity curves: keys 'text→text', 'text→vision', ... -> (K,)."""
    h = np.asarray(hidden, dtype=np.float64)
    groups = {"text": h[~is_vision], "vision": h[is_vision]}
    return {
        f"{q}→{t}": knn_similarity(groups[q], groups[t], k_max, same_set=q == t)
        for q in MODALITIES
        for t in MODALITIES
    }


def project_2d(hidden: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(T, 2) PCA or t-SNE projection of hidden states (cosine geometry: rows are L2-normalised first)."""
    h = np.asarray(hidden, dtype=np.float64)
    h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(h)
    if method == "tsne":
        perplexity = float(min(30.0, max(2.0, (len(h) - 1) / 3)))
        method_ = "exact" if len(h) <= 300 else "barnes_hut"  # exact is faster (and deterministic) for short prompts
        return TSNE(n_components=2, perplexity=perplexity, init="pca", method=method_, random_state=seed).fit_transform(h)
    raise ValueError(f"projection must be 'pca' or 'tsne', got {method!r}")


# -- accumulated attention and eviction ----------------------------------------------------------------------------
def top_budget_keep(scores: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """(L, T) bool: per layer the budgets[l] highest-scored positions (ties: earlier position kept)."""
    L, T = scores.shape
    keep = np.zeros((L, T), dtype=bool)
    for l in range(L):
        order = np.argsort(-np.nan_to_num(scores[l], nan=-np.inf), kind="stable")
        keep[l, order[: int(budgets[l])]] = True
    return keep


def eviction_share(kept_mask: np.ndarray, is_vision: np.ndarray) -> dict[str, float]:
    """Fraction of (layer, token) slots of each modality that are evicted."""
    ev = ~np.asarray(kept_mask, dtype=bool)
    return {m: float(ev[:, sel].mean()) if sel.any() else 0.0 for m, sel in zip(MODALITIES, (~is_vision, is_vision))}


# -- grids ---------------------------------------------------------------------------------------------------------
def scatter_to_views(layout: TokenLayout, values: np.ndarray, fill: float | int | bool = np.nan) -> list[np.ndarray]:
    """Per view a (rows, cols) grid of `values` (..., T) taken at each cell's prompt position.

    Layout tokens (newlines, view_index -1) are skipped; cells with no token hold `fill`. Leading axes are kept:
    values (L, T) gives grids (L, rows, cols).
    """
    values = np.asarray(values)
    tm = layout.token_map
    dtype = np.result_type(values.dtype, np.asarray(fill).dtype)
    grids = []
    for vi, view in enumerate(layout.views):
        grid = np.full(values.shape[:-1] + (view.rows, view.cols), fill, dtype=dtype)
        sel = tm.view_index == vi
        grid[..., tm.row[sel], tm.col[sel]] = values[..., tm.positions[sel]]
        grids.append(grid)
    return grids


def view_position_grids(layout: TokenLayout) -> list[np.ndarray]:
    """Per view (rows, cols) int64 prompt position of each cell (-1 where the view has no token)."""
    return scatter_to_views(layout, np.arange(layout.seq_len), fill=-1)


def top_cells(grids: Sequence[np.ndarray], k: int) -> list[tuple[int, int, int]]:
    """(view, row, col) of the k highest finite values over all view grids, best first."""
    cells = [(float(v), vi, r, c) for vi, g in enumerate(grids) for (r, c), v in np.ndenumerate(g) if np.isfinite(v)]
    cells.sort(key=lambda t: -t[0])
    return [(vi, r, c) for _, vi, r, c in cells[:k]]


# -- comparison ----------------------------------------------------------------------------------------------------
def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def pairwise_jaccard(masks: Sequence[np.ndarray]) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Pairs (i, j) and (P, L) per-layer Jaccard of the kept masks (L, T) of several runs."""
    pairs = list(combinations(range(len(masks)), 2))
    values = np.array([[jaccard(masks[i][l], masks[j][l]) for l in range(len(masks[i]))] for i, j in pairs])
    return pairs, values.reshape(len(pairs), -1)


def kept_by_modality(kept_mask: np.ndarray, is_vision: np.ndarray) -> np.ndarray:
    """(L, 2) number of kept text and vision tokens per layer."""
    k = np.asarray(kept_mask, dtype=bool)
    return np.stack([k[:, ~is_vision].sum(axis=1), k[:, is_vision].sum(axis=1)], axis=1)
