"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL: merged-patch grids checked against the model's own M-RoPE ids, and 3-D decode positions.

`get_rope_index` gives every image token a (t, h, w) rotary id; h and w minus the image's first id are exactly the
token's row and column in the merged grid, so the resolver is verified by the modeling code itself.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tiny_families as tf
from tiny_models import random_image

from tgvkv import hf_compat
from tgvkv.generation import RunOptions, build_layout, generate
from tgvkv.geometry import cell_box, kept_grids

CPU = torch.device("cpu")
Q = "what is the colour of the circle ?"


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def qwen(request):
    return getattr(tf, f"tiny_{request.param}")()


def _inputs(proc, images, question=Q):
    prompt = hf_compat.render_prompt(proc, question, len(images))
    return hf_compat.process_inputs(proc, images, prompt, CPU, torch.float32)


def _rope_index(model, inputs):
    kw = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "attention_mask", "second_per_grid_ts") if k in inputs}
    pos, deltas = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], **kw)
    return pos[:, 0].numpy(), int(deltas[0, 0])  # (3, T)


@pytest.mark.parametrize("sizes", [[(40, 24)], [(24, 40)], [(40, 24), (16, 32), (56, 16)]])
def test_grid_matches_mrope_ids(qwen, sizes):
    model, proc = qwen
    images = [random_image(i, s) for i, s in enumerate(sizes)]
    inputs = _inputs(proc, images)
    layout = build_layout(model.config, proc, inputs["input_ids"], inputs, images)
    pos, _ = _rope_index(model, inputs)
    m = layout.token_map
    assert m.positions.tolist() == layout.vision_positions.tolist() and np.all(m.view_index >= 0)
    for i, (w, h) in enumerate(sizes):
        view = layout.views[i]
        on = m.image_index == i
        p = m.positions[on]
        # the processor resizes to multiples of patch * merge = 8 px: the merged grid is (h / 8, w / 8)
        assert (view.rows, view.cols) == (round(h / 8), round(w / 8)) and view.box == (0.0, 0.0, 1.0, 1.0)
        np.testing.assert_array_equal(pos[1, p] - pos[1, p].min(), m.row[on])
        np.testing.assert_array_equal(pos[2, p] - pos[2, p].min(), m.col[on])
        assert np.all(pos[0, p] == pos[0, p[0]])  # one temporal index per image


def test_decode_positions_are_max_prefill_position_plus_step(qwen):
    """The 3-D M-RoPE id of decode step k is max(prefill ids) + 1 + k in all three rows, with or without eviction."""
    model, proc = qwen
    img = random_image(3, (40, 24))
    pos, delta = _rope_index(model, _inputs(proc, [img]))
    T = pos.shape[1]
    assert delta == pos.max() + 1 - T < 0  # image tokens share ids: the next id is below T
    for keep in (1.0, 0.3):
        seen = []

        def hook(module, args, kwargs):
            if kwargs["inputs_embeds"].shape[1] == 1:
                seen.append(kwargs["position_ids"].detach().clone())

        h = model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
        try:
            res = generate(model, proc, [img], Q, "tgv-kv", keep, options=RunOptions(max_new_tokens=5), teacher_tokens=[5, 6, 7, 8, 9])
            res2 = generate(model, proc, [img], Q, "tgv-kv", keep, options=RunOptions(max_new_tokens=5))
        finally:
            h.remove()
        n_teacher = 4
        assert len(seen) >= n_teacher + 2
        for k, ids in enumerate(seen[:n_teacher]):  # teacher: the model derives (3, 1, 1) ids from the logical length
            assert ids.shape == (3, 1, 1) and ids.flatten().tolist() == [pos.max() + 1 + k] * 3
        for k, ids in enumerate(seen[n_teacher:]):
            # generate continuing from a cache: transformers' Qwen override passes text position + rope_deltas as
            # one row (1, 1, 1), which the text model expands to the three M-RoPE rows
            assert ids.shape == (1, 1, 1) and ids.item() == pos.max() + 1 + k
        if keep < 1:
            assert res.trace.cache_len_final.max() < T and res2.trace.cache_len_final.max() < T


def test_overlay_masks_for_a_non_square_image(qwen):
    model, proc = qwen
    img = random_image(0, (40, 24))
    inputs = _inputs(proc, [img])
    layout = build_layout(model.config, proc, inputs["input_ids"], inputs, [img])
    (view,) = layout.views
    assert (view.rows, view.cols) == (3, 5)
    first = layout.vision_positions[0]
    kept = [0, first + 0, first + 4, first + 7, first + 14]  # cells (0,0) (0,4) (1,2) (2,4) in row-major order
    grid = kept_grids(layout, kept)[0]
    assert np.argwhere(grid).tolist() == [[0, 0], [0, 4], [1, 2], [2, 4]]
    np.testing.assert_allclose(cell_box(view, 1, 2, img.size), (16.0, 8.0, 24.0, 16.0))  # 8x8-pixel cells
    # an evicted run: the trace's kept mask of a layer maps to the same grid
    res = generate(model, proc, [img], Q, "tgv-kv", 0.3, options=RunOptions(max_new_tokens=1))
    for l in range(res.trace.num_layers):
        kept_l = res.trace.kept_positions(l)
        g = kept_grids(res.trace.layout, kept_l)[0]
        expect = np.isin(first + np.arange(15), kept_l).reshape(3, 5)
        np.testing.assert_array_equal(g, expect)
