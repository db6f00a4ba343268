"""Patch-grid geometry per model family: which image region every vision token shows.

A resolver takes (config, processor, inputs, image_spans, image_sizes) and returns the views and the per-token map
of a `TokenLayout`. Register one per `model_type` with `@register_geometry("llava", ...)`. Families without a
resolver still get a layout (spans, budgets, eviction all work) but no overlay geometry.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from .layout import ImageView, VisionTokenMap

Resolver = Callable[..., tuple[list[ImageView], VisionTokenMap]]
GEOMETRY: dict[str, Resolver] = {}


def register_geometry(*model_types: str) -> Callable[[Resolver], Resolver]:
    def deco(fn: Resolver) -> Resolver:
        for t in model_types:
            GEOMETRY[t] = fn
        return fn

    return deco


def build_token_map(entries: list[tuple[int, int, int, int, int]]) -> VisionTokenMap:
    """From rows of (position, image_index, view_index, row, col)."""
    if not entries:
        return VisionTokenMap.empty()
    a = np.asarray(entries, dtype=np.int64)
    return VisionTokenMap(a[:, 0], a[:, 1].astype(np.int32), a[:, 2].astype(np.int32), a[:, 3].astype(np.int32), a[:, 4].astype(np.int32))


def split_by_count(spans: Sequence[tuple[int, int]], per_image: Sequence[int]) -> list[np.ndarray]:
    """Prompt positions of each image's tokens, given the number of tokens each image contributes, in order."""
    positions = np.concatenate([np.arange(s, e) for s, e in spans]) if spans else np.zeros(0, dtype=np.int64)
    if sum(per_image) != len(positions):
        raise ValueError(f"the prompt holds {len(positions)} vision tokens but the images account for {sum(per_image)}")
    bounds = np.cumsum([0, *per_image])
    return [positions[bounds[i] : bounds[i + 1]] for i in range(len(per_image))]


def center_crop_box(size: tuple[int, int], image_processor: Any) -> tuple[float, float, float, float]:
    """Normalised region of the original (width, height) image a CLIP-style resize + center crop keeps."""
    w, h = size
    if not getattr(image_processor, "do_center_crop", False):
        return (0.0, 0.0, 1.0, 1.0)
    crop = getattr(image_processor, "crop_size", None) or {}
    shortest = (getattr(image_processor, "size", None) or {}).get("shortest_edge")
    if not shortest or not crop:
        return (0.0, 0.0, 1.0, 1.0)
    scale = shortest / min(w, h)
    rw, rh = w * scale, h * scale
    cw, ch = crop.get("width", shortest), crop.get("height", shortest)
    x0, y0 = max(0.0, (rw - cw) / 2) / rw, max(0.0, (rh - ch) / 2) / rh
    return (y0, x0, 1.0 - y0, 1.0 - x0)


@register_geometry("llava")
def llava_geometry(config, processor, inputs, spans, image_sizes) -> tuple[list[ImageView], VisionTokenMap]:
    """LLaVA-1.5: each image is one square grid of `image_seq_length` tokens in row-major order."""
    n_total = sum(e - s for s, e in spans)
    n_images = max(1, len(image_sizes))
    per = n_total // n_images
    side = math.isqrt(per)
    if side * side != per or per * n_images != n_total:
        raise ValueError(f"LLaVA expects a square grid per image; got {n_total} vision tokens for {n_images} image(s)")
    views, entries = [], []
    image_processor = getattr(processor, "image_processor", None)
    for i, pos in enumerate(split_by_count(spans, [per] * n_images)):
        box = center_crop_box(image_sizes[i], image_processor) if i < len(image_sizes) else (0.0, 0.0, 1.0, 1.0)
        views.append(ImageView(image_index=i, name="image" if n_images == 1 else f"image {i + 1}", rows=side, cols=side, box=box))
        v = len(views) - 1
        entries += [(int(p), i, v, k // side, k % side) for k, p in enumerate(pos)]
    return views, build_token_map(entries)


def resolve_geometry(config, processor, inputs, spans, image_sizes) -> tuple[list[ImageView], VisionTokenMap]:
    model_type = getattr(config, "model_type", "")
    resolver = GEOMETRY.get(model_type)
    if resolver is None:
        return [], VisionTokenMap.empty()
    return resolver(config, processor, inputs, spans, image_sizes)
