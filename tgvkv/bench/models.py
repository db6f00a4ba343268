"""Models the benchmarks run on, all built offline (no hub): the bundled demo VLM, a synthetic LLaVA whose prompt
length is set by its image size, and a 7B-shaped LLaVA-NeXT (Vicuna-7B + CLIP-L/336) for the GPU run.

Weights are random unless the trained demo model is present: timings and cache sizes do not depend on the values.
The tokenizer is the demo's word-level one (questions must use its vocabulary); model vocabularies are padded to a
realistic size so the LM head's bytes are realistic.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from PIL import Image

from .prefill import LMShape

# words of the demo vocabulary only (the demo tokenizer refuses others: tgvkv.vocabulary)
QUESTIONS = ["what color is the circle ?", "where is the red square ?", "how many objects are there ?",
             "what shape is at the top left ?", "describe the image .", "is there a blue triangle ?",
             "what is the color at the center ?", "where is the green circle ?"]


def demo_model(dtype=torch.float32, device="cpu"):
    """(model, processor, name): the trained demo VLM from assets/demo-vlm if present, else the same config, random."""
    from ..demo import build

    from ..loading import DEMO_MODEL_DIR

    path = str(DEMO_MODEL_DIR)
    if os.path.exists(os.path.join(path, "config.json")):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            proc = AutoProcessor.from_pretrained(path)
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
            model.generation_config.eos_token_id = None  # time exactly the asked number of tokens
            return model, proc, "demo-vlm (trained, assets/demo-vlm)"
        except (OSError, ValueError) as e:  # folder still being written: same architecture, random weights
            import logging

            logging.getLogger(__name__).warning("assets/demo-vlm not loadable (%s); using random weights", e)
    tok = build.build_tokenizer()
    model = build.build_model(tok).to(dtype).to(device).eval()
    _no_eos(model, tok)
    return model, build.build_processor(), "demo-vlm (random weights)"


@dataclass(frozen=True)
class SynthSpec:
    """A LLaVA-1.5-style model: small CLIP tower, `grid` x `grid` image tokens, Llama LM of shape `lm`."""

    lm: LMShape = LMShape(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1408, vocab=32064)
    grid: int = 44  # 44 x 44 = 1936 image tokens: ~2k-token prompts
    patch: int = 4
    vision_hidden: int = 64


def synth_llava(spec: SynthSpec = SynthSpec(), dtype=torch.float32, device="cpu", seed: int = 0):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from ..demo import build

    tok = build.build_tokenizer()
    size = spec.grid * spec.patch
    vision = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
                              num_hidden_layers=1, num_attention_heads=2, image_size=size, patch_size=spec.patch)
    text = spec.lm.config(max_positions=8192)
    text.pad_token_id, text.eos_token_id = tok.pad_token_id, tok.eos_token_id
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(build.IMAGE_TOKEN),
                      image_seq_length=spec.grid**2, vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    _no_eos(model, tok)
    ip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=spec.patch, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=build.CHAT_TEMPLATE, image_token=build.IMAGE_TOKEN)
    name = f"synth-llava d{spec.lm.hidden} L{spec.lm.layers} H{spec.lm.heads}/{spec.lm.kv_heads} {spec.grid**2} img tok"
    return model, proc, name


def llava_next_7b(dtype=torch.float16, device="cuda", layers: int = 32, vision_layers: int = 24, seed: int = 0,
                  tiny: bool = False):
    """LLaVA-NeXT-7B shape (Vicuna-7B: d 4096, 32 layers, MHA 32 heads, vocab 32064; CLIP-L/336), random weights.

    A 672 x 672 image gives 576 base + 2304 tile + 48 newline = 2928 image tokens. `layers`/`vision_layers` shrink it
    for a CPU dry run of the GPU script; `tiny` also shrinks the widths (same token counts).
    """
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    from ..demo import build

    tok = build.build_tokenizer()
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    vh, d, inter, heads = (64, 256, 512, 4) if tiny else (1024, 4096, 11008, 32)
    vision = CLIPVisionConfig(hidden_size=vh, intermediate_size=4 * vh, num_hidden_layers=vision_layers,
                              num_attention_heads=vh // 64, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(build.IMAGE_TOKEN),
                          image_grid_pinpoints=pins, vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaNextForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    _no_eos(model, tok)
    ip = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 image_grid_pinpoints=pins)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=build.CHAT_TEMPLATE, image_token=build.IMAGE_TOKEN)
    return model, proc, f"llava-next-7b-shaped ({layers} LM layers, random weights, {str(dtype).replace('torch.', '')})"


def _no_eos(model, tok) -> None:
    """Random weights: never stop early, so every run generates exactly the asked number of tokens."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id


def images(n: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]
