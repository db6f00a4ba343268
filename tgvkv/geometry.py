"""Patch-grid geometry per model family: which image region every vision token shows.

A resolver takes (config, processor, inputs, image_spans, image_sizes) and returns the views and the per-token map
of a `TokenLayout`. Register one per `model_type` with `@register_geometry("llava", ...)`. Families without a
resolver still get a layout (spans, budgets, eviction all work) but no overlay geometry.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import numpy as np

from .layout import ImageView, VisionTokenMap, contiguous_runs

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
    if n_total == 0:  # text-only prompt: no grid (a 0x0 view would break overlays)
        return [], VisionTokenMap.empty()
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


# -- shared helpers for the families below -------------------------------------------------------------------------
def _input_ids(inputs) -> np.ndarray:
    ids = inputs["input_ids"]
    ids = ids.cpu().numpy() if hasattr(ids, "cpu") else np.asarray(ids)
    return ids[0] if ids.ndim == 2 else ids


def _as_list(x) -> list:
    if x is None:
        return []
    if hasattr(x, "tolist"):
        return x.tolist()
    return list(x)


def _positions_of(inputs, token_id: int | None) -> np.ndarray:
    if token_id is None:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(_input_ids(inputs) == int(token_id)).astype(np.int64)


def _take(positions: np.ndarray, counts: Sequence[int], what: str) -> list[np.ndarray]:
    """Split `positions` (sorted) into consecutive groups of `counts`; the counts must account for all of them."""
    if sum(counts) != len(positions):
        raise ValueError(f"the prompt holds {len(positions)} {what} tokens but the geometry accounts for {sum(counts)}")
    bounds = np.cumsum([0, *counts])
    return [positions[bounds[i] : bounds[i + 1]] for i in range(len(counts))]


def _grid_entries(positions: np.ndarray, image: int, view: int, rows: int, cols: int, newline: bool = False) -> list:
    """Row-major grid tokens; with `newline`, each row is followed by one layout token (view -1)."""
    per_row = cols + (1 if newline else 0)
    if len(positions) != rows * per_row:
        raise ValueError(f"view of {rows}x{cols}{' + newlines' if newline else ''} needs {rows * per_row} tokens, got {len(positions)}")
    out = []
    for k, p in enumerate(positions):
        r, c = divmod(k, per_row)
        out.append((int(p), image, view, r, c) if c < cols else (int(p), image, -1, -1, -1))
    return out


# -- LLaVA-NeXT / LLaVA-OneVision (anyres) ---------------------------------------------------------------------------
def _unpadded_window(orig_hw: tuple[int, int], cur_h: int, cur_w: int) -> tuple[int, int, int, int]:
    """Rows [r0, r1) and cols [c0, c1) of the (cur_h, cur_w) tile-mosaic feature grid that the model's `unpad_image`
    keeps (run on a grid of its own row/col indices, so the modeling code itself decides)."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    rr, cc = torch.meshgrid(torch.arange(cur_h), torch.arange(cur_w), indexing="ij")
    kept = unpad_image(torch.stack([rr, cc]), list(orig_hw))
    return int(kept[0, 0, 0]), int(kept[0, -1, 0]) + 1, int(kept[1, 0, 0]), int(kept[1, 0, -1]) + 1


def _mosaic_box(orig_hw, best_hw, window, cur_hw) -> tuple[float, float, float, float]:
    """Region of the original image covered by feature rows/cols `window` of the canvas `best_hw` (pixels).

    The image processor resizes the image to fit `best_hw` (aspect kept, `get_patch_output_size`) and pads it
    centrally; a grid cell therefore maps back to the image through that resize and paste offset. Values can lie
    slightly outside [0, 1] when `unpad_image`'s integer rounding keeps a sliver of padding.
    """
    h, w = orig_hw
    bh, bw = best_hw
    cur_h, cur_w = cur_hw
    r0, r1, c0, c1 = window
    scale_w, scale_h = bw / w, bh / h
    if scale_w < scale_h:
        new_w, new_h = bw, min(math.ceil(h * scale_w), bh)
    else:
        new_h, new_w = bh, min(math.ceil(w * scale_h), bw)
    paste_y, paste_x = (bh - new_h) // 2, (bw - new_w) // 2
    fy, fx = bh / cur_h, bw / cur_w  # canvas pixels per feature cell
    return ((r0 * fy - paste_y) / new_h, (c0 * fx - paste_x) / new_w, (r1 * fy - paste_y) / new_h, (c1 * fx - paste_x) / new_w)


def _anyres_image(config, orig_hw, image: int, max_patches: int | None, label: str):
    """Views and (view-relative) token plan of one anyres image: base grid, then the unpadded mosaic + newlines."""
    from transformers.image_processing_utils import select_best_resolution

    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    best_h, best_w = select_best_resolution(list(orig_hw), config.image_grid_pinpoints)
    cur_h, cur_w = (best_h // vc.image_size) * side, (best_w // vc.image_size) * side
    window = _unpadded_window(orig_hw, cur_h, cur_w)
    rows, cols = window[1] - window[0], window[3] - window[2]
    if max_patches is not None:  # OneVision anyres_max_N: bilinear downsampling of the unpadded mosaic
        ratio = math.sqrt(rows * cols / (max_patches * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    base = ImageView(image_index=image, name=f"{label}base", rows=side, cols=side)
    tiles = ImageView(image_index=image, name=f"{label}tiles", rows=rows, cols=cols,
                      box=_mosaic_box(orig_hw, (best_h, best_w), window, (cur_h, cur_w)))
    return base, tiles


def _anyres_geometry(config, processor, inputs, image_sizes, max_patches: int | None, need_patching: list[bool], n_extra: int):
    """Shared by LLaVA-NeXT and LLaVA-OneVision; token order verified against `pack_image_features`:
    per image [extra (CLS) tokens] + base grid (side x side, row-major) + unpadded mosaic rows, each row followed by
    one newline token; an image that is not patched (OneVision multi-image) is base grid + one newline."""
    sizes = [tuple(int(v) for v in hw) for hw in _as_list(inputs.get("image_sizes"))]  # (H, W) per image
    positions = _positions_of(inputs, config.image_token_id)
    side = config.vision_config.image_size // config.vision_config.patch_size
    views: list[ImageView] = []
    plans = []
    for i, hw in enumerate(sizes):
        label = "" if len(sizes) == 1 else f"image {i + 1} "
        if need_patching[i]:
            base, tiles = _anyres_image(config, hw, i, max_patches, label)
            plans.append((base, tiles))
        else:
            plans.append((ImageView(image_index=i, name=f"{label}base", rows=side, cols=side), None))
    counts = [n_extra + side * side + (t.rows * (t.cols + 1) if t is not None else 1) for _, t in plans]
    entries: list = []
    for i, (pos, (base, tiles)) in enumerate(zip(_take(positions, counts, "image"), plans)):
        entries += [(int(p), i, -1, -1, -1) for p in pos[:n_extra]]
        pos = pos[n_extra:]
        views.append(base)
        entries += _grid_entries(pos[: side * side], i, len(views) - 1, side, side)
        rest = pos[side * side :]
        if tiles is None:
            entries += [(int(p), i, -1, -1, -1) for p in rest]
        else:
            views.append(tiles)
            entries += _grid_entries(rest, i, len(views) - 1, tiles.rows, tiles.cols, newline=True)
    return views, entries


@register_geometry("llava_next")
def llava_next_geometry(config, processor, inputs, spans, image_sizes) -> tuple[list[ImageView], VisionTokenMap]:
    """LLaVA-NeXT: per image a base view (the whole image squashed to the tower's square input) and the high-res
    view (tile mosaic of the best `image_grid_pinpoints` resolution, padding removed), a newline token per mosaic row."""
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    n_extra = 0 if strategy == "default" else int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    n = len(_as_list(inputs.get("image_sizes")))
    views, entries = _anyres_geometry(config, processor, inputs, image_sizes, None, [True] * n, n_extra)
    return views, build_token_map(entries)


def _max_patches(config) -> int:
    spec = getattr(config, "vision_aspect_ratio", "anyres_max_9")
    return int(spec.strip("anyres_max_"))


@register_geometry("llava_onevision")
def llava_onevision_geometry(config, processor, inputs, spans, image_sizes) -> tuple[list[ImageView], VisionTokenMap]:
    """LLaVA-OneVision: images as LLaVA-NeXT (mosaic downsampled to at most `anyres_max_N` base grids; several
    images in one sample: base grid + newline only, per `batch_num_images`); videos: per frame a pooled grid
    (ceil(side/2) squared, bilinear 2x pooling), one newline after the last frame. Video frames get
    image_index = number of images + video index."""
    n = len(_as_list(inputs.get("image_sizes")))
    per_sample = [int(v) for v in _as_list(inputs.get("batch_num_images"))] or [1] * n
    need = [k == 1 for k in per_sample for _ in range(k)] if sum(per_sample) == n else [True] * n
    views, entries = _anyres_geometry(config, processor, inputs, image_sizes, _max_patches(config), need, 0) if n else ([], [])
    videos = inputs.get("pixel_values_videos")
    if videos is not None:
        side = config.vision_config.image_size // config.vision_config.patch_size
        pooled = math.ceil(side / 2)
        frames = [int(v.shape[0]) for v in videos]
        vpos = _take(_positions_of(inputs, getattr(config, "video_token_id", None)), [f * pooled * pooled + 1 for f in frames], "video")
        for v, (pos, n_frames) in enumerate(zip(vpos, frames)):
            idx = n + v
            for f in range(n_frames):
                views.append(ImageView(image_index=idx, name=f"video {v + 1} frame {f + 1}", rows=pooled, cols=pooled))
                entries += _grid_entries(pos[f * pooled * pooled : (f + 1) * pooled * pooled], idx, len(views) - 1, pooled, pooled)
            entries.append((int(pos[-1]), idx, -1, -1, -1))
    entries.sort()
    return views, build_token_map(entries)


# -- Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dynamic resolution, merged patches) -----------------------------------------
@register_geometry("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
def qwen_vl_geometry(config, processor, inputs, spans, image_sizes) -> tuple[list[ImageView], VisionTokenMap]:
    """Qwen-VL: each image is resized as a whole (no crop) to a multiple of patch * merge and encoded as a grid of
    `image_grid_thw` = (t, h, w) patches; every `spatial_merge_size`^2 block becomes one token, in row-major order
    over the (h / merge, w / merge) merged grid (the order `get_rope_index` gives the M-RoPE height/width ids).
    Videos: one view per temporal group of `temporal_patch_size` frames (`video_grid_thw`), views in time order;
    Qwen3-VL puts timestamp text between frame groups, which is text, not vision. Video views get
    image_index = number of images + video index."""
    merge = int(config.vision_config.spatial_merge_size)
    views: list[ImageView] = []
    entries: list = []
    grids = [tuple(int(x) for x in g) for g in _as_list(inputs.get("image_grid_thw"))]
    counts = [t * (h // merge) * (w // merge) for t, h, w in grids]
    image_pos = _take(_positions_of(inputs, config.image_token_id), counts, "image")
    for i, ((t, h, w), pos) in enumerate(zip(grids, image_pos)):
        rows, cols = h // merge, w // merge
        for k in range(t):  # t == 1 for images
            name = "image" if len(grids) == 1 else f"image {i + 1}"
            views.append(ImageView(image_index=i, name=name if t == 1 else f"{name} t{k + 1}", rows=rows, cols=cols))
            entries += _grid_entries(pos[k * rows * cols : (k + 1) * rows * cols], i, len(views) - 1, rows, cols)
    vgrids = [tuple(int(x) for x in g) for g in _as_list(inputs.get("video_grid_thw"))]
    if vgrids:
        counts = [t * (h // merge) * (w // merge) for t, h, w in vgrids]
        video_pos = _take(_positions_of(inputs, getattr(config, "video_token_id", None)), counts, "video")
        tps = int(getattr(config.vision_config, "temporal_patch_size", 1) or 1)
        for v, ((t, h, w), pos) in enumerate(zip(vgrids, video_pos)):
            idx, rows, cols = len(grids) + v, h // merge, w // merge
            for k in range(t):
                frames = f"frame {k * tps + 1}" if tps == 1 else f"frames {k * tps + 1}-{(k + 1) * tps}"
                views.append(ImageView(image_index=idx, name=f"video {v + 1} {frames}", rows=rows, cols=cols))
                entries += _grid_entries(pos[k * rows * cols : (k + 1) * rows * cols], idx, len(views) - 1, rows, cols)
    entries.sort()
    return views, build_token_map(entries)


# -- Idefics3 / SmolVLM (image splitting) -------------------------------------------------------------------------
_ROW_COL = re.compile(r"^<row_(\d+)_col_(\d+)>$")


@register_geometry("idefics3", "smolvlm")
def idefics3_geometry(config, processor, inputs, spans, image_sizes) -> tuple[list[ImageView], VisionTokenMap]:
    """Idefics3 / SmolVLM: an image larger than the tower's input is resized to a multiple of it and cut into
    rows x cols sub-images, each announced by a `<row_i_col_j>` text token, followed by the whole image squashed
    to one sub-image after `<global-img>`. Each sub-image is side x side tokens after the pixel shuffle
    (side = image_size / patch_size / scale_factor, row-major). Views per image: "tiles", the sub-images put
    together as one (rows * side) x (cols * side) mosaic covering the whole image, and "global". The tags and
    `<fake_token_around_image>` are text tokens (only `<image>` tokens are vision). The grid comes from the tags
    the processor wrote into the prompt, so it is whatever the processor decided.
    SmolVLM video frames are `<global-img>` images too: those after the first len(image_sizes) images are taken
    as frames of one video (image_index = number of images, views "video 1 frame f")."""
    vc = config.vision_config
    side = (vc.image_size // vc.patch_size) // int(getattr(config, "scale_factor", 1) or 1)
    ids = _input_ids(inputs)
    runs = contiguous_runs(ids == int(config.image_token_id))
    tok = getattr(processor, "tokenizer", processor)
    tags = tok.convert_ids_to_tokens([int(ids[s - 1]) if s > 0 else -1 for s, _ in runs]) if runs else []
    n_globals = sum(1 for t in tags if not (t and _ROW_COL.match(t)))
    n_images = min(len(image_sizes), n_globals)  # image_sizes lists the prompt's images; the rest are video frames
    views: list[ImageView] = []
    entries: list = []
    k, pending = 0, []  # k: index of the current global image; pending: (run, i, j) tiles of the current image
    for (s, e), tag in zip(runs, tags):
        if e - s != side * side:
            raise ValueError(f"an image run of {e - s} tokens does not match a {side}x{side} sub-image grid")
        match = _ROW_COL.match(tag or "")
        if match:
            pending.append(((s, e), int(match.group(1)) - 1, int(match.group(2)) - 1))
            continue
        if k < n_images:
            image, label, glob = k, ("" if n_images == 1 else f"image {k + 1} "), "global"
        else:
            image, label, glob = n_images, "video 1 ", f"frame {k - n_images + 1}"
        if pending:
            rows, cols = max(p[1] for p in pending) + 1, max(p[2] for p in pending) + 1
            views.append(ImageView(image_index=image, name=f"{label}tiles", rows=rows * side, cols=cols * side))
            for (ts, te), i, j in pending:
                entries += [(ts + q, image, len(views) - 1, i * side + q // side, j * side + q % side) for q in range(te - ts)]
        views.append(ImageView(image_index=image, name=f"{label}{glob}", rows=side, cols=side))
        entries += _grid_entries(np.arange(s, e), image, len(views) - 1, side, side)
        k, pending = k + 1, []
    if pending:
        raise ValueError("sub-image tiles without their global image in the prompt")
    return views, build_token_map(entries)


# -- Gemma 3 ------------------------------------------------------------------------------------------------------
def _pan_and_scan_boxes(size: tuple[int, int], n: int) -> list[tuple[float, float, float, float]]:
    """Boxes of Gemma 3's pan-and-scan crops: n equal crops (ceil size) along the longer side of a (w, h) image."""
    w, h = size
    if w >= h:
        cw = math.ceil(w / n)
        return [(0.0, k * cw / w, 1.0, min((k + 1) * cw, w) / w) for k in range(n)]
    ch = math.ceil(h / n)
    return [(k * ch / h, 0.0, min((k + 1) * ch, h) / h, 1.0) for k in range(n)]


def _gemma_crops(processor, inputs, image_sizes, n_runs: int) -> list[int]:
    """Pan-and-scan crops per image: from `num_crops` if the inputs kept it, else none when there is one run per
    image, else the image processor's own `pan_and_scan_batched` at its defaults (it only needs the image size)."""
    n_images = max(len(image_sizes), 1)
    given = _as_list(inputs.get("num_crops"))
    if given:
        return [int(c) for row in given for c in (row if isinstance(row, list) else [row])]
    if n_runs == n_images:
        return [0] * n_images
    if n_images == 1:
        return [n_runs - 1]
    ip = getattr(processor, "image_processor", None)
    try:
        import torch

        crops = [len(ip.pan_and_scan_batched(torch.empty(1, 3, h, w), ip.pan_and_scan_min_crop_size, ip.pan_and_scan_max_num_crops,
                                             ip.pan_and_scan_min_ratio_to_activate)) for w, h in image_sizes]
    except Exception as e:  # noqa: BLE001 - any failure means we cannot tell the crops apart
        raise ValueError(f"cannot split {n_runs} Gemma 3 image sequences among {n_images} images (pan and scan): {e}") from e
    if sum(crops) + n_images != n_runs:
        raise ValueError(f"cannot split {n_runs} Gemma 3 image sequences among {n_images} images (pan and scan)")
    return crops


@register_geometry("gemma3")
def gemma3_geometry(config, processor, inputs, spans, image_sizes) -> tuple[list[ImageView], VisionTokenMap]:
    """Gemma 3: each image is squashed to the SigLIP input and avg-pooled to `mm_tokens_per_image` soft tokens,
    a square grid in row-major order, between <start_of_image> and <end_of_image> (text tokens). Only the soft
    tokens (`config.image_token_id`; the processor's `image_token_id` is <start_of_image>) are vision.
    Pan and scan (`num_crops` in the inputs): the whole image first, then its crops, one view each."""
    side = math.isqrt(int(config.mm_tokens_per_image))
    if side * side != int(config.mm_tokens_per_image):
        raise ValueError(f"mm_tokens_per_image={config.mm_tokens_per_image} is not a square grid")
    positions = _positions_of(inputs, config.image_token_id)
    per_image = [1 + c for c in _gemma_crops(processor, inputs, image_sizes, len(positions) // (side * side))]
    pos = _take(positions, [n * side * side for n in per_image], "image")
    views: list[ImageView] = []
    entries: list = []
    for i, (p, n) in enumerate(zip(pos, per_image)):
        label = "image" if len(per_image) == 1 else f"image {i + 1}"
        boxes = [(0.0, 0.0, 1.0, 1.0)] + (_pan_and_scan_boxes(image_sizes[i], n - 1) if n > 1 else [])
        for k, box in enumerate(boxes):
            views.append(ImageView(image_index=i, name=label if k == 0 else f"{label} crop {k}", rows=side, cols=side, box=box))
            entries += _grid_entries(p[k * side * side : (k + 1) * side * side], i, len(views) - 1, side, side)
    return views, build_token_map(entries)


# -- overlays ---------------------------------------------------------------------------------------------------------
def kept_grids(layout, kept_positions) -> list[np.ndarray]:
    """Per view of `layout`, a (rows, cols) bool grid: True where the token of that cell is among `kept_positions`.

    Layout tokens (newlines, row/col tags: view -1) have no cell and are ignored. Works for any family's views.
    """
    m = layout.token_map
    kept = np.isin(m.positions, np.asarray(kept_positions, dtype=np.int64))
    grids = [np.zeros((v.rows, v.cols), dtype=bool) for v in layout.views]
    for v, r, c, k in zip(m.view_index, m.row, m.col, kept):
        if v >= 0:
            grids[v][r, c] = k
    return grids


def cell_box(view: ImageView, row: int, col: int, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Pixel rectangle (x0, y0, x1, y1) of the original (width, height) image that grid cell (row, col) shows."""
    w, h = image_size
    y0, x0, y1, x1 = view.box
    ch, cw = (y1 - y0) / view.rows, (x1 - x0) / view.cols
    return ((x0 + col * cw) * w, (y0 + row * ch) * h, (x0 + (col + 1) * cw) * w, (y0 + (row + 1) * ch) * h)


def resolve_geometry(config, processor, inputs, spans, image_sizes) -> tuple[list[ImageView], VisionTokenMap]:
    model_type = getattr(config, "model_type", "")
    resolver = GEOMETRY.get(model_type)
    if resolver is None:
        return [], VisionTokenMap.empty()
    return resolver(config, processor, inputs, spans, image_sizes)
