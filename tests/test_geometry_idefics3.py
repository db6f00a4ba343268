"""Idefics3 / SmolVLM geometry: sub-image tiles (from the prompt's <row_i_col_j> tags) + the global image.

Checked against the processor's own split logic (`get_number_of_image_patches`) and the model's pixel shuffle
(token k of a sub-image is merged-grid cell divmod(k, side)).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tiny_families as tf
from tiny_models import random_image

from tgvkv import hf_compat
from tgvkv.generation import build_layout
from tgvkv.geometry import cell_box, kept_grids

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def idefics(request):
    if request.param == "smolvlm":
        pytest.importorskip("num2words")  # SmolVLMProcessor requires it, as for hub checkpoints
    return getattr(tf, f"tiny_{request.param}")(longest_edge=48)


def _layout(model, proc, images, q="what is the colour ?"):
    prompt = hf_compat.render_prompt(proc, q, len(images))
    inputs = hf_compat.process_inputs(proc, images, prompt, CPU, torch.float32)
    return build_layout(model.config, proc, inputs["input_ids"], inputs, images), inputs


@pytest.mark.parametrize("sizes", [[(48, 16)], [(30, 50)], [(20, 20), (48, 30)]])
def test_tiles_and_global_views_follow_the_processor(idefics, sizes):
    model, proc = idefics
    images = [random_image(i, s) for i, s in enumerate(sizes)]
    layout, inputs = _layout(model, proc, images)
    side = 2
    views = layout.views
    assert len(views) == 2 * len(images)
    n_sub = 0
    for i, (w, h) in enumerate(sizes):
        _, rows, cols = proc.image_processor.get_number_of_image_patches(h, w)  # the processor's own split
        tiles, glob = views[2 * i], views[2 * i + 1]
        assert tiles.name.endswith("tiles") and glob.name.endswith("global") and tiles.image_index == glob.image_index == i
        assert (tiles.rows, tiles.cols) == (rows * side, cols * side) and (glob.rows, glob.cols) == (side, side)
        n_sub += rows * cols + 1
    assert inputs["pixel_values"].shape[1] == n_sub  # one encoder image per sub-image + global
    assert layout.n_vision == n_sub * side * side
    m = layout.token_map
    assert m.positions.tolist() == layout.vision_positions.tolist() and np.all(m.view_index >= 0)


def test_wide_image_token_by_token(idefics):
    """48x16 -> 1 x 3 sub-images of 2x2 tokens: prompt order tile(0,0), tile(0,1), tile(0,2), global."""
    model, proc = idefics
    layout, inputs = _layout(model, proc, [random_image(0, (48, 16))])
    m = layout.token_map
    assert [(v.rows, v.cols) for v in layout.views] == [(2, 6), (2, 2)]
    assert m.view_index.tolist() == [0] * 12 + [1] * 4
    assert m.row.tolist() == [0, 0, 1, 1] * 3 + [0, 0, 1, 1]
    assert m.col.tolist() == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 0, 1, 0, 1]
    tokens = proc.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    assert [tokens[p - 1] for p in m.positions[::4]] == ["<row_1_col_1>", "<row_1_col_2>", "<row_1_col_3>", "<global-img>"]


def test_pixel_shuffle_is_row_major(idefics):
    model, _ = idefics
    n = 4  # patches per side of a sub-image
    rr, cc = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    x = torch.stack([rr, cc], -1).reshape(1, n * n, 2).float()
    out = model.model.connector.pixel_shuffle(x, 2)[0]  # (4, 8): each token = 4 patches' (r, c)
    for k in range(4):
        i, j = divmod(k, 2)
        patches = out[k].reshape(4, 2)
        assert set(map(tuple, patches.int().tolist())) == {(2 * i + a, 2 * j + b) for a in (0, 1) for b in (0, 1)}


def test_overlay_masks_for_a_non_square_image(idefics):
    model, proc = idefics
    img = random_image(0, (48, 16))
    layout, _ = _layout(model, proc, [img])
    tiles, glob = layout.views
    first = layout.vision_positions[0]
    # prompt positions of the vision tokens are not contiguous (tags between sub-images)
    pos = layout.token_map.positions
    kept = [pos[0], pos[5], pos[11], pos[12]]  # tiles (0,0), (0,3), (1,5); global (0,0)
    grids = kept_grids(layout, kept)
    assert np.argwhere(grids[0]).tolist() == [[0, 0], [0, 3], [1, 5]]
    assert np.argwhere(grids[1]).tolist() == [[0, 0]]
    np.testing.assert_allclose(cell_box(tiles, 1, 5, img.size), (40.0, 8.0, 48.0, 16.0))  # 8x8-pixel cells
    np.testing.assert_allclose(cell_box(glob, 0, 0, img.size), (0.0, 0.0, 24.0, 8.0))
    assert first == pos[0]
