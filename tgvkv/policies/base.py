"""The policy interface shared by TGV-KV, its ablations and the baselines.

A policy is a small dataclass. At prefill it states which attention statistics it needs (`request`) and turns them
into a `Selection` (kept positions per layer) with no model in sight (`select`). Optionally it supplies a
`DecodeRule` that picks at most one cache slot to evict after each decode forward.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from ..layout import TokenLayout
from ..stats import PrefillStats, StatRequest

if TYPE_CHECKING:  # decode rules run on torch tensors; the policies themselves are numpy only
    import torch

#: what a policy is, for ordering and grouping in the app, the evaluator's tables and its figures:
#: "tgv" TGV-KV itself, "tgv-ablation" a configuration of TGV-KV with components changed (the paper's ablations),
#: "baseline" another eviction method, "probe" a cache edit that answers a question and is not an eviction method
Kind = Literal["tgv", "tgv-ablation", "baseline", "probe"]
KINDS: tuple[Kind, ...] = ("tgv", "tgv-ablation", "baseline", "probe")

#: `Selection.info` key of the (L,) bool mask of the layers the engine evicts, written by the engine (not by a policy)
#: when some layer keeps its own window (e.g. Gemma 3's sliding layers); read through `Trace.evictable_layers`
EVICTABLE_LAYERS = "evictable_layers"


def check_keep_ratio(keep_ratio: float) -> float:
    """Validate the fraction of KV *retained* (0 < keep_ratio <= 1). Official PRUNE_RATIO = 1 - keep_ratio."""
    try:
        k = float(keep_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}") from None
    if not (0.0 < k <= 1.0) or not np.isfinite(k):
        raise ValueError(f"keep_ratio must be in (0, 1] (fraction of the KV cache retained), got {keep_ratio!r}")
    return k


@dataclass
class Selection:
    """Result of prefill selection for L layers over a prompt of T tokens.

    kept:    list of L sorted, unique int64 arrays of kept prompt positions
    budgets: (L,) int64, len(kept[l]) == budgets[l]
    scores:  (L, T) float64 ranking scores the policy used (NaN where a position was not ranked)
    info:    method-specific per-layer arrays (e.g. TVB statistic, layer ratios, text weights), for the trace
    """

    kept: list[np.ndarray]
    budgets: np.ndarray
    scores: np.ndarray
    info: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kept = [np.asarray(k, dtype=np.int64) for k in self.kept]
        self.budgets = np.asarray(self.budgets, dtype=np.int64)
        for l, k in enumerate(self.kept):
            if len(k) != self.budgets[l]:
                raise AssertionError(f"layer {l}: {len(k)} kept positions but budget {self.budgets[l]}")

    def kept_mask(self, seq_len: int) -> np.ndarray:
        """(L, T) bool."""
        mask = np.zeros((len(self.kept), seq_len), dtype=bool)
        for l, k in enumerate(self.kept):
            mask[l, k] = True
        return mask


class DecodeRule(ABC):
    """Decode-time eviction: after each decode forward, optionally name one cache slot of a layer to drop.

    Called by the evicting cache once per layer and step with the new query's head-averaged attention over the
    layer's current slots (incl. the new token). Works on torch tensors on the model's device.
    """

    @abstractmethod
    def victim(self, layer: int, attn_row: torch.Tensor, cache_len: int, logical_len: int) -> torch.Tensor | None:
        """Slot index (0-d long tensor, on device) to evict from `layer`, or None.

        attn_row: (S,) float32 attention of the newest query over the S = cache_len slots of this layer.
        logical_len: tokens ever appended to this layer (prompt + decode tokens), the official N.
        """

    def evicted(self, layer: int, slot: torch.Tensor) -> None:  # noqa: B027 - optional hook for stateful rules
        """Told after the slot was removed, so stateful rules can drop their bookkeeping for it."""


@dataclass
class Policy(ABC):
    """Base of all policies. Subclasses are dataclasses whose fields are their hyper-parameters."""

    name: ClassVar[str] = ""
    kind: ClassVar[Kind] = "baseline"
    #: whether the policy also evicts during decoding by default (the `decode` option overrides where supported)
    decodes_by_default: ClassVar[bool] = False
    # a configurable skeleton whose named configurations are registered too (evaluations list those instead);
    # read from the class's own namespace, so subclasses (the named configurations) are not generic
    generic: ClassVar[bool] = False

    @abstractmethod
    def request(self, layout: TokenLayout) -> StatRequest:
        """Which prefill statistics `select` needs for this layout."""

    @abstractmethod
    def select(self, stats: PrefillStats, layout: TokenLayout, keep_ratio: float) -> Selection:
        """Kept positions per layer. Pure: no model, no global state."""

    def decode_rule(self, selection: Selection, layout: TokenLayout) -> DecodeRule | None:
        """The rule for decode-time eviction, or None for prefill-only policies."""
        return None

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The hyper-parameters a user may set (`make_policy`'s options) and `describe` reports: every dataclass field,
        unless a class names fewer (a configuration that fixes some fields)."""
        return tuple(f.name for f in fields(cls))

    def describe(self) -> dict[str, Any]:
        """Name and hyper-parameters, for run cards and traces."""
        values = asdict(self)
        return {"method": self.name, **{k: values[k] for k in self.option_names()}}
