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

import json
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Collection

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



# -- output files (CLI: --trace, --full-trace, --json) ---------------------------------------------------------------
def check_output_path(path: str | Path, suffixes: Collection[str], what: str) -> Path:
    """A file that can be written after a long run: known suffix, not a folder, its folder exists and takes a new
    file (probed by creating and deleting a temporary file). `what` names the option in messages."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{what} {str(path)!r}: the file name must end in {' or '.join(sorted(suffixes))}")
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder; give a file name")
    folder = path.parent
    if not folder.exists():
        raise ValueError(f"{what} {str(path)!r}: the folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{what} {str(path)!r}: {str(folder)!r} is not a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {str(path)!r}: the file exists and is not writable")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tgvkv-write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r}: cannot write into {str(folder)!r} ({e.strerror or e})") from None
    return path


# -- local model folders (loading.load_model) --------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def check_model_config(folder: str | Path, known_model_types: Collection[str], trust_remote_code: bool = False,
                       library: str = "transformers") -> None:
    """Refuse a local model folder whose config.json is unreadable or names an unknown architecture (the message
    names the folder and the problem); see `check_model_files` for the rest of the folder."""
    folder = Path(folder)
    refuse = _refuser(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise refuse(f"config.json is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise refuse("config.json does not hold a JSON object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise refuse("config.json names no model_type, so the architecture is unknown")
    if model_type not in known_model_types and not (trust_remote_code and config.get("auto_map")):
        hint = ("the folder ships its own code: pass --trust-remote-code if you trust it" if config.get("auto_map")
                else "a newer transformers may know it")
        raise refuse(f"unknown architecture: model_type {model_type!r} is not known to this {library} ({hint})")


def check_model_files(folder: str | Path) -> None:
    """Refuse a local model folder that cannot load, before any weights are read: weights missing or truncated
    (safetensors headers and sizes, every shard of an index), no tokenizer, no image processor configuration."""
    folder = Path(folder)
    refuse = _refuser(folder)
    _check_weights(folder, refuse)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise refuse(f"no tokenizer inside (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer files from "
                     "the original model")
    if not any((folder / f).is_file() for f in PROCESSOR_FILES):
        raise refuse(f"no image processor configuration inside ({' or '.join(PROCESSOR_FILES)})")


def _refuser(folder: Path) -> Any:
    return lambda problem: ValueError(f"could not load local folder {str(folder)!r}: {problem}")


def _check_weights(folder: Path, refuse: Any) -> None:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise refuse(f"{index_name} is not a readable weight index ({e})") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise refuse(f"{len(missing)} of {len(shards)} weight files listed in {index_name} are missing "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
            for shard in shards:
                if shard.endswith(".safetensors"):
                    check_safetensors_file(folder / shard, refuse)
            return
    single = [folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()]
    if not single:
        raise refuse("no weights inside (model.safetensors, pytorch_model.bin or a sharded index)")
    if single[0].suffix == ".safetensors":
        check_safetensors_file(single[0], refuse)


def check_safetensors_file(path: Path, refuse: Any = ValueError) -> None:
    """The header parses and the file holds every byte its tensors need (a cut-off download is refused)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise refuse(f"{path.name} is truncated or not a safetensors file (header of {max(n, 0):,} bytes, "
                             f"file of {size:,} bytes)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise refuse(f"{path.name} has an unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise refuse(f"{path.name} has an unreadable safetensors header (not a JSON object)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise refuse(f"{path.name} has an unreadable safetensors header (entries without data_offsets)") from None
    expected = 8 + n + end
    if size < expected:
        raise refuse(f"{path.name} is truncated ({size:,} of {expected:,} bytes; the download or copy is incomplete)")
