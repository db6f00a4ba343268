"""Grid geometry of LLaVA-NeXT and LLaVA-OneVision (anyres): every vision token mapped to (image, view, row, col).

The token order is checked against the modeling code itself: synthetic image features whose channels hold their
own (row, col) are packed by the model's `pack_image_features`, and each packed vector must sit where the resolver
says. Models are tiny random ones (tests/tiny_families.py); processors load through AutoProcessor.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from tiny_families import tiny_llava_next, tiny_onevision
from tiny_models import random_image
from transformers.image_processing_utils import select_best_resolution

from tgvkv import hf_compat
from tgvkv.generation import build_layout
from tgvkv.geometry import cell_box, kept_grids

CPU = torch.device("cpu")
SIZES = [(60, 30), (30, 60), (50, 40), (64, 64), (37, 23)]  # (width, height), mostly non-square


@pytest.fixture(scope="module")
def next_model():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def ov_model():
    return tiny_onevision()


def _layout(model, proc, images, question="what is the colour ?"):
    prompt = hf_compat.render_prompt(proc, question, len(images))
    inputs = hf_compat.process_inputs(proc, images, prompt, CPU, torch.float32)
    return build_layout(model.config, proc, inputs["input_ids"], inputs, images), inputs


def _synthetic_features(config, image_hw, num_patches: int) -> torch.Tensor:
    """(num_patches, side*side, 3): base patch holds (r, c, 0); tile k holds its mosaic-global (row, col, 1)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    best_h, best_w = select_best_resolution(list(image_hw), config.image_grid_pinpoints)
    npw = best_w // config.vision_config.image_size
    rr, cc = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    feats = [torch.stack([rr, cc, torch.zeros_like(rr)], -1).reshape(side * side, 3)]
    for k in range(num_patches - 1):
        ti, tj = divmod(k, npw)
        feats.append(torch.stack([rr + ti * side, cc + tj * side, torch.ones_like(rr)], -1).reshape(side * side, 3))
    return torch.stack(feats).float()


def _check_against_pack(model, layout, inputs, exact: bool = True):
    """Pack synthetic features with the model's own code and compare with the resolver's map."""
    cfg = model.config
    newline = torch.full((3,), -7.0)
    sizes = inputs["image_sizes"]
    n_patches = [int(v) for v in _num_patches(model, inputs)]
    feats = [_synthetic_features(cfg, sizes[i].tolist(), n) for i, n in enumerate(n_patches)]
    kw = {"vision_feature_select_strategy": "default"} if cfg.model_type == "llava_next" else {"vision_aspect_ratio": cfg.vision_aspect_ratio}
    packed, lens = model.model.pack_image_features(feats, sizes, image_newline=newline, **kw)
    m = layout.token_map
    assert int(sum(lens)) == len(m.positions) == layout.n_vision
    start = 0
    for i, vec in enumerate(packed):
        sel = slice(start, start + len(vec))
        start += len(vec)
        assert np.all(m.image_index[sel] == i)
        views, rows, cols = m.view_index[sel], m.row[sel], m.col[sel]
        v = vec.numpy()
        is_nl = views == -1
        np.testing.assert_array_equal(is_nl, v[:, 2] == -7.0)  # newline tokens exactly where the model puts them
        for view in np.unique(views[~is_nl]):
            on = views == view
            name = layout.views[view].name
            assert layout.views[view].image_index == i
            if name.endswith("base"):
                np.testing.assert_array_equal(v[on, 0], rows[on])
                np.testing.assert_array_equal(v[on, 1], cols[on])
                assert np.all(v[on, 2] == 0)
            else:
                assert name.endswith("tiles") and np.allclose(v[on, 2], 1)
                if exact:  # mosaic coordinates = view coordinates + the (symmetric) unpadding offset
                    dr, dc = v[on, 0] - rows[on], v[on, 1] - cols[on]
                    assert np.all(dr == dr[0]) and np.all(dc == dc[0])
                    best = select_best_resolution(sizes[i].tolist(), model.config.image_grid_pinpoints)
                    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
                    cur_h, cur_w = best[0] // cfg.vision_config.image_size * side, best[1] // cfg.vision_config.image_size * side
                    assert dr[0] == (cur_h - layout.views[view].rows) // 2 and dc[0] == (cur_w - layout.views[view].cols) // 2
                else:  # downsampled mosaic: bilinear of a ramp is constant along a row and increases with the row
                    for r in range(layout.views[view].rows):
                        row_vals = v[on][rows[on] == r, 0]
                        assert np.allclose(row_vals, row_vals[0])
                    means = [v[on][rows[on] == r, 0].mean() for r in range(layout.views[view].rows)]
                    assert np.all(np.diff(means) > 0)
    return packed


def _num_patches(model, inputs):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    return [image_size_to_num_patches(hw.tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size) for hw in inputs["image_sizes"]]


@pytest.mark.parametrize("size", SIZES)
def test_llava_next_token_order_matches_pack_image_features(next_model, size):
    model, proc = next_model
    img = random_image(1, size)
    layout, inputs = _layout(model, proc, [img])
    _check_against_pack(model, layout, inputs)
    base, tiles = layout.views
    assert (base.rows, base.cols) == (4, 4) and base.box == (0.0, 0.0, 1.0, 1.0)
    # vision tokens: base 16, then rows x (cols + 1 newline)
    assert layout.n_vision == 16 + tiles.rows * (tiles.cols + 1)
    assert np.sum(layout.token_map.view_index == -1) == tiles.rows


def test_llava_next_values_for_a_wide_and_a_padded_image(next_model):
    model, proc = next_model
    layout, _ = _layout(model, proc, [random_image(0, (60, 30))])  # best 32x64: two tiles side by side, no padding
    tiles = layout.views[1]
    assert (tiles.rows, tiles.cols) == (4, 8) and tiles.box == (0.0, 0.0, 1.0, 1.0)
    m = layout.token_map
    first = layout.image_spans[0][0]
    # position first+16 is tiles (0, 0), first+24 is the first newline, first+25 tiles (1, 0)
    k = np.searchsorted(m.positions, [first, first + 15, first + 16, first + 23, first + 24, first + 25])
    assert m.view_index[k].tolist() == [0, 0, 1, 1, -1, 1]
    assert m.row[k].tolist() == [0, 3, 0, 0, -1, 1] and m.col[k].tolist() == [0, 3, 0, 7, -1, 0]
    # 50x40 image on a 64x64 canvas: resized to 64x52, pasted at y=6; unpadding keeps feature rows 1..6 of 8
    layout, _ = _layout(model, proc, [random_image(0, (50, 40))])
    tiles = layout.views[1]
    assert (tiles.rows, tiles.cols) == (6, 8)
    np.testing.assert_allclose(tiles.box, (2 / 52, 0.0, 50 / 52, 1.0))


def test_llava_next_two_images(next_model):
    model, proc = next_model
    imgs = [random_image(0, (60, 30)), random_image(1, (30, 60))]
    layout, inputs = _layout(model, proc, imgs, "compare the first and second images ?")
    assert [v.name for v in layout.views] == ["image 1 base", "image 1 tiles", "image 2 base", "image 2 tiles"]
    assert [(v.rows, v.cols) for v in layout.views] == [(4, 4), (4, 8), (4, 4), (8, 4)]
    # adjacent images form one contiguous span; the token map still tells them apart
    assert len(layout.image_spans) == 1
    assert layout.token_map.image_index.tolist() == [0] * (16 + 4 * 9) + [1] * (16 + 8 * 5)
    _check_against_pack(model, layout, inputs)


@pytest.mark.parametrize("size", SIZES)
def test_onevision_token_order_matches_pack_image_features(ov_model, size):
    model, proc = ov_model
    layout, inputs = _layout(model, proc, [random_image(2, size)])
    _check_against_pack(model, layout, inputs)


@pytest.mark.parametrize("size,grid", [((64, 64), (4, 4)), ((60, 30), (2, 5))])
def test_onevision_anyres_max_downsampling(size, grid):
    """anyres_max_1: a mosaic above 1.1x one base grid is bilinearly shrunk by ratio = sqrt(area / 16):
    8x8 -> ratio 2 -> 4x4; 4x8 -> ratio sqrt(2) -> int(4 // 1.414) x int(8 // 1.414) = 2x5."""
    model, proc = tiny_onevision(vision_aspect_ratio="anyres_max_1")
    layout, inputs = _layout(model, proc, [random_image(0, size)])
    base, tiles = layout.views
    assert (tiles.rows, tiles.cols) == grid
    assert layout.n_vision == 16 + grid[0] * (grid[1] + 1)
    _check_against_pack(model, layout, inputs, exact=False)


def test_onevision_multi_image_sample_is_base_plus_newline(ov_model):
    """Several images in one sample (nested list): no anyres, base grid + one newline each (pack_image_features)."""
    model, proc = ov_model
    imgs = [random_image(0, (60, 30)), random_image(1, (30, 60))]
    prompt = hf_compat.render_prompt(proc, "compare the first and second images ?", 2)
    inputs = dict(proc(images=[imgs], text=prompt, return_tensors="pt"))
    layout = build_layout(model.config, proc, inputs["input_ids"], inputs, imgs)
    assert [(v.name, v.rows, v.cols) for v in layout.views] == [("image 1 base", 4, 4), ("image 2 base", 4, 4)]
    m = layout.token_map
    assert layout.n_vision == 2 * 17 and np.sum(m.view_index == -1) == 2
    assert m.view_index[16] == -1 and m.view_index[33] == -1


def test_onevision_video_frames(ov_model):
    model, proc = ov_model
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (3, 40, 56, 3), dtype=np.uint8)  # 3 frames, 56x40
    prompt = "user: <video> describe this video assistant:"
    inputs = dict(proc(videos=[video], text=prompt, return_tensors="pt"))
    layout = build_layout(model.config, proc, inputs["input_ids"], inputs, [])
    assert [(v.name, v.rows, v.cols, v.image_index) for v in layout.views] == [(f"video 1 frame {f}", 2, 2, 0) for f in (1, 2, 3)]
    m = layout.token_map
    assert layout.n_vision == 3 * 4 + 1
    assert m.view_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [-1]
    assert m.row.tolist()[:4] == [0, 0, 1, 1] and m.col.tolist()[:4] == [0, 1, 0, 1]
    # the model agrees on the count: its video features are frames * pooled^2 + 1 newline
    with torch.no_grad():
        feats = model.model.get_video_features(inputs["pixel_values_videos"], vision_feature_layer=-1, vision_feature_select_strategy="full").pooler_output
    assert feats.shape[1] == layout.n_vision


def test_overlay_masks_for_a_non_square_image(next_model):
    model, proc = next_model
    img = random_image(0, (50, 40))
    layout, _ = _layout(model, proc, [img])
    m = layout.token_map
    base, tiles = layout.views
    # keep: base cell (1, 2), tiles cells (0, 0) and (5, 7), and a newline (ignored)
    def pick(v, r, c):
        return int(m.positions[(m.view_index == v) & (m.row == r) & (m.col == c)][0])

    newline = int(m.positions[m.view_index == -1][0])
    grids = kept_grids(layout, [pick(0, 1, 2), pick(1, 0, 0), pick(1, 5, 7), newline, 0])
    assert grids[0].shape == (4, 4) and grids[1].shape == (6, 8)
    assert np.argwhere(grids[0]).tolist() == [[1, 2]]
    assert np.argwhere(grids[1]).tolist() == [[0, 0], [5, 7]]
    # pixel boxes in the 50x40 original: base cells are 12.5 x 10; tile rows cover y in [40*2/52, 40*50/52]
    np.testing.assert_allclose(cell_box(base, 1, 2, img.size), (25.0, 10.0, 37.5, 20.0))
    y0, y1 = 40 * 2 / 52, 40 * 50 / 52
    ch = (y1 - y0) / 6
    np.testing.assert_allclose(cell_box(tiles, 0, 0, img.size), (0.0, y0, 50 / 8, y0 + ch))
    np.testing.assert_allclose(cell_box(tiles, 5, 7, img.size), (50 * 7 / 8, y1 - ch, 50.0, y1))
