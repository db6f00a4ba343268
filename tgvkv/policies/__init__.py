"""Policy registry. Add a policy: write a dataclass subclass of `Policy` in its own module and list it here."""
from __future__ import annotations

import dataclasses
from typing import Any

from .base import DecodeRule, Policy, Selection, check_keep_ratio
from .baselines import Full, RandomEviction
from .h2o import H2O
from .prefixkv import PrefixKV
from .probes import TextOnly
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streamingllm import StreamingLLM
from .tgv_ablation_rows import ABLATION_ROWS
from .tgv_ablations import TGVAblation
from .tgv_kv import TGVKV

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        TGVKV, Full, RandomEviction, StreamingLLM, H2O, SnapKV, PyramidKV, PrefixKV, TGVAblation, TextOnly,
        *ABLATION_ROWS
    )
}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator / function adding a policy to the registry under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    POLICIES[cls.name] = cls
    return cls


def make_policy(method: str | Policy, **options: Any) -> Policy:
    """Instantiate a registered policy by name; options are its dataclass fields (unknown ones are an error)."""
    if isinstance(method, Policy):
        if options:
            return dataclasses.replace(method, **options)
        return method
    if not isinstance(method, str) or method not in POLICIES:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {unknown}; its options are {sorted(fields) or 'none'}")
    return cls(**options)


__all__ = ["POLICIES", "Policy", "Selection", "DecodeRule", "make_policy", "register", "check_keep_ratio"]
