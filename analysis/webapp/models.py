"""Which models a visitor may load, and the one shared, cached, lock-guarded copy of the loaded model.

Visitors choose the bundled demo model, a hub id from a short list, or (only when the operator starts the app with
``--allow-local-models``) a local folder. A name that is an existing path on disk is never read unless local models
are allowed, so a visitor cannot make the server open arbitrary files. ``trust_remote_code`` comes only from the
operator's command line.

Module state: one ``lru_cache(maxsize=1)`` of the loaded model (keyed by name, device, dtype, remote-code flag) and
the lock that serialises loading. Each loaded model carries its own lock, held while a request runs on it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from tgvkv.loading import DEMO_MODEL_DIR, LoadOptions, load_model, resolve_device

log = logging.getLogger(__name__)

DEMO = "demo"  # dropdown value of the bundled model
DEMO_LABEL = "Bundled demo VLM (synthetic scenes, CPU-friendly)"
#: hub models offered in the dropdown; they load only where the hub is reachable (and the hardware is big enough)
HUB_MODELS: tuple[str, ...] = (
    "llava-hf/llava-interleave-qwen-0.5b-hf",
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    "llava-hf/llava-1.5-7b-hf",
    "llava-hf/llava-v1.6-mistral-7b-hf",
    "Qwen/Qwen2.5-VL-3B-Instruct",
)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


@dataclass(frozen=True)
class ModelPolicy:
    """What the operator allows (from the command line); visitors cannot change it."""

    default_model: str = DEMO
    allow_local: bool = False
    trust_remote_code: bool = False
    device: str | None = None  # None: CUDA when available, else CPU
    dtype: str = "auto"  # "auto": fp32 on CPU; on CUDA the checkpoint's half precision (bf16 if supported, else fp16)


@dataclass
class LoadedModel:
    name: str  # what the visitor chose (shown in run cards)
    source: str  # resolved folder or hub id
    model: torch.nn.Module
    processor: Any
    device: str
    dtype: str
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def choices() -> list[tuple[str, str]]:
    """(label, value) pairs for the model dropdown."""
    return [(DEMO_LABEL, DEMO)] + [(f"{m} (hub; needs network)", m) for m in HUB_MODELS]


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_source(name: str, policy: ModelPolicy) -> str:
    """The folder or hub id to load for a dropdown value / typed name, or ValueError saying why not.

    The demo label and the operator's ``--model`` are always allowed. Anything that exists on disk is allowed only
    with ``--allow-local-models``; everything else must look like a hub id (``owner/name``).
    """
    name = (name or "").strip()
    if not name:
        raise ValueError("no model chosen")
    if name in (DEMO, DEMO_LABEL):
        return str(DEMO_MODEL_DIR)
    if name == policy.default_model:  # chosen by the operator on the command line
        return name
    looks_like_path = name.startswith(("/", ".", "~")) or "\\" in name or ".." in name
    if looks_like_path or Path(name).exists():
        if not policy.allow_local:
            raise ValueError(
                f"local model folders are disabled on this server ({name!r}); the operator can enable them with "
                "`python app.py --allow-local-models`. Choose the bundled demo model or a hub id such as "
                f"{HUB_MODELS[0]!r}."
            )
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"{name!r} is not a model folder (no config.json inside)")
        return str(path.resolve())
    if not HUB_ID.match(name):
        raise ValueError(f"{name!r} is neither the demo model nor a hub id of the form owner/name")
    return name


def pick_dtype(source: str, device: torch.device, requested: str) -> str:
    """float32 on CPU; on CUDA the checkpoint's own half precision (bf16 only where supported), fp32 checkpoints of
    small models (the demo) stay fp32. An explicit request wins."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "float32"
    saved = _config_dtype(source)
    try:
        bf16 = torch.cuda.is_bf16_supported()
    except (RuntimeError, AssertionError):  # ZeroGPU's main process has no CUDA context yet: its GPUs all do bf16
        bf16 = True
    if saved == "float32" and Path(source).is_dir():
        return "float32"  # tiny local checkpoints (the demo VLM) are trained in fp32: keep them exact
    if saved == "float16" or not bf16:
        return "float16"
    return "bfloat16"


def _config_dtype(source: str) -> str | None:
    cfg = Path(source) / "config.json"
    if not cfg.is_file():
        return None
    try:
        doc = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc.get("dtype") or doc.get("torch_dtype")


_LOAD_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _load_cached(source: str, device: str, dtype: str,
                 trust_remote_code: bool) -> tuple[torch.nn.Module, Any, threading.Lock]:
    model, processor = load_model(source, LoadOptions(device=device, dtype=dtype, trust_remote_code=trust_remote_code))
    return model, processor, threading.Lock()


def get_model(name: str, policy: ModelPolicy) -> LoadedModel:
    """The shared model for `name` (loaded once; a different model replaces it). Raises ValueError with a message
    a visitor can act on."""
    source = resolve_source(name, policy)
    if source == str(DEMO_MODEL_DIR) and not (DEMO_MODEL_DIR / "config.json").is_file():
        raise ValueError(f"the bundled demo model is missing at {DEMO_MODEL_DIR} (train it: python -m tgvkv.demo.train)")
    is_hub = not Path(source).is_dir()
    if is_hub and not _in_hub_cache(source) and (hub_offline() or not hub_reachable()):
        why = "offline mode" if hub_offline() else "no connection to huggingface.co"
        raise ValueError(
            f"{source!r} is not available: this server cannot reach the Hugging Face Hub ({why}) and the model "
            "is not in its local cache. Use the bundled demo model" + (" or a local folder." if policy.allow_local else ".")
        )
    device = resolve_device(policy.device)
    dtype = pick_dtype(source, device, policy.dtype)
    with _LOAD_LOCK:
        log.info("loading model %s on %s (%s)", source, device, dtype)
        try:
            model, processor, lock = _load_cached(source, str(device), dtype, policy.trust_remote_code)
        except (OSError, ImportError, RuntimeError) as e:  # network errors, missing weights, out of memory
            raise ValueError(f"could not load {source!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return LoadedModel(name=name, source=source, model=model, processor=processor, device=str(device), dtype=dtype,
                       lock=lock)


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether huggingface.co answers on port 443 (probed at most once a minute)."""
    return _probe_hub(int(time.time() // 60), timeout_s)


@lru_cache(maxsize=1)
def _probe_hub(minute: int, timeout_s: float) -> bool:
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host.split(":")[0], 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except (ImportError, ValueError):
        return False


def clear_cache() -> None:
    """Drop the cached model (tests, or to free memory)."""
    with _LOAD_LOCK:
        _load_cached.cache_clear()
