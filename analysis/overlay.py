"""Retained-patch overlays as PIL images (for the app and for both figure back-ends).

Each view is drawn on the region of its original image given by `view.box`, so base views, anyres tile mosaics and
dynamic grids all land on the right pixels; layout tokens (newlines) have no cell and are never drawn. Without an
image, a neutral panel with the view's aspect ratio stands in and the panel title says "no image stored".
What each colour means is `analysis.legend.overlay_legend`, which the figures and captions quote.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from tgvkv.layout import ImageView

from . import palette
from .compute import OverlayData

PANEL_WIDTH = 480  # px of the longer panel side
NEUTRAL = (236, 236, 236)
NO_IMAGE = "no image stored"
#: how much of the image shows through an evicted patch: little enough that it reads as the light grey the legend
#: names on any image (black -> #B8B8B8, white -> #DFDFDF), enough to recognise what was evicted
EVICTED_IMAGE_SHARE = 0.15


def panel_size(view: ImageView, image_size: tuple[int, int] | None, width: int = PANEL_WIDTH) -> tuple[int, int]:
    """(W, H) of a panel: the aspect of the view's box in the original image (or of its grid without a size)."""
    y0, x0, y1, x1 = view.box
    if image_size:
        w, h = image_size[0] * (x1 - x0), image_size[1] * (y1 - y0)
    else:
        w, h = float(view.cols), float(view.rows)
    scale = width / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def base_panel(image: Image.Image | None, view: ImageView, image_size: tuple[int, int] | None,
               width: int = PANEL_WIDTH) -> Image.Image:
    """The view's region of `image` resized to the panel, or a neutral panel when there is no image."""
    size = panel_size(view, image_size if image is None else image.size, width)
    if image is None:
        return Image.new("RGB", size, NEUTRAL)
    y0, x0, y1, x1 = view.box
    W, H = image.size
    crop = image.convert("RGB").crop((round(x0 * W), round(y0 * H), round(x1 * W), round(y1 * H)))
    upscale = size[0] >= 2 * crop.size[0]
    return crop.resize(size, Image.Resampling.NEAREST if upscale else Image.Resampling.LANCZOS)


def cell_edges(size: tuple[int, int], rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel edges (cols + 1,) in x and (rows + 1,) in y of the grid cells."""
    return np.round(np.linspace(0, size[0], cols + 1)).astype(int), np.round(np.linspace(0, size[1], rows + 1)).astype(int)


def cell_image(size: tuple[int, int], grid: np.ndarray) -> np.ndarray:
    """(H, W) array repeating each cell value of a (rows, cols) grid over its pixels."""
    xe, ye = cell_edges(size, *grid.shape)
    ci = np.searchsorted(xe, np.arange(size[0]), side="right") - 1
    ri = np.searchsorted(ye, np.arange(size[1]), side="right") - 1
    return grid[np.clip(ri, 0, grid.shape[0] - 1)][:, np.clip(ci, 0, grid.shape[1] - 1)]


def render_kept(base: Image.Image, kept: np.ndarray, has_image: bool = True) -> Image.Image:
    """Kept patches as they are, evicted ones washed out to light grey; kept regions outlined in the KEPT colour.

    On a neutral panel (no image) kept cells are filled with the KEPT colour instead."""
    px = np.asarray(base, dtype=np.float64)
    mask = cell_image(base.size, kept)[..., None]
    fill = np.array(palette.hex_to_rgb(palette.EVICTED_FILL))
    washed = EVICTED_IMAGE_SHARE * px.mean(axis=2, keepdims=True) + (1 - EVICTED_IMAGE_SHARE) * fill
    kept_px = px if has_image else 0.6 * np.array(palette.hex_to_rgb(palette.KEPT)) + 0.4 * px
    img = _gridlines(Image.fromarray(np.where(mask, kept_px, washed).clip(0, 255).astype(np.uint8)), kept.shape)
    return _outline(img, kept)


def _outline(img: Image.Image, kept: np.ndarray) -> Image.Image:
    """Draw the border between kept and evicted cells (and the panel edge around kept cells)."""
    draw = ImageDraw.Draw(img)
    xe, ye = cell_edges(img.size, *kept.shape)
    w = max(2, min(4, int(xe[1] - xe[0]) // 10))
    pad = np.pad(kept, 1, constant_values=False)
    for r, c in zip(*np.nonzero(kept)):
        x0, x1, y0, y1 = xe[c], xe[c + 1] - 1, ye[r], ye[r + 1] - 1
        for edge, line in (((-1, 0), (x0, y0, x1, y0)), ((1, 0), (x0, y1, x1, y1)),
                           ((0, -1), (x0, y0, x0, y1)), ((0, 1), (x1, y0, x1, y1))):
            if not pad[r + 1 + edge[0], c + 1 + edge[1]]:
                draw.line(line, fill=palette.KEPT, width=w)
    return img


def render_counts(base: Image.Image, counts: np.ndarray, num_layers: int) -> Image.Image:
    """Heat overlay of how many layers keep each patch (viridis over a greyscale copy of the image)."""
    px = np.asarray(base.convert("L").convert("RGB"), dtype=np.float64)
    frac = cell_image(base.size, counts.astype(np.float64) / max(num_layers, 1))
    heat = colormaps[palette.SEQUENTIAL](frac)[..., :3] * 255
    out = 0.7 * heat + 0.3 * px
    img = _gridlines(Image.fromarray(out.clip(0, 255).astype(np.uint8)), counts.shape)
    return _cell_numbers(img, counts)


def draw_highlights(img: Image.Image, grid_shape: tuple[int, int], cells: Sequence[tuple[int, int]]) -> Image.Image:
    """Outline the given (row, col) cells in the highlight colour."""
    img = img.copy()
    draw = ImageDraw.Draw(img)
    xe, ye = cell_edges(img.size, *grid_shape)
    width = max(2, min(5, (xe[1] - xe[0]) // 6))
    for r, c in cells:
        draw.rectangle((xe[c], ye[r], xe[c + 1] - 1, ye[r + 1] - 1), outline=palette.HIGHLIGHT, width=width)
    return img


def _gridlines(img: Image.Image, shape: tuple[int, int]) -> Image.Image:
    xe, ye = cell_edges(img.size, *shape)
    if img.size[0] / shape[1] < 6:  # cells too small for lines to help
        return img
    draw = ImageDraw.Draw(img)
    for x in xe[1:-1]:
        draw.line((x, 0, x, img.size[1]), fill=(255, 255, 255), width=1)
    for y in ye[1:-1]:
        draw.line((0, y, img.size[0], y), fill=(255, 255, 255), width=1)
    return img


def _banner(img: Image.Image, text: str) -> Image.Image:
    """`text` on a white band along the panel's bottom edge (says why there is no picture under the cells)."""
    draw = ImageDraw.Draw(img)
    size = max(10, img.width // 24)
    x0, y0, x1, y1 = draw.textbbox((img.width / 2, img.height - 4), text, anchor="mb", font_size=size)
    draw.rectangle((x0 - 6, y0 - 4, x1 + 6, img.height), fill=(255, 255, 255))
    draw.text((img.width / 2, img.height - 4), text, anchor="mb", fill=(0, 0, 0), font_size=size)
    return img


def _cell_numbers(img: Image.Image, counts: np.ndarray) -> Image.Image:
    xe, ye = cell_edges(img.size, *counts.shape)
    if min(np.diff(xe).min(), np.diff(ye).min()) < 24:
        return img
    draw = ImageDraw.Draw(img)
    for (r, c), v in np.ndenumerate(counts):
        draw.text(((xe[c] + xe[c + 1]) / 2, (ye[r] + ye[r + 1]) / 2), str(int(v)), fill=(255, 255, 255), anchor="mm",
                  font_size=max(10, int(min(xe[1] - xe[0], ye[1] - ye[0]) * 0.45)), stroke_width=2, stroke_fill=(0, 0, 0))
    return img


def views_with_image(data: OverlayData, images: Sequence[Image.Image] | None) -> list[bool]:
    """Per view: whether its original image is available (otherwise the panel is a neutral stand-in)."""
    return [bool(images) and v.image_index < len(images) and images[v.image_index] is not None for v in data.views]


def overlay_panels(data: OverlayData, images: Sequence[Image.Image] | None = None, kind: str = "kept",
                   width: int = PANEL_WIDTH) -> list[tuple[str, Image.Image]]:
    """One (title, PIL image) per view: kind 'kept' (the chosen layer) or 'counts' (layers keeping each patch)."""
    panels = []
    for vi, view in enumerate(data.views):
        image = images[view.image_index] if views_with_image(data, images)[vi] else None
        size = data.image_sizes[view.image_index] if view.image_index < len(data.image_sizes) else None
        base = base_panel(image, view, size, width)
        if kind == "kept":
            img, k = render_kept(base, data.kept[vi], image is not None), int(data.kept[vi].sum())
            title = f"{view.name}: {k}/{data.kept[vi].size} kept"
        elif kind == "counts":
            img = render_counts(base, data.layer_counts[vi], data.num_layers)
            title = f"{view.name}: layers keeping each patch (of {data.num_layers})"
        else:
            raise ValueError(f"overlay kind must be 'kept' or 'counts', got {kind!r}")
        img = draw_highlights(img, (view.rows, view.cols), [(r, c) for v, r, c in data.top if v == vi])
        if image is None:
            title += f" ({NO_IMAGE})"
            img = _banner(img, NO_IMAGE)
        panels.append((title, img))
    return panels
