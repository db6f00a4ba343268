"""Geometry at real checkpoint scale: default (hub-like) configs and image processors, no weights.

The resolvers are checked against the processors' own token expansion and the modeling code's
`pack_image_features` (which needs only the config) for awkward image sizes, where rounding in `unpad_image`
and the anyres_max_9 downsampling of LLaVA-OneVision actually happen.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
from test_geometry_llava_next import _check_against_pack
from tiny_families import family_tokenizer
from tiny_models import random_image
from transformers import LlavaNextConfig, LlavaOnevisionConfig

from tgvkv.generation import build_layout

SIZES = [(1000, 600), (500, 1400), (337, 336), (2000, 300), (640, 480)]  # (width, height)


def _model_like(config, model_cls):
    """An object with .config and .model.pack_image_features, enough for _check_against_pack (no weights)."""
    inner = SimpleNamespace(config=config)
    return SimpleNamespace(config=config, model=SimpleNamespace(pack_image_features=functools.partial(model_cls.pack_image_features, inner)))


@pytest.fixture(scope="module")
def llava_next():
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    tok = family_tokenizer(["<image>"])
    # CLIP 336/14, default pinpoints; preprocessing as llava-hf/llava-v1.6-*: 336 px base, 336 px tiles
    cfg = LlavaNextConfig(image_token_index=tok.convert_tokens_to_ids("<image>"))
    ip = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=cfg.image_grid_pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok,
                              patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return _model_like(cfg, LlavaNextModel), proc


@pytest.fixture(scope="module")
def onevision():
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    tok = family_tokenizer(["<image>", "<video>"])
    c = tok.convert_tokens_to_ids
    cfg = LlavaOnevisionConfig(image_token_index=c("<image>"), video_token_index=c("<video>"))  # SigLIP 384/14, anyres_max_9
    proc = LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessor(), tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(),
                                   num_image_tokens=729, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    return _model_like(cfg, LlavaOnevisionModel), proc


def _layout(model, proc, img):
    inputs = dict(proc(images=[img], text="user: <image> what ? assistant:", return_tensors="pt"))
    return build_layout(model.config, proc, inputs["input_ids"], inputs, [img]), inputs


@pytest.mark.parametrize("size", SIZES)
def test_llava_next_real_scale(llava_next, size):
    model, proc = llava_next
    layout, inputs = _layout(model, proc, random_image(0, size))
    base, tiles = layout.views
    assert (base.rows, base.cols) == (24, 24)
    assert layout.n_vision == 576 + tiles.rows * (tiles.cols + 1)
    _check_against_pack(model, layout, inputs)
    y0, x0, y1, x1 = tiles.box  # the mosaic covers the image up to a fraction of a feature cell
    assert max(-y0, -x0, y1 - 1, x1 - 1) < 1 / min(tiles.rows, tiles.cols)


@pytest.mark.parametrize("size", SIZES + [(1800, 1200)])  # the last one is shrunk by anyres_max_9
def test_onevision_real_scale(onevision, size):
    model, proc = onevision
    layout, inputs = _layout(model, proc, random_image(0, size))
    base, tiles = layout.views
    assert (base.rows, base.cols) == (27, 27)
    assert tiles.rows * tiles.cols <= 9 * 27 * 27 * 1.1**2  # anyres_max_9
    shrunk = size == (1800, 1200)
    if shrunk:  # 1536 x 2304 canvas: 108 x 162 mosaic, ratio sqrt(17496 / 6561) = 1.633 -> int(108 // r) x int(162 // r)
        assert (tiles.rows, tiles.cols) == (66, 99)
    _check_against_pack(model, layout, inputs, exact=not shrunk)


# -- Qwen-VL, Idefics3, Gemma 3 at their default (hub-like) preprocessing ------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("size", [(1000, 600), (500, 1400), (337, 336)])
def test_qwen_real_scale_matches_get_rope_index(family, size):
    import transformers as tr
    from tiny_families import QWEN_SPECIALS, _qwen_ids

    tok = family_tokenizer(QWEN_SPECIALS, bos=None, eos="<|im_end|>")
    cfg_cls, model_cls = {"qwen2_vl": (tr.Qwen2VLConfig, tr.Qwen2VLModel), "qwen2_5_vl": (tr.Qwen2_5_VLConfig, tr.Qwen2_5_VLModel)}[family]
    cfg = cfg_cls(**_qwen_ids(tok))  # patch 14, merge 2
    proc = tr.Qwen2VLProcessor(image_processor=tr.Qwen2VLImageProcessor(), tokenizer=tok, video_processor=tr.Qwen2VLVideoProcessor())
    img = random_image(0, size)
    inputs = dict(proc(images=[img], text="<|vision_start|><|image_pad|><|vision_end|> what ?", return_tensors="pt"))
    layout = build_layout(cfg, proc, inputs["input_ids"], inputs, [img])
    t, h, w = inputs["image_grid_thw"][0].tolist()
    (view,) = layout.views
    assert (view.rows, view.cols) == (h // 2, w // 2) and layout.n_vision == h * w // 4
    assert abs(view.cols / view.rows - size[0] / size[1]) < 0.1 * size[0] / size[1]  # aspect kept (dynamic resolution)
    get_vision_position_ids = functools.partial(model_cls.get_vision_position_ids, SimpleNamespace(config=cfg)) if hasattr(model_cls, "get_vision_position_ids") else None
    me = SimpleNamespace(config=cfg, get_vision_position_ids=get_vision_position_ids)
    pos, _ = model_cls.get_rope_index(me, inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                      image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    p, m = layout.token_map.positions, layout.token_map
    np.testing.assert_array_equal(pos[1, 0, p] - pos[1, 0, p].min(), m.row)
    np.testing.assert_array_equal(pos[2, 0, p] - pos[2, 0, p].min(), m.col)


@pytest.mark.parametrize("size", [(1000, 600), (500, 1400), (300, 200)])
def test_idefics3_real_scale(size):
    from tiny_families import IDEFICS_SPECIALS
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    tok = family_tokenizer(IDEFICS_SPECIALS)
    cfg = Idefics3Config(image_token_id=tok.convert_tokens_to_ids("<image>"), vision_config={"image_size": 364, "patch_size": 14})
    ip = Idefics3ImageProcessor()  # longest edge 4 * 364, sub-images of 364
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=169)
    img = random_image(0, size)
    inputs = dict(proc(images=[img], text="user: <image> what ?", return_tensors="pt"))
    layout = build_layout(cfg, proc, inputs["input_ids"], inputs, [img])
    _, rows, cols = ip.get_number_of_image_patches(size[1], size[0])
    tiles, glob = layout.views
    assert (tiles.rows, tiles.cols, glob.rows) == (13 * rows, 13 * cols, 13)
    assert layout.n_vision == 169 * (rows * cols + 1) == inputs["pixel_values"].shape[1] * 169


@pytest.mark.parametrize("size", [(1000, 600), (500, 1400)])
def test_gemma3_real_scale(size):
    from tiny_families import _gemma_tok
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor

    tok = _gemma_tok()
    c = tok.convert_tokens_to_ids
    cfg = Gemma3Config(boi_token_index=c("<start_of_image>"), eoi_token_index=c("<end_of_image>"), image_token_index=c("<image_soft_token>"))
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessor(), tokenizer=tok, image_seq_length=256)
    img = random_image(0, size)
    inputs = dict(proc(images=[img], text="<start_of_turn>user <start_of_image> what ?", return_tensors="pt"))
    layout = build_layout(cfg, proc, inputs["input_ids"], inputs, [img])
    (view,) = layout.views
    assert (view.rows, view.cols) == (16, 16) and layout.n_vision == 256
