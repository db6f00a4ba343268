"""Policy registry. Add a policy: write a dataclass subclass of `Policy` in its own module and list it here."""
from __future__ import annotations

import dataclasses
from typing import Any

from .base import EVICTABLE_LAYERS, KINDS, DecodeRule, Kind, Policy, Selection, check_keep_ratio
from .baselines import Full, RandomEviction
from .h2o import H2O
from .prefixkv import PrefixKV
from .probes import TextOnly
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streamingllm import StreamingLLM
from .tgv_kv import ABLATION_ROWS, TGVAblation, TGVDetails, TGVKV

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
    if cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__}.kind must be one of {list(KINDS)}, got {cls.kind!r}")
    POLICIES[cls.name] = cls
    return cls


def method_kind(method: str) -> Kind | None:
    """The kind of a registered method, read from its class (nothing is built); None for a name the registry does not
    hold, e.g. a row of a results folder written by an older version or by a process that registered more methods."""
    cls = POLICIES.get(method)
    return None if cls is None else cls.kind


#: listing order by kind: TGV-KV, then the baselines with the probes, then TGV-KV's ablations
_KIND_RANK: dict[Kind, int] = {"tgv": 0, "baseline": 1, "probe": 1, "tgv-ablation": 2}


def method_sort_key(method: str) -> tuple[int, str]:
    """TGV-KV first, then baselines and probes, then TGV-KV's ablations, then names the registry does not hold
    (alphabetical within a group): the order of the app's method lists and the evaluator's tables and figures."""
    kind = method_kind(method)
    return (_KIND_RANK[kind] if kind is not None else len(set(_KIND_RANK.values())), method)


def make_policy(method: str | Policy, **options: Any) -> Policy:
    """Instantiate a registered policy by name; options are its dataclass fields (unknown ones are an error)."""
    if isinstance(method, Policy):
        if options:
            return dataclasses.replace(method, **options)
        return method
    if not isinstance(method, str) or method not in POLICIES:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[method]
    fields = set(cls.option_names())
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {unknown}; its options are {sorted(fields) or 'none'}")
    return cls(**options)


__all__ = ["POLICIES", "Policy", "Selection", "DecodeRule", "TGVDetails", "Kind", "KINDS", "EVICTABLE_LAYERS",
           "make_policy", "register", "check_keep_ratio", "method_kind", "method_sort_key"]
