"""Token layout: which prompt positions are vision tokens, and where each one sits in its image.

A `TokenLayout` is pure data (numpy + ints). It is built either from a model's config and processed inputs
(`layout_from_inputs`) or from bare spans (`TokenLayout.from_spans`, used by `tgvkv.select`). Grid geometry per
model family lives in `tgvkv.geometry`; this module only holds the result.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


@dataclass
class ImageView:
    """One patch grid of one image (e.g. LLaVA-NeXT's low-res base view, or its high-res tile mosaic).

    `box` is the region of the *original* image this grid covers, in normalised (y0, x0, y1, x1) coordinates.
    """

    image_index: int
    name: str  # "base", "tiles", "frame 3", ...
    rows: int
    cols: int
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


@dataclass
class VisionTokenMap:
    """Per vision token (in prompt order): which image/view, which grid cell, or a layout token (newline, row tag).

    All arrays have one entry per vision token, aligned with `positions`.
    """

    positions: np.ndarray  # (N,) int64, prompt positions of vision tokens
    image_index: np.ndarray  # (N,) int32
    view_index: np.ndarray  # (N,) int32, index into TokenLayout.views; -1 for layout tokens (newline)
    row: np.ndarray  # (N,) int32, grid row inside the view; -1 for layout tokens
    col: np.ndarray  # (N,) int32, grid col inside the view; -1 for layout tokens

    @classmethod
    def empty(cls) -> "VisionTokenMap":
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z.astype(np.int32), z.astype(np.int32), z.astype(np.int32), z.astype(np.int32))


@dataclass
class TokenLayout:
    """Where the vision tokens are in a prompt of `seq_len` tokens."""

    seq_len: int
    image_spans: list[tuple[int, int]]  # half-open [start, end) runs of consecutive vision tokens
    views: list[ImageView] = field(default_factory=list)
    token_map: VisionTokenMap = field(default_factory=VisionTokenMap.empty)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each original image
    tokens: list[str] = field(default_factory=list)  # decoded prompt tokens, for labels (optional)

    def __post_init__(self) -> None:
        self.image_spans = validate_spans(self.image_spans, self.seq_len)

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_spans(cls, seq_len: int, image_spans: Sequence[tuple[int, int]]) -> "TokenLayout":
        """A layout with no grid geometry: enough for every policy (`tgvkv.select`)."""
        return cls(seq_len=int(seq_len), image_spans=list(image_spans))  # __post_init__ validates and makes ints

    # -- derived views -----------------------------------------------------------------------------------------
    @property
    def is_vision(self) -> np.ndarray:
        """(T,) bool: True where the prompt position holds a vision token."""
        mask = np.zeros(self.seq_len, dtype=bool)
        for s, e in self.image_spans:
            mask[s:e] = True
        return mask

    @property
    def vision_positions(self) -> np.ndarray:
        return np.flatnonzero(self.is_vision)

    @property
    def text_positions(self) -> np.ndarray:
        return np.flatnonzero(~self.is_vision)

    @property
    def first_vision(self) -> int:
        """Official `image_start`: position of the first vision token (seq_len if there is none)."""
        return self.image_spans[0][0] if self.image_spans else self.seq_len

    @property
    def n_vision(self) -> int:
        return int(sum(e - s for s, e in self.image_spans))

    @property
    def text_query_positions(self) -> np.ndarray:
        """Text positions that can attend to some vision token: the official 'post' region generalised.

        With one contiguous image span this is exactly `[ts, T)` of the official code (ts = image end). With several
        images, text *between* images also counts as text query (it sees the earlier images).
        """
        pos = self.text_positions
        return pos[pos > self.first_vision]

    def kind_of(self, position: int) -> str:
        return "vision" if self.is_vision[position] else "text"

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "image_spans": [list(s) for s in self.image_spans],
            "views": [vars(v) | {"box": list(v.box)} for v in self.views],
            "image_sizes": [list(s) for s in self.image_sizes],
            "tokens": list(self.tokens),
        }

    def token_map_arrays(self) -> dict[str, np.ndarray]:
        m = self.token_map
        return {
            "positions": m.positions,
            "image_index": m.image_index,
            "view_index": m.view_index,
            "row": m.row,
            "col": m.col,
        }

    @classmethod
    def from_parts(cls, meta: dict[str, Any], token_map: dict[str, np.ndarray]) -> "TokenLayout":
        views = [ImageView(**(v | {"box": tuple(v["box"])})) for v in meta["views"]]
        tm = VisionTokenMap(**{k: np.asarray(token_map[k]) for k in ("positions", "image_index", "view_index", "row", "col")})
        return cls(
            seq_len=int(meta["seq_len"]),
            image_spans=[tuple(s) for s in meta["image_spans"]],
            views=views,
            token_map=tm,
            image_sizes=[tuple(s) for s in meta["image_sizes"]],
            tokens=list(meta["tokens"]),
        )


def validate_spans(spans: Sequence[tuple[int, int]], seq_len: int) -> list[tuple[int, int]]:
    """Check half-open spans are inside [0, seq_len), non-empty, sorted and disjoint. Raises ValueError."""
    if seq_len <= 0:
        raise ValueError(f"sequence length must be positive, got {seq_len}")
    out: list[tuple[int, int]] = []
    prev_end = 0
    for span in spans:
        try:
            s, e = (operator.index(x) for x in span)  # integers only: 2.5 or "3" is a caller's mistake, not a position
        except (TypeError, ValueError):
            raise ValueError(f"image span {span!r} is not a (start, end) pair of integers") from None
        if not (0 <= s < e <= seq_len):
            raise ValueError(
                f"image span ({s}, {e}) lies outside the sequence of {seq_len} tokens (need 0 <= start < end <= {seq_len})"
            )
        if s < prev_end:
            raise ValueError(f"image spans must be sorted and disjoint; ({s}, {e}) overlaps or precedes an earlier span")
        out.append((s, e))
        prev_end = e
    return out


def contiguous_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open (start, end) runs of True in a 1-D boolean array."""
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return []
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(edges[i]), int(edges[i + 1])) for i in range(0, len(edges), 2)]
