"""What a user types (questions, model names): checks shared by the engine, the CLI and the app.

Every check raises ``ValueError`` with a message meant for the person who typed the input; the app re-raises it as
``gr.Error``, the CLI prints it after ``error:``. The limits are module constants so docs and tests quote them.

Questions: empty or whitespace-only, longer than ``MAX_QUESTION_CHARS``, containing a control character (anything
in Unicode category Cc except tab, newline and carriage return, or a lone surrogate), or containing one of the
model's special tokens typed in as text (``<image>``, ``<|image_pad|>``, ``<start_of_image>``, ``</s>``...) are
*refused*, never silently rewritten: a typed-in image placeholder would make the processor expect an image that was
not given (or splice text into the vision span), and stripping characters would answer a different question than
the one shown in the run card. With a processor whose tokenizer has a closed word-level vocabulary (the bundled demo
model), words outside it are refused with the list of words it knows (``tgvkv.vocabulary``).
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any

from .vocabulary import check_known_words

MAX_QUESTION_CHARS = 2000
ALLOWED_CONTROL = frozenset("\t\n\r")
#: hub ids: "name" or "owner/name", the characters the hub accepts
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


def reserved_tokens(processor: Any) -> tuple[str, ...]:
    """Strings the tokenizer would turn into special tokens: the processor's image/video placeholders and the
    tokenizer's special tokens, read from the objects (no table of known models), longest first."""
    found: set[str] = set()
    tokenizer = getattr(processor, "tokenizer", processor)
    for obj in (processor, tokenizer):
        if obj is None:
            continue
        for key, value in vars(obj).items():
            if key.endswith("_token") and isinstance(value, str) and value.strip():
                found.add(value)  # image_token, video_token, boi_token, image_start_token, ...
    specials = getattr(tokenizer, "all_special_tokens", None) or []
    found.update(t for t in specials if isinstance(t, str) and t.strip())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found.update(str(t.content) for t in decoder.values() if getattr(t, "special", False) and str(t.content).strip())
    return tuple(sorted(found, key=lambda s: (-len(s), s)))


def validate_question(text: Any, processor: Any = None, *, max_chars: int = MAX_QUESTION_CHARS,
                      what: str = "question") -> str:
    """Return `text` unchanged if it is a usable question, else raise ValueError saying what to fix.

    processor: when given, typed-in special tokens of this model are refused (see module docstring).
    what: the name used in messages ("question", "follow-up question").
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        raise ValueError(f"the {what} is empty")
    if not isinstance(text, str):
        raise ValueError(f"the {what} must be text, got {type(text).__name__}")
    if len(text) > max_chars:
        raise ValueError(f"the {what} is too long ({len(text):,} characters; the limit is {max_chars:,})")
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if cat == "Cc" and ch not in ALLOWED_CONTROL:
            raise ValueError(
                f"the {what} contains a control character (U+{ord(ch):04X} at position {i}); remove it and try again"
            )
        if cat == "Cs":  # only reachable from JSON "\ud800" escapes: not encodable, the tokenizer would fail
            raise ValueError(
                f"the {what} contains an invalid character (lone surrogate U+{ord(ch):04X} at position {i}); "
                "remove it and try again"
            )
    if processor is not None:
        for token in reserved_tokens(processor):
            if token in text:
                raise ValueError(
                    f"the {what} contains {token!r}, a special token of this model; remove it "
                    "(images are attached separately, not typed in)"
                )
        check_known_words(text, processor, what)  # closed-vocabulary (demo) models: name the words they do not know
    return text


def check_model_name(name: str) -> str:
    """For `loading.load_model` (operator side: CLI, evaluator): a local model folder or a well-formed hub id."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"could not load local folder {name!r}: it is not a model folder (no config.json inside)")
        return name
    if name.startswith(("/", ".", "~")) or "\\" in name or ".." in name or name.count("/") > 1:
        raise ValueError(f"could not load local folder {name!r}: no such folder")
    if not HUB_ID.match(name):
        raise ValueError(
            f"could not load {name!r}: it is neither a local model folder nor a hub id of the form owner/name "
            "(letters, digits, '-', '_' and '.')"
        )
    return name

