"""Tiny random-weight VLMs of several families, built from configs offline, with processors that load like hub ones.

Every builder returns (model, processor). The processor is saved with `save_pretrained` into a temporary folder and
loaded back with `AutoProcessor.from_pretrained`, exactly as a hub checkpoint's processor is. Sizes are tiny
(hidden 32-64, 2-3 language layers, images of a few dozen pixels) so each forward takes milliseconds on one CPU thread.
"""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoProcessor, PreTrainedTokenizerFast

from tiny_models import LLAVA_TEMPLATE, WORDS

EXTRA_WORDS = ["describe", "image", "this", "frame", "video", "compare", "images", "first", "second", "system:",
               "you", "are", "helpful", "green", "yellow", "black", "white", "how", "many", "objects", "there"]


def family_tokenizer(specials: list[str], bos: str | None = "<s>", eos: str = "</s>", pad: str = "<pad>",
                     extra_vocab: list[str] = (), named: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over WORDS + EXTRA_WORDS + `specials` (special tokens are matched inside words too).

    named: model-specific special tokens exposed as attributes (e.g. Gemma 3's boi_token / boi_token_id)."""
    words = list(dict.fromkeys([*WORDS, *EXTRA_WORDS, *extra_vocab, *[s for s in (bos, eos, pad) if s]]))
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = {"eos_token": eos, "unk_token": "<unk>", "pad_token": pad}
    if bos:
        kw["bos_token"] = bos
    if named:
        kw["model_specific_special_tokens"] = dict(named)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    fast.add_special_tokens({"additional_special_tokens": list(specials)}, replace_extra_special_tokens=not named)
    return fast


def reload_processor(processor):
    """save_pretrained + AutoProcessor.from_pretrained, as for a hub checkpoint."""
    with tempfile.TemporaryDirectory() as d:
        processor.save_pretrained(d)
        return AutoProcessor.from_pretrained(d)


def _finish(model, tok, attn: str):
    model = model.eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


def _llama(tok, layers: int, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)


def _qwen2(tok, layers: int, **kw):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)


# -- LLaVA-NeXT (anyres: base view + unpadded tile mosaic with a newline per row) ----------------------------------
def tiny_llava_next(seed: int = 0, layers: int = 3, attn: str = "sdpa", image_size: int = 32, patch: int = 8,
                    pinpoints=((32, 64), (64, 32), (64, 64))):
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor

    torch.manual_seed(seed)
    tok = family_tokenizer(["<image>"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch)
    pins = [list(p) for p in pinpoints]
    cfg = LlavaNextConfig(vision_config=vision, text_config=_llama(tok, layers), image_token_index=tok.convert_tokens_to_ids("<image>"),
                          image_grid_pinpoints=pins, vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = _finish(LlavaNextForConditionalGeneration(cfg), tok, attn)
    ip = LlavaNextImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                 image_grid_pinpoints=pins)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    return model, reload_processor(proc)


# -- LLaVA-OneVision (SigLIP, anyres_max_N, video frames pooled 2x2 + one newline) -----------------------------------
ONEVISION_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}user: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<image> {% elif c['type'] == 'video' %}<video> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% else %}assistant: "
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %} </s> {% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_onevision(seed: int = 0, layers: int = 3, attn: str = "sdpa", image_size: int = 32, patch: int = 8,
                   pinpoints=((32, 32), (32, 64), (64, 32), (64, 64)), vision_aspect_ratio: str = "anyres_max_9"):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,
                              LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, SiglipVisionConfig)

    torch.manual_seed(seed)
    tok = family_tokenizer(["<image>", "<video>"])
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=patch, vision_use_head=False)
    pins = [list(p) for p in pinpoints]
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=_qwen2(tok, layers),
                               image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
                               image_grid_pinpoints=pins, vision_feature_select_strategy="full", vision_feature_layer=-1,
                               vision_aspect_ratio=vision_aspect_ratio)
    model = _finish(LlavaOnevisionForConditionalGeneration(cfg), tok, attn)
    ip = LlavaOnevisionImageProcessor(size={"height": image_size, "width": image_size}, image_grid_pinpoints=pins)
    vp = LlavaOnevisionVideoProcessor(size={"height": image_size, "width": image_size})
    n_tok = (image_size // patch) ** 2
    proc = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, num_image_tokens=n_tok,
                                   vision_feature_select_strategy="full", vision_aspect_ratio=vision_aspect_ratio,
                                   chat_template=ONEVISION_TEMPLATE)
    return model, reload_processor(proc)


# -- Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dynamic resolution, 2x2 merged patches, 3-D M-RoPE) --------------------------
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|> {% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
)


def _qwen_tok():
    return family_tokenizer(QWEN_SPECIALS, bos=None, eos="<|im_end|>", extra_vocab=["user:", "assistant:"])


def _qwen_ids(tok) -> dict:
    c = tok.convert_tokens_to_ids
    return dict(image_token_id=c("<|image_pad|>"), video_token_id=c("<|video_pad|>"),
                vision_start_token_id=c("<|vision_start|>"), vision_end_token_id=c("<|vision_end|>"))


def _qwen_text(tok, layers: int, mrope=(2, 3, 3), **kw) -> dict:
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                "mrope_section": list(mrope)}, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, **kw)


def _qwen_processors(patch: int, merge: int, temporal: int, image_cls, video_cls, min_pixels: int, max_pixels: int):
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    ip = image_cls(size=size, patch_size=patch, merge_size=merge, temporal_patch_size=temporal)
    vp = video_cls(size=size, patch_size=patch, merge_size=merge, temporal_patch_size=temporal)
    return ip, vp


def tiny_qwen2_vl(seed: int = 0, layers: int = 3, attn: str = "sdpa", patch: int = 4, merge: int = 2):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    torch.manual_seed(seed)
    tok = _qwen_tok()
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=patch, spatial_merge_size=merge,
                  temporal_patch_size=2)
    cfg = Qwen2VLConfig(vision_config=vision, text_config=_qwen_text(tok, layers), **_qwen_ids(tok))
    model = _finish(Qwen2VLForConditionalGeneration(cfg), tok, attn)
    ip, vp = _qwen_processors(patch, merge, 2, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, 8 * 8, 64 * 64)
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN_TEMPLATE)
    return model, reload_processor(proc)


def tiny_qwen2_5_vl(seed: int = 0, layers: int = 3, attn: str = "sdpa", patch: int = 4, merge: int = 2):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLImageProcessor,
                              Qwen2VLVideoProcessor)

    torch.manual_seed(seed)
    tok = _qwen_tok()
    vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=patch,
                  spatial_merge_size=merge, temporal_patch_size=2, window_size=patch * merge * 2, fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=_qwen_text(tok, layers), **_qwen_ids(tok))
    model = _finish(Qwen2_5_VLForConditionalGeneration(cfg), tok, attn)
    ip, vp = _qwen_processors(patch, merge, 2, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, 8 * 8, 64 * 64)
    proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN_TEMPLATE)
    return model, reload_processor(proc)


# -- Idefics3 / SmolVLM (image splitting: sub-image tiles with <row_i_col_j> tags + a global image) -----------------
IDEFICS_SPECIALS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", "<video>"] + [
    f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
IDEFICS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'video' %}<video>{% else %} {{ c['text'] }} {% endif %}{% endfor %}<end_of_utterance> {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _idefics_parts(tok, layers: int, image_size: int, patch: int, scale: int, vision_cls):
    vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=image_size, patch_size=patch)
    return vision, _llama(tok, layers)


def tiny_idefics3(seed: int = 0, layers: int = 3, attn: str = "sdpa", image_size: int = 16, patch: int = 4, scale: int = 2,
                  longest_edge: int = 32):
    """Sub-images of 16 px (4x4 patches, pixel shuffle 2 -> 2x2 = 4 tokens); images resized to a 32 px longest edge."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor, Idefics3VisionConfig

    torch.manual_seed(seed)
    tok = family_tokenizer(IDEFICS_SPECIALS, extra_vocab=["user:", "assistant:"])
    vision, text = _idefics_parts(tok, layers, image_size, patch, scale, Idefics3VisionConfig)
    cfg = Idefics3Config(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale)
    model = _finish(Idefics3ForConditionalGeneration(cfg), tok, attn)
    ip = Idefics3ImageProcessor(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": image_size})
    seq = (image_size // patch) ** 2 // scale**2
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq, chat_template=IDEFICS_TEMPLATE)
    return model, reload_processor(proc)


def tiny_smolvlm(seed: int = 0, layers: int = 3, attn: str = "sdpa", image_size: int = 16, patch: int = 4, scale: int = 2,
                 longest_edge: int = 32):
    """SmolVLM: the Idefics3 layout; its processor needs the `num2words` package (as the hub one does)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    torch.manual_seed(seed)
    tok = family_tokenizer(IDEFICS_SPECIALS, extra_vocab=["user:", "assistant:"])
    vision, text = _idefics_parts(tok, layers, image_size, patch, scale, SmolVLMVisionConfig)
    cfg = SmolVLMConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale)
    model = _finish(SmolVLMForConditionalGeneration(cfg), tok, attn)
    ip = SmolVLMImageProcessor(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": image_size})
    vp = SmolVLMVideoProcessor(size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size})
    seq = (image_size // patch) ** 2 // scale**2
    proc = SmolVLMProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_len=seq, chat_template=IDEFICS_TEMPLATE)
    return model, reload_processor(proc)


# -- Gemma 3 (SigLIP + avg-pooled soft tokens, bidirectional image attention, sliding-window layers) -----------------
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }} "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn>model {% endif %}"
)


def _gemma_tok():
    from tokenizers import processors

    specials = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    fast = family_tokenizer(specials, bos="<bos>", eos="<eos>", extra_vocab=["user", "model"], named=named)
    bos = fast.convert_tokens_to_ids("<bos>")
    # like Gemma's tokenizer: BOS is added to every encoded text (the chat template writes one too)
    fast._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    return fast


def tiny_gemma3(seed: int = 0, layers: int = 4, attn: str = "sdpa", image_size: int = 32, patch: int = 4, tokens_per_side: int = 4,
                sliding_window: int = 8):
    """SigLIP 8x8 patches avg-pooled to 4x4 = 16 soft tokens; language layers alternate sliding / full attention."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(seed)
    tok = _gemma_tok()
    c = tok.convert_tokens_to_ids
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=patch, vision_use_head=False)
    text = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=sliding_window,
                            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                            bos_token_id=c("<bos>"), eos_token_id=c("<eos>"), pad_token_id=c("<pad>"))
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_side**2, boi_token_index=c("<start_of_image>"),
                       eoi_token_index=c("<end_of_image>"), image_token_index=c("<image_soft_token>"))
    model = _finish(Gemma3ForConditionalGeneration(cfg), tok, attn)
    ip = Gemma3ImageProcessor(size={"height": image_size, "width": image_size})
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=GEMMA_TEMPLATE, image_seq_length=tokens_per_side**2)
    return model, reload_processor(proc)


def tiny_qwen3_vl(seed: int = 0, layers: int = 3, attn: str = "sdpa", patch: int = 4, merge: int = 2):
    """Qwen3-VL: interleaved M-RoPE, deepstack visual features added to the first language layers."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor

    torch.manual_seed(seed)
    tok = _qwen_tok()
    vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=patch,
                  spatial_merge_size=merge, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    text = _qwen_text(tok, layers, head_dim=16)
    text["rope_parameters"]["mrope_interleaved"] = True
    cfg = Qwen3VLConfig(vision_config=vision, text_config=text, **_qwen_ids(tok))
    model = _finish(Qwen3VLForConditionalGeneration(cfg), tok, attn)
    ip, vp = _qwen_processors(patch, merge, 2, Qwen2VLImageProcessor, Qwen3VLVideoProcessor, 8 * 8, 64 * 64)
    proc = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN_TEMPLATE)
    return model, reload_processor(proc)
