"""Compact attention statistics: what policies read instead of T x T matrices.

Inside the engine these arrays are filled by the capturing attention function (`tgvkv.capture`) without ever
materialising a full attention map; `stats_from_attention` derives the very same arrays from full head-averaged
matrices (`tgvkv.select`, tests, eager reference). Policies see only `PrefillStats`, so both routes share one code path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

ColumnSums = Literal["none", "text", "all"]


@dataclass(frozen=True)
class StatRequest:
    """What a policy needs captured at prefill.

    query_positions: prompt positions whose head-averaged attention rows are kept (text queries, SnapKV window).
    column_sums: sums over *all* queries of each key column: for no key, for text keys only, or for every key.
    """

    query_positions: np.ndarray
    column_sums: ColumnSums = "none"
    model_dtype: bool = False  # statistics in the model's dtype, as the official eager code computes them

    def merge(self, other: "StatRequest") -> "StatRequest":
        order = {"none": 0, "text": 1, "all": 2}
        cols = self.column_sums if order[self.column_sums] >= order[other.column_sums] else other.column_sums
        return StatRequest(np.union1d(self.query_positions, other.query_positions).astype(np.int64), cols,
                           self.model_dtype or other.model_dtype)


@dataclass
class PrefillStats:
    """Head-averaged prefill attention statistics for L language layers over a prompt of T tokens.

    rows:        (L, Q, T) float     attention of each captured query (row) over all keys; zeros right of the query
    query_positions: (Q,) int64    sorted prompt positions of those queries
    column_sums: (L, T) float or None  sum over all T queries of each key column (causal: only q >= key)
    column_mask: (T,) bool or None  which entries of column_sums were computed (the rest are NaN)
    dtype: the dtype the head-mean attention was computed in (a StatRequest with model_dtype: "bfloat16", ...; the
           rows hold values of that dtype, the column sums are float32 sums of them); None: float32 throughout
    """

    rows: np.ndarray
    query_positions: np.ndarray
    column_sums: np.ndarray | None = None
    column_mask: np.ndarray | None = None
    dtype: str | None = None

    @property
    def num_layers(self) -> int:
        return int(self.rows.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.rows.shape[2])

    def layers(self, idx: np.ndarray) -> "PrefillStats":
        """The same statistics for a subset of the layers (e.g. the evictable layers of a hybrid model)."""
        colsums = None if self.column_sums is None else self.column_sums[idx]
        return PrefillStats(self.rows[idx], self.query_positions, colsums, self.column_mask, self.dtype)

    def rows_for(self, positions: np.ndarray) -> np.ndarray:
        """(L, len(positions), T) rows of the given query positions; raises if one was not captured."""
        idx = np.searchsorted(self.query_positions, positions)
        ok = (idx < len(self.query_positions)) & (self.query_positions[np.minimum(idx, len(self.query_positions) - 1)] == positions)
        if not np.all(ok):
            missing = np.asarray(positions)[~ok][:5]
            raise ValueError(f"attention rows for query positions {missing.tolist()} were not captured")
        return self.rows[:, idx, :]

    def column_sums_for(self, positions: np.ndarray) -> np.ndarray:
        """(L, len(positions)) column sums over all queries; raises if those columns were not captured."""
        if self.column_sums is None:
            raise ValueError("this policy needs column sums over all queries, but none were captured")
        if self.column_mask is not None and not np.all(self.column_mask[positions]):
            raise ValueError("column sums for some requested key positions were not captured")
        return self.column_sums[:, positions]


def column_positions(request: StatRequest, text_positions: np.ndarray, seq_len: int) -> np.ndarray | None:
    """Key positions whose column sums a request needs (None for none)."""
    if request.column_sums == "none":
        return None
    if request.column_sums == "text":
        return np.asarray(text_positions, dtype=np.int64)
    return np.arange(seq_len, dtype=np.int64)


def as_numpy_attention(attentions: Sequence, seq_len: int | None = None) -> np.ndarray:
    """Stack per-layer head-averaged [T, T] attention (numpy or torch) into (L, T, T) float64, validating shapes."""
    mats = []
    for i, a in enumerate(attentions):
        if hasattr(a, "detach"):
            a = a.detach().float().cpu().numpy()
        a = np.asarray(a, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"attentions[{i}] must be a square [T, T] matrix (rows = queries), got shape {a.shape}")
        mats.append(a)
    if not mats:
        raise ValueError("attentions is empty: need one [T, T] matrix per language layer")
    shapes = {m.shape for m in mats}
    if len(shapes) != 1:
        raise ValueError(f"all layers must share one [T, T] shape, got {sorted(shapes)}")
    out = np.stack(mats)
    if seq_len is not None and out.shape[-1] != seq_len:
        raise ValueError(f"attention matrices are {out.shape[-1]} x {out.shape[-1]} but the layout has {seq_len} tokens")
    if not np.all(np.isfinite(out)):
        raise ValueError("attention matrices contain NaN or inf")
    return out


def stats_from_attention(attn: np.ndarray, request: StatRequest, text_positions: np.ndarray) -> PrefillStats:
    """Derive the compact statistics a policy requested from full (L, T, T) head-averaged attention."""
    L, T, _ = attn.shape
    q = np.asarray(request.query_positions, dtype=np.int64)
    rows = attn[:, q, :]  # float64 here: `select` on hand-made matrices stays exact
    cols = column_positions(request, text_positions, T)
    colsums = mask = None
    if cols is not None:
        colsums = np.full((L, T), np.nan, dtype=np.float64)
        colsums[:, cols] = attn[:, :, cols].sum(axis=1)
        mask = np.zeros(T, dtype=bool)
        mask[cols] = True
    return PrefillStats(rows=rows, query_positions=q, column_sums=colsums, column_mask=mask)
