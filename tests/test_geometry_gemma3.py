"""Gemma 3: soft-token grid, one BOS, bidirectional image attention in the captured maps, sliding layers untouched."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tiny_families as tf
from tiny_models import random_image

import tgvkv
from tgvkv import hf_compat
from tgvkv.generation import RunOptions, build_layout, generate
from tgvkv.geometry import cell_box, kept_grids

CPU = torch.device("cpu")
Q = "what is the colour of the circle ?"


@pytest.fixture(scope="module")
def gemma():
    return tf.tiny_gemma3()


def _inputs(proc, images, **kw):
    prompt = hf_compat.render_prompt(proc, Q, len(images))
    if kw:
        return dict(proc(images=images, text=prompt, return_tensors="pt", add_special_tokens=False, **kw))
    return hf_compat.process_inputs(proc, images, prompt, CPU, torch.float32)


def test_soft_tokens_are_the_vision_tokens_and_one_bos(gemma):
    model, proc = gemma
    img = random_image(0, (48, 20))
    inputs = _inputs(proc, [img])
    ids = inputs["input_ids"][0].tolist()
    bos = proc.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1  # the template writes <bos>; the tokenizer must not add another
    assert proc.image_token_id == proc.tokenizer.convert_tokens_to_ids("<start_of_image>") != model.config.image_token_id
    layout = build_layout(model.config, proc, inputs["input_ids"], inputs, [img])
    (view,) = layout.views
    assert (view.rows, view.cols, view.box) == (4, 4, (0.0, 0.0, 1.0, 1.0))
    s, e = layout.image_spans[0]
    assert e - s == 16 and ids[s - 1] == proc.image_token_id and ids[e] == proc.tokenizer.convert_tokens_to_ids("<end_of_image>")
    m = layout.token_map
    assert m.row.tolist() == [r for r in range(4) for _ in range(4)] and m.col.tolist() == list(range(4)) * 4
    # overlay: kept cells of a 48x20 image, each cell 12 x 5 pixels
    grid = kept_grids(layout, [s + 1, s + 14])[0]
    assert np.argwhere(grid).tolist() == [[0, 1], [3, 2]]
    np.testing.assert_allclose(cell_box(view, 3, 2, img.size), (24.0, 15.0, 36.0, 20.0))


def test_pan_and_scan_crops_are_views(gemma):
    model, proc = gemma
    img = random_image(0, (90, 16))
    inputs = _inputs(proc, [img], do_pan_and_scan=True, pan_and_scan_min_crop_size=8)
    layout = build_layout(model.config, proc, inputs["input_ids"], inputs, [img])
    assert [v.name for v in layout.views] == ["image"] + [f"image crop {k}" for k in (1, 2, 3, 4)]
    assert layout.n_vision == 5 * 16 and inputs["pixel_values"].shape[0] == 5
    np.testing.assert_allclose([v.box[1] for v in layout.views[1:]], [0, 23 / 90, 46 / 90, 69 / 90])  # crops 23 px wide
    np.testing.assert_allclose(layout.views[4].box[3], 1.0)


def test_image_attention_is_bidirectional_in_the_captured_maps(gemma):
    model, proc = gemma
    res = generate(model, proc, [random_image(1, (48, 20))], Q, "tgv-kv", 1.0, options=RunOptions(max_new_tokens=1))
    maps = res.trace.attention_maps.astype(np.float32)  # (L, T, T)
    s, e = res.trace.layout.image_spans[0]
    for l in range(maps.shape[0]):
        block = maps[l, s:e, s:e]
        assert block[0, 1:].sum() > 0  # the first image token sees the later ones
        assert np.all(maps[l, s:e, e:] == 0)  # but no text after the image
        np.testing.assert_allclose(maps[l].sum(-1), 1.0, atol=2e-3)


@pytest.mark.parametrize("keep", [0.1, 0.3])
def test_only_full_attention_layers_are_evicted(gemma, keep):
    model, proc = gemma
    img = random_image(2, (48, 20))
    res = generate(model, proc, [img], Q, "tgv-kv", keep, options=RunOptions(max_new_tokens=1))
    tr = res.trace
    T, W = tr.seq_len, model.config.text_config.sliding_window
    layer_types = model.config.text_config.layer_types
    full = np.array([t == "full_attention" for t in layer_types])
    assert tr.selection_info["evictable_layers"].tolist() == full.tolist()
    assert np.all(tr.budgets[~full] == T) and np.all(tr.budgets[full] < T)
    assert tr.cache_len_final[~full].tolist() == [W - 1] * int((~full).sum())  # sliding layers hold their window
    assert tr.cache_len_final[full].tolist() == tr.budgets[full].tolist()
    # the budgets are those of the same policy on the full-attention layers' attention alone
    inputs = _inputs(proc, [img])
    with torch.inference_mode():
        model.set_attn_implementation({"text_config": "eager"})
        try:
            out = model(**inputs, output_attentions=True)
        finally:
            hf_compat.enable_capture(model)
    att = [a[0].mean(0) for a, f in zip(out.attentions, full) if f]
    spans = res.trace.layout.image_spans
    kept = tgvkv.select("tgv-kv", att, spans, keep)
    for j, l in enumerate(np.flatnonzero(full)):
        assert tr.kept_positions(int(l)).tolist() == kept[j].tolist()
    assert np.all(np.isnan(tr.selection_info["layer_ratio"][~full]))
