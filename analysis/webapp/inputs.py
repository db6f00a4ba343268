"""What a visitor may send, and the checks that turn it into run settings (ValueError with a plain reason otherwise).

The same checks serve the UI, the named API endpoints and scripts; the limits are the app's, not the library's.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image

from tgvkv import POLICIES
from tgvkv.images import MAX_SIDE, load_image_file, normalise_image
from tgvkv.policies import method_sort_key
from tgvkv.validation import validate_question

KEEP_PERCENT_RANGE = (5.0, 100.0)
MAX_NEW_TOKENS_UI = 64
MAX_QUESTION_CHARS = 400
DEFAULT_KEEP_PERCENT = 10
DEFAULT_MAX_NEW_TOKENS = 32


def check_image(image: Any) -> Image.Image:
    """RGB PIL image from a PIL image or an uploaded file path (Gradio's upload cache); ValueError otherwise.

    Alpha/palette/CMYK/16-bit images are converted to RGB; the longer side is downscaled to MAX_SIDE px; anything
    above MAX_PIXELS is refused.
    """
    if image is None:
        raise ValueError("please upload an image (or click one of the examples)")
    if isinstance(image, Image.Image):
        return normalise_image(image)
    if isinstance(image, (str, Path)):
        return load_image_file(image)
    raise ValueError(f"expected an image, got {type(image).__name__}")


def check_question(question: Any, processor: Any | None = None) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("please type a question about the image")
    if len(question) > MAX_QUESTION_CHARS:  # the length as typed, before runs of whitespace are collapsed
        raise ValueError(f"the question is too long ({len(question):,} characters; the limit is {MAX_QUESTION_CHARS})")
    q = " ".join(question.split())
    if processor is not None:
        token = getattr(processor, "image_token", None) or "<image>"
        specials = {token, getattr(processor, "video_token", None) or token}
        for s in specials:
            if s and s in q:
                raise ValueError(f"the question must not contain the image placeholder {s!r}; the image is added for you")
    return validate_question(q, processor, max_chars=MAX_QUESTION_CHARS)  # control characters, other special tokens


def check_keep_percent(keep_percent: Any) -> float:
    """Keep ratio in (0, 1] from a percentage in [5, 100]."""
    try:
        k = float(keep_percent)
    except (TypeError, ValueError):
        raise ValueError(f"the keep ratio must be a number of percent, got {keep_percent!r}") from None
    lo, hi = KEEP_PERCENT_RANGE
    if not (math.isfinite(k) and lo <= k <= hi):
        raise ValueError(f"the keep ratio must be between {lo:.0f}% and {hi:.0f}%, got {keep_percent!r}")
    return k / 100.0


def check_max_new_tokens(n: Any) -> int:
    try:
        f = float(n)
    except (TypeError, ValueError):
        raise ValueError(f"max new tokens must be a whole number, got {n!r}") from None
    if not (math.isfinite(f) and f == int(f) and 1 <= f <= MAX_NEW_TOKENS_UI):
        raise ValueError(f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS_UI}, got {n!r}")
    return int(f)


def check_method(method: Any) -> str:
    if not isinstance(method, str) or method not in POLICIES:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(POLICIES))}")
    return method


def check_layer(layer: Any, num_layers: int) -> int:
    try:
        f = float(layer)
    except (TypeError, ValueError):
        raise ValueError(f"layer must be a whole number, got {layer!r}") from None
    if not (math.isfinite(f) and f == int(f) and 0 <= f < num_layers):
        raise ValueError(f"layer must be between 0 and {num_layers - 1}, got {layer!r}")
    return int(f)


def method_choices() -> list[tuple[str, str]]:
    """(label, name) for every registered policy, read at call time: TGV-KV first, then baselines, then ablations."""
    labels = {"tgv": "{} (the paper's method)", "baseline": "{} (baseline)", "probe": "{} (probe)",
              "tgv-ablation": "{} (ablation)"}
    return [(labels[POLICIES[n].kind].format("TGV-KV" if n == "tgv-kv" else n), n)
            for n in sorted(POLICIES, key=method_sort_key)]


def is_layer(layer: Any, num_layers: int) -> bool:
    """Whether `layer` names a layer of a `num_layers`-layer model (what `check_layer` accepts)."""
    try:
        check_layer(layer, num_layers)
    except ValueError:
        return False
    return True


__all__ = ["check_image", "check_question", "check_keep_percent", "check_max_new_tokens", "check_method",
           "check_layer", "is_layer", "method_choices", "KEEP_PERCENT_RANGE", "MAX_NEW_TOKENS_UI", "MAX_QUESTION_CHARS",
           "DEFAULT_KEEP_PERCENT", "DEFAULT_MAX_NEW_TOKENS", "MAX_SIDE"]
