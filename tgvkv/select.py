"""Pure entry points: attention matrices + spans + keep ratio in, kept positions (or budgets) per layer out."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .layout import TokenLayout
from .policies import Policy, Selection, check_keep_ratio, make_policy
from .stats import as_numpy_attention, stats_from_attention


def run_selection(
    method: str | Policy,
    attentions: Sequence[Any],
    image_spans: Sequence[tuple[int, int]],
    keep_ratio: float,
    **options: Any,
) -> Selection:
    """Full `Selection` (kept, budgets, scores, info) from head-averaged [T, T] attention per language layer."""
    keep_ratio = check_keep_ratio(keep_ratio)
    policy = make_policy(method, **options)
    attn = as_numpy_attention(attentions)
    layout = TokenLayout.from_spans(attn.shape[-1], image_spans)
    stats = stats_from_attention(attn, policy.request(layout), layout.text_positions)
    return policy.select(stats, layout, keep_ratio)


def select(
    method: str | Policy,
    attentions: Sequence[Any],
    image_spans: Sequence[tuple[int, int]],
    keep_ratio: float,
    **options: Any,
) -> list[np.ndarray]:
    """Sorted kept token positions per layer.

    attentions[l]: head-averaged causal attention of language layer l over the prompt, shape [T, T], rows = queries
    (numpy or torch). image_spans: half-open (start, end) vision token ranges. keep_ratio: fraction of KV retained,
    0 < keep_ratio <= 1 (official PRUNE_RATIO = 1 - keep_ratio).
    """
    return run_selection(method, attentions, image_spans, keep_ratio, **options).kept


def layer_budgets(
    method: str | Policy,
    attentions: Sequence[Any],
    image_spans: Sequence[tuple[int, int]],
    keep_ratio: float,
    **options: Any,
) -> np.ndarray:
    """(L,) number of kept prompt tokens per layer, for the same inputs as `select`."""
    return run_selection(method, attentions, image_spans, keep_ratio, **options).budgets
