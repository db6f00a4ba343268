"""Everything that touches transformers' model/processor conventions lives here (pinned: transformers 5.23).

Model facts are read from the config and processor, never from a table of known checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from . import capture


@dataclass(frozen=True)
class ModelFacts:
    model_type: str
    image_token_id: int
    video_token_id: int | None
    num_layers: int
    layer_types: tuple[str, ...] | None  # e.g. ("sliding_attention", "full_attention", ...) for Gemma 3

    @property
    def vision_token_ids(self) -> tuple[int, ...]:
        return (self.image_token_id,) if self.video_token_id is None else (self.image_token_id, self.video_token_id)


def model_facts(config: Any) -> ModelFacts:
    """Read the image token id(s) and language-layer count from a VLM config, or raise a ValueError naming the gap."""
    model_type = getattr(config, "model_type", type(config).__name__)
    image_id = getattr(config, "image_token_id", None)
    if image_id is None:
        image_id = getattr(config, "image_token_index", None)
    if image_id is None:
        raise ValueError(
            f"unsupported model: config of type {model_type!r} has no `image_token_id` (or `image_token_index`), "
            "so image tokens cannot be located in the prompt"
        )
    try:
        text_cfg = config.get_text_config(decoder=True)
    except AttributeError:
        text_cfg = None
    n_layers = getattr(text_cfg, "num_hidden_layers", None) if text_cfg is not None else None
    if text_cfg is None or text_cfg is config or n_layers is None:
        raise ValueError(
            f"unsupported model: config of type {model_type!r} has no separate text (language model) config with "
            "`num_hidden_layers`"
        )
    layer_types = getattr(text_cfg, "layer_types", None)
    _check_architecture(config, text_cfg, model_type, layer_types)
    return ModelFacts(
        model_type=model_type,
        image_token_id=int(image_id),
        video_token_id=getattr(config, "video_token_id", None),
        num_layers=int(n_layers),
        layer_types=tuple(layer_types) if layer_types else None,
    )


ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")  # KV-cached self-attention


def _check_architecture(config: Any, text_cfg: Any, model_type: str, layer_types) -> None:
    """Reject architectures whose image tokens do not live in the language model's self-attention KV cache."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"unsupported model: {model_type!r} is an encoder-decoder; the image is read through cross-attention from "
            "the encoder, not kept as tokens in the decoder's self-attention KV cache that TGV-KV evicts"
        )
    if getattr(text_cfg, "cross_attention_layers", None):
        raise ValueError(
            f"unsupported model: {model_type!r} feeds the image through cross-attention layers "
            f"{list(text_cfg.cross_attention_layers)}; its prompt holds a single image placeholder, so there are no "
            "per-patch vision tokens in the self-attention KV cache to evict"
        )
    if layer_types:
        other = sorted({t for t in layer_types if t not in ATTENTION_LAYER_TYPES})
        if other:
            raise ValueError(
                f"unsupported model: {model_type!r} has language layers of type {other}, which keep no per-token "
                f"key/value cache to evict (supported layer types: {list(ATTENTION_LAYER_TYPES)})"
            )
        if "full_attention" not in layer_types:
            raise ValueError(f"unsupported model: {model_type!r} has no full-attention language layer to evict")


def enable_capture(model: torch.nn.Module, eager_reference: bool = False) -> None:
    """Route the language model's attention through the capturing function for good (the vision tower is left alone).

    Not needed for `tgvkv.generate` / `compare` / `generate_batch`, which route the model only while they run
    (`tgvkv.capture.capturing`) and leave it as they found it. For code that drives forwards itself, or to pin the
    eager reference (`eager_reference=True`) across runs. Output is unchanged; statistics are recorded only inside
    `capture.recording`.
    """
    capture.register()
    capture.route(model, capture.EAGER_NAME if eager_reference else capture.SDPA_NAME)


def capture_enabled(model: torch.nn.Module) -> bool:
    return capture.language_attention(model) in capture.CAPTURE_NAMES


def language_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


# -- prompts ------------------------------------------------------------------------------------------------------
def _user_turn(question: str, n_images: int, n_videos: int = 0) -> dict[str, Any]:
    media = [{"type": "image"} for _ in range(n_images)] + [{"type": "video"} for _ in range(n_videos)]
    return {"role": "user", "content": media + [{"type": "text", "text": question}]}


def render_prompt(processor: Any, question: str, n_images: int, n_videos: int = 0) -> str:
    """The chat-template prompt for one user turn with `n_images` images (then `n_videos` videos) and the question."""
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("the processor has no chat template; cannot build a prompt for this model")
    if n_videos and getattr(processor, "video_processor", None) is None:
        raise ValueError(f"unsupported input: {type(processor).__name__} has no video processor, so it cannot take videos")
    return processor.apply_chat_template([_user_turn(question, n_images, n_videos)], add_generation_prompt=True, tokenize=False)


def followup_suffix(processor: Any, question: str, n_images: int, answer: str, followup: str, n_videos: int = 0) -> str:
    """Text that the chat template appends after turn 1's answer for a second user turn (no new image)."""
    turn1 = [_user_turn(question, n_images, n_videos), {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    before = processor.apply_chat_template(turn1, tokenize=False)
    after = processor.apply_chat_template(turn1 + [_user_turn(followup, 0)], add_generation_prompt=True, tokenize=False)
    if not after.startswith(before):
        raise ValueError("the chat template does not render a second turn as an extension of the first")
    return after[len(before) :]


def template_has_bos(processor: Any, prompt: str) -> bool:
    """True when the rendered prompt already starts with the tokenizer's BOS token."""
    bos = getattr(getattr(processor, "tokenizer", processor), "bos_token", None)
    return bool(bos) and prompt.startswith(bos)


def process_inputs(processor: Any, images: Sequence[Image.Image], prompt: str, device: torch.device, dtype: torch.dtype, videos=None):
    """Tokenise the prompt and preprocess the images; floating tensors are cast to the model dtype.

    A chat template that already writes the BOS token (Gemma 3) must not get a second one from the tokenizer.
    """
    kw = {"add_special_tokens": False} if template_has_bos(processor, prompt) else {}
    if videos:  # a list of (frames, H, W, 3) uint8 arrays or lists of PIL frames
        kw["videos"] = list(videos)
    inputs = processor(images=list(images) if images else None, text=prompt, return_tensors="pt", **kw)
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out
