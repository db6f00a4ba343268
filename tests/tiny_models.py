"""Tiny random-weight VLMs built from configs (no hub), with processors that load like hub ones."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "user:", "assistant:", "what", "is", "the", "colour", "of",
         "shape", "red", "blue", "a", "circle", "square", "?", ".", "and", "where", "left", "right", "top", "bottom"]
LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}user: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% else %}assistant: {% for c in m['content'] %}"
    "{{ c['text'] }}{% endfor %} </s> {% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def tiny_llava(seed: int = 0, image_size: int = 32, patch: int = 8, layers: int = 3, attn: str = "sdpa"):
    """(model, processor): CLIP 2 layers + Llama `layers` layers, GQA 4/2, 16 image tokens for 32 px."""
    from transformers import CLIPImageProcessor

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    n_img = (image_size // patch) ** 2
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      image_seq_length=n_img, vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    return model, proc


def save_tiny_llava(folder, seed: int = 1):
    """A tiny LLaVA (model + processor) saved as a local model folder, as the CLI and `load_model` read one; returns
    (model, processor)."""
    model, proc = tiny_llava(seed=seed)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return model, proc


def random_image(seed: int = 0, size: tuple[int, int] = (40, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@contextlib.contextmanager
def attn(model, name: str):
    """Temporarily switch the language model's attention implementation (e.g. "sdpa", "tgvkv", "tgvkv_eager")."""
    from tgvkv import capture

    capture.register()  # the capturing functions are registered on first use, not on import
    old = model.config.get_text_config(decoder=True)._attn_implementation
    model.set_attn_implementation({"text_config": name})
    try:
        yield
    finally:
        model.set_attn_implementation({"text_config": old})
