"""Supported model families: a few real hub checkpoints per family, and what each family's layout looks like.

Families are keyed by the transformers `model_type` of the checkpoint's config (what `resolve_geometry` dispatches
on). The engine itself never looks at these tables: it reads everything from the config and processor
(tgvkv.hf_compat), so a checkpoint not listed here works if its architecture is supported. See docs/families.md.
"""
from __future__ import annotations

from typing import Any

from .geometry import GEOMETRY

# family (config.model_type) -> a few hub ids of that family, smallest first
HUB_MODELS: dict[str, list[str]] = {
    "llava": ["llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf"],
    "llava_next": ["llava-hf/llava-v1.6-mistral-7b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf"],
    "llava_onevision": ["llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava-hf/llava-onevision-qwen2-7b-ov-hf"],
    "qwen2_vl": ["Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"],
    "qwen2_5_vl": ["Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"],
    "qwen3_vl": ["Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"],
    "smolvlm": [
        "HuggingFaceTB/SmolVLM-256M-Instruct", "HuggingFaceTB/SmolVLM-500M-Instruct", "HuggingFaceTB/SmolVLM-Instruct",
    ],
    "idefics3": ["HuggingFaceM4/Idefics3-8B-Llama3"],
    "gemma3": ["google/gemma-3-4b-it", "google/gemma-3-12b-it"],
}

# family -> display name and what its vision tokens are (for the app's model picker and docs)
FAMILY_NOTES: dict[str, dict[str, Any]] = {
    "llava": {"name": "LLaVA-1.5", "video": False, "views": "one square grid per image"},
    "llava_next": {
        "name": "LLaVA-NeXT (1.6)", "video": False,
        "views": "base grid + unpadded anyres tile mosaic, a newline token per mosaic row",
    },
    "llava_onevision": {
        "name": "LLaVA-OneVision", "video": True,
        "views": "base grid + anyres_max_N mosaic with newlines; video: pooled grid per frame + one newline",
    },
    "qwen2_vl": {
        "name": "Qwen2-VL", "video": True,
        "views": "one merged-patch grid per image (dynamic resolution); video: one grid per 2 frames",
    },
    "qwen2_5_vl": {"name": "Qwen2.5-VL", "video": True, "views": "as Qwen2-VL"},
    "qwen3_vl": {
        "name": "Qwen3-VL", "video": True, "views": "as Qwen2-VL; video frame groups separated by timestamp text",
    },
    "smolvlm": {
        "name": "SmolVLM", "video": True,
        "views": "sub-image tile mosaic (row/col tags) + global image; video: one global grid per frame",
    },
    "idefics3": {"name": "Idefics3", "video": False, "views": "sub-image tile mosaic (row/col tags) + global image"},
    "gemma3": {
        "name": "Gemma 3", "video": False,
        "views": "one square soft-token grid per image (+ pan-and-scan crops); sliding-window layers never evicted",
    },
}


def family_of(config: Any) -> str | None:
    """The family key of a loaded model's config, or None when no geometry resolver is registered for it."""
    model_type = getattr(config, "model_type", None)
    return model_type if model_type in GEOMETRY else None


def supported_families() -> list[str]:
    """Families with a registered grid-geometry resolver (eviction itself needs only hf_compat.model_facts)."""
    return sorted(GEOMETRY)
