"""TGV-KV Explorer: text-grounded KV-cache eviction for vision-language models, inspectable end to end.

`import tgvkv` is light: the selection rules (`select`, `POLICIES`, `TokenLayout`) load numpy only. The names that
run a model (`generate`, `compare`, `load_model`, ...) need torch and transformers and are imported on first use
(PEP 562), so `from tgvkv import generate` works as before while `import tgvkv.select` or `import analysis` leaves
torch unloaded.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .layout import TokenLayout
from .policies import POLICIES, Policy, Selection, make_policy
from .select import layer_budgets, run_selection, select

__version__ = "0.1.0"

#: name -> (module, attribute) of the exports that need torch / transformers, imported on first access
LAZY_EXPORTS: dict[str, tuple[str, str]] = {
    "generate": ("tgvkv.generation", "generate"),
    "compare": ("tgvkv.generation", "compare"),
    "Result": ("tgvkv.generation", "Result"),
    "Comparison": ("tgvkv.generation", "Comparison"),
    "RunOptions": ("tgvkv.options", "RunOptions"),
    "CaptureOptions": ("tgvkv.options", "CaptureOptions"),
    "capturing": ("tgvkv.capture", "capturing"),
    "load_model": ("tgvkv.loading", "load_model"),
    "load_demo_model": ("tgvkv.loading", "load_demo_model"),
    "LoadOptions": ("tgvkv.loading", "LoadOptions"),
    "load_image": ("tgvkv.images", "load_image_file"),
    "Trace": ("tgvkv.trace", "Trace"),
}

__all__ = ["select", "layer_budgets", "run_selection", "POLICIES", "Policy", "Selection", "make_policy", "TokenLayout",
           "generate", "compare", "Result", "Comparison", "RunOptions", "CaptureOptions", "capturing", "Trace",
           "load_model", "load_demo_model", "LoadOptions", "load_image"]


def __getattr__(name: str) -> Any:
    """Import a heavy export on first access and keep it as a module attribute (later lookups skip this)."""
    if name not in LAZY_EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = LAZY_EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(LAZY_EXPORTS))


if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from .capture import capturing
    from .generation import Comparison, Result, compare, generate
    from .options import CaptureOptions, RunOptions
    from .images import load_image_file as load_image
    from .loading import LoadOptions, load_demo_model, load_model
    from .trace import Trace
