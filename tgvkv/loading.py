"""Load a VLM + processor by hub id or local folder, ready for the engine (capturing attention enabled)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import hf_compat
from .validation import check_model_config, check_model_files, check_model_name

REPO_ROOT = Path(__file__).resolve().parent.parent


def _assets_dir() -> Path:
    """The demo model and example inputs: `tgvkv/assets/` inside an installed package (pyproject.toml ships the
    repository's assets/ folder there), else `assets/` of the source checkout this package is imported from
    (running from the repository, or after `pip install -e .`)."""
    installed = Path(__file__).resolve().parent / "assets"
    return installed if installed.is_dir() else REPO_ROOT / "assets"


ASSETS_DIR = _assets_dir()
DEMO_MODEL_DIR = ASSETS_DIR / "demo-vlm"


@dataclass(frozen=True)
class LoadOptions:
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None: cuda if available else cpu
    dtype: str = "auto"  # "auto" (fp32 on CPU, bf16 on GPUs that support it, else fp16), "float32", "bfloat16", "float16"
    device_map: str | None = None  # "auto" for models larger than one GPU (accelerate)
    trust_remote_code: bool = False  # never enabled implicitly: only from an explicit command-line opt-in


DEVICE_HINT = "use cpu, cuda, cuda:N or mps"


def resolve_device(device: str | None) -> torch.device:
    """The torch device for `device` (None: CUDA when available, else CPU), or ValueError if torch cannot parse it
    or this machine does not have it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; {DEVICE_HINT}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA was requested but no GPU is available")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r} does not exist: this machine has {count} GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
        return dev
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else torch.backends.mps
    if backend is not None and hasattr(backend, "is_available"):
        if not backend.is_available():
            raise ValueError(f"device {device!r} is not available on this machine; {DEVICE_HINT}")
        return dev
    raise ValueError(f"device {device!r} cannot run models here; {DEVICE_HINT}")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return table[dtype]


def load_model(name_or_path: str | Path, options: LoadOptions = LoadOptions()) -> tuple[torch.nn.Module, Any]:
    """(model, processor) in eval mode with the capturing attention function enabled for the language model.

    Raises ValueError with a readable message for unknown ids, unreachable hubs and unsupported architectures.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    name = str(name_or_path)
    if not name.strip():
        raise ValueError("no model given")
    check_model_name(name)  # a local model folder or a well-formed hub id, before transformers guesses
    local = Path(name).expanduser() if Path(name).expanduser().is_dir() else None
    if local is not None:  # a readable config of an architecture transformers knows, before transformers reads it
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        check_model_config(local, CONFIG_MAPPING_NAMES, options.trust_remote_code,
                           f"transformers {transformers.__version__}")
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": options.trust_remote_code}
    if options.device_map:
        kwargs["device_map"] = options.device_map
    try:
        # no image token / text config: say so before transformers' list of AutoModel classes (and before the weights)
        hf_compat.model_facts(AutoConfig.from_pretrained(name, trust_remote_code=options.trust_remote_code))
        if local is not None:
            check_model_files(local)  # weights complete, tokenizer and image processor present: before reading them
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=options.trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    except OSError as e:
        where = "local folder" if Path(name).exists() else "model id"
        raise ValueError(
            f"could not load {where} {name!r}: {str(e).splitlines()[0]} "
            "(hub ids need network access; offline, use a local folder such as assets/demo-vlm)"
        ) from e
    hf_compat.model_facts(model.config)  # clear error for configs without an image token / text config
    if not options.device_map:
        model.to(device)
    model.eval()  # attention stays the model's own (SDPA): runs route it through capture only while they last
    return model, processor


def load_demo_model(options: LoadOptions = LoadOptions()) -> tuple[torch.nn.Module, Any]:
    if not (DEMO_MODEL_DIR / "config.json").exists():
        raise ValueError(f"the bundled demo model is missing at {DEMO_MODEL_DIR} (train it: python -m tgvkv.demo.train)")
    return load_model(DEMO_MODEL_DIR, options)
