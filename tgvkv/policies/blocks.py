"""Building blocks shared by TGV-KV, its ablations and the baselines: budgeting, ranking, retention.

Every function is pure numpy. Shapes: L layers, T prompt tokens, Q captured text queries, V vision tokens.
"""
from __future__ import annotations

import numpy as np

from ..layout import TokenLayout
from ..stats import PrefillStats

#: official TGV-KV constants (kv_caches/tgv_kv.py): attention sinks, protected last prompt token, text offset
OFFICIAL_SINKS = 4
OFFICIAL_TEXT_OFFSET = 100.0


# -- statistics ------------------------------------------------------------------------------------------------
def text_to_vision(stats: PrefillStats, layout: TokenLayout) -> np.ndarray:
    """(L, Q, V) attention of each text query over each vision key (the official TI block)."""
    rows = stats.rows_for(layout.text_query_positions).astype(np.float64)  # (L, Q, T)
    return rows[:, :, layout.vision_positions]


def text_to_text(stats: PrefillStats, layout: TokenLayout) -> np.ndarray:
    """(L, Q, Q) attention among text queries (the official TT block)."""
    q = layout.text_query_positions
    rows = stats.rows_for(q).astype(np.float64)
    return rows[:, :, q]


def text_weights(stats: PrefillStats, layout: TokenLayout) -> np.ndarray:
    """(L, Q) TWR importance of each text query: mean attention it receives from the text queries that see it.

    Official: w_k = sum_q TT[q, k] / (Lt - k), the divisor being the number of text queries at or after k.
    """
    tt = text_to_text(stats, layout)  # (L, Q, Q)
    Q = tt.shape[1]
    seen_by = Q - np.arange(Q)  # queries q >= k
    return tt.sum(axis=1) / seen_by[None, :]


def tvb_statistic(stats: PrefillStats, layout: TokenLayout) -> np.ndarray:
    """(L,) total text->vision attention per layer: s_l = sum(TI)."""
    return text_to_vision(stats, layout).sum(axis=(1, 2))


# -- budgeting -------------------------------------------------------------------------------------------------
def official_layer_ratios(layer_mass: np.ndarray, keep_ratio: float) -> np.ndarray:
    """(L,) official forget fractions ratio_l = 1 - L * keep_ratio * r_l with r_l = s_l / sum(s). May be negative.

    Computed in float64, returned as float32: the official code stores its ratios as float32 (`.float().numpy()`),
    and both the prefill forget counts and the decode rule read that float32 value."""
    L = len(layer_mass)
    total = float(layer_mass.sum())
    if not np.isfinite(total) or total <= 0:
        raise ValueError("text->vision attention is zero in every layer: TVB budgets are undefined")
    r = layer_mass / total
    return (1.0 - L * keep_ratio * r).astype(np.float32)


def uniform_layer_ratios(num_layers: int, keep_ratio: float) -> np.ndarray:
    """(L,) float32 ratio_l = 1 - keep_ratio in every layer (the official PRUNE_RATIO), stored as the official does."""
    return np.full(num_layers, 1.0 - keep_ratio, dtype=np.float32)


def official_forget_counts(ratios: np.ndarray, seq_len: int) -> np.ndarray:
    """(L,) forget_l = max(0, round_half_even(ratio_l * T)) (numpy rounds half to even, like torch.round).

    As the official `(ratios * seq_lens).round()`: a float32 ratio times the int64 length, multiplied in float64."""
    return np.maximum(0, np.round(np.asarray(ratios).astype(np.float64) * seq_len)).astype(np.int64)


def uniform_forget_counts(num_layers: int, seq_len: int, keep_ratio: float) -> np.ndarray:
    """(L,) the same official forget count in every layer (ratio_l = 1 - keep_ratio)."""
    return official_forget_counts(uniform_layer_ratios(num_layers, keep_ratio), seq_len)


def nothing_to_prune(seq_len: int, keep_ratio: float) -> bool:
    """Official guard `int(T - T * (1 - PRUNE_RATIO)) <= 0` (Python floats), PRUNE_RATIO = 1 - keep_ratio."""
    prune = 1.0 - keep_ratio
    return int(seq_len - seq_len * (1.0 - prune)) <= 0


def official_decode_forget(cache_len: int, logical_len: int, ratio: float) -> int:
    """Decode forget count max(0, trunc(S - N * (1 - ratio))) with the official code's number types.

    Official: `(seq_lens - num_of_token * (1 - self.ratios)).astype(np.int32)`, ratios a float32 array, N a Python
    int. So `1 - ratio` and `N * (1 - ratio)` are float32 (a Python int does not widen a float32 array), and the
    subtraction from the int64 lengths is float64. In float64 throughout, a whole-number N * (1 - ratio) (one
    evictable layer or uniform ratios at keep 0.1 / 0.05) can come out just above the whole number and evict one
    token more than the official code: e.g. S = 12, N = 110, ratio 0.9 gives 1.0000000000000018 in float64 but
    0.99999714 with the float32 ratio (0.9 stored as 0.89999998)."""
    kept_share = np.float32(logical_len) * (np.float32(1.0) - np.float32(ratio))  # float32 arithmetic
    return max(0, int(np.float64(cache_len) - np.float64(kept_share)))


# -- retention -------------------------------------------------------------------------------------------------
def official_window(seq_len: int, sinks: int = OFFICIAL_SINKS) -> np.ndarray:
    """Evictable positions of the official rule: sinks .. T-2 (the first `sinks` and the last token are kept)."""
    return np.arange(sinks, max(sinks, seq_len - 1), dtype=np.int64)


def evict_lowest(scores: np.ndarray, window: np.ndarray, n_forget: int, seq_len: int) -> np.ndarray:
    """Kept positions after evicting the `n_forget` lowest-scored window positions (ties: lower position first).

    Positions outside the window are always kept. n_forget is clipped to the window size.
    """
    n_forget = int(min(max(n_forget, 0), len(window)))
    order = np.argsort(scores[window], kind="stable")  # ascending, stable => lower position evicted first on ties
    evicted = window[order[:n_forget]]
    keep = np.ones(seq_len, dtype=bool)
    keep[evicted] = False
    return np.flatnonzero(keep).astype(np.int64)


def evict_per_layer(scores: np.ndarray, forget: np.ndarray, sinks: int = OFFICIAL_SINKS) -> list[np.ndarray]:
    """Kept positions of every layer under the official skeleton (TGV-KV's, which it takes from PrefixKV): the first
    `sinks` and the last position are always kept, the forget[l] lowest-scored positions in between are evicted."""
    seq_len = scores.shape[1]
    window = official_window(seq_len, sinks)
    return [evict_lowest(scores[l], window, int(forget[l]), seq_len) for l in range(len(forget))]


def text_priority_scores(
    vision_scores: np.ndarray, text_scores: np.ndarray, layout: TokenLayout, offset: float = OFFICIAL_TEXT_OFFSET
) -> np.ndarray:
    """(L, T) TPR: text positions get `text_score + offset`, vision positions their own score.

    The official offset (100) ranks text above vision only while vision scores stay below 100 + text score; use
    `strict_text_offset` for a guarantee.
    """
    L = vision_scores.shape[0]
    out = np.empty((L, layout.seq_len), dtype=np.float64)
    out[:, layout.vision_positions] = vision_scores
    out[:, layout.text_positions] = text_scores + offset
    return out


def strict_text_offset(vision_scores: np.ndarray, text_scores: np.ndarray) -> float:
    """Smallest round offset that puts every text score above every vision score (strict text-first retention)."""
    if vision_scores.size == 0 or text_scores.size == 0:
        return 0.0
    gap = float(np.max(vision_scores) - np.min(text_scores))
    return max(0.0, gap) + 1.0


def protected_suffix(kept: list[np.ndarray], start: int) -> np.ndarray:
    """(L,) official P_l: number of kept positions >= start (the text after the image), at least 1."""
    return np.array([max(1, int(np.count_nonzero(k >= start))) for k in kept], dtype=np.int64)


# -- generic helpers for baselines and ablations (validation, budgets, pooling, top-k) ---------------------------
def check_int(name: str, value: object, minimum: int) -> int:
    """Validate an integer hyper-parameter >= minimum (bools rejected). Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(name: str, value: object, minimum: float) -> float:
    """Validate a finite real hyper-parameter >= minimum (bools and strings rejected). Raises ValueError."""
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not real or not np.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Validate a string option against its allowed values. Raises ValueError."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return str(value)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def uniform_budget(seq_len: int, keep_ratio: float) -> int:
    """Kept tokens per layer for baselines: round_half_even(keep_ratio * T), clipped to [1, T]."""
    return int(min(seq_len, max(1, np.round(keep_ratio * seq_len))))


def pyramid_budgets(num_layers: int, budget: int, window: int, seq_len: int, beta: int) -> np.ndarray:
    """(L,) PyramidKV budgets (Cai et al. 2024): per layer `window` recent tokens + an arithmetic prefix budget.

    The prefix part B = budget - window decreases linearly from the bottom layer (k_0) to the top (k_{L-1}):
    k_{L-1} = B / beta, k_0 = 2B - k_{L-1} (capped at T - window, then k_{L-1} = 2B - k_0),
    k_l = k_0 - l (k_0 - k_{L-1}) / (L - 1). Exact rational arithmetic; integers by floor plus largest remainders
    (ties: lower layer first), so sum(budgets) == L * budget exactly and window <= budgets[l] <= T.
    """
    from fractions import Fraction

    if not 1 <= window <= budget <= seq_len:
        raise ValueError(f"need 1 <= window ({window}) <= budget ({budget}) <= T ({seq_len})")
    if num_layers == 1:
        return np.array([budget], dtype=np.int64)
    B, cap = budget - window, seq_len - window
    k_min = Fraction(B, beta)
    k_max = 2 * B - k_min
    if k_max > cap:
        k_max = Fraction(cap)
        k_min = 2 * B - k_max
    step = (k_max - k_min) / (num_layers - 1)
    exact = [k_max - l * step for l in range(num_layers)]
    floors = [int(x) for x in exact]  # x >= 0, so int() is floor
    rest = num_layers * B - sum(floors)
    order = sorted(range(num_layers), key=lambda l: (-(exact[l] - floors[l]), l))
    for l in order[:rest]:
        floors[l] += 1
    return window + np.array(floors, dtype=np.int64)


def pool1d(scores: np.ndarray, kernel_size: int, pooling: str) -> np.ndarray:
    """(L, N) stride-1 pooling along the last axis with kernel_size // 2 padding on each side (SnapKV).

    "avg": zero padding counted in the mean (torch avg_pool1d default); "max": padding never wins.
    """
    if kernel_size == 1 or scores.shape[-1] == 0:
        return scores.astype(np.float64)
    pad = kernel_size // 2
    fill = 0.0 if pooling == "avg" else -np.inf
    padded = np.pad(scores.astype(np.float64), [(0, 0)] * (scores.ndim - 1) + [(pad, pad)], constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(padded, kernel_size, axis=-1)  # (L, N, k)
    return win.mean(axis=-1) if pooling == "avg" else win.max(axis=-1)


def keep_top(scores: np.ndarray, candidates: np.ndarray, n_keep: int, always: np.ndarray) -> np.ndarray:
    """Sorted kept positions: `always` plus the n_keep highest-scored candidates (ties: the later position kept,
    i.e. the same order as `evict_lowest`)."""
    n_keep = int(min(max(n_keep, 0), len(candidates)))
    order = np.argsort(scores[candidates], kind="stable")  # ascending; ties lower position first
    chosen = candidates[order[len(candidates) - n_keep :]]
    return np.union1d(always, chosen).astype(np.int64)


def modality_first_scores(
    vision_scores: np.ndarray, text_scores: np.ndarray, layout: TokenLayout, evict_first: str
) -> np.ndarray:
    """(L, T) scores under which every window position of the `evict_first` modality ("vision" or "text") ranks
    below every position of the other one; within a modality the raw scores decide (strict retention order)."""
    if evict_first == "vision":
        return text_priority_scores(vision_scores, text_scores, layout, strict_text_offset(vision_scores, text_scores))
    L = vision_scores.shape[0]
    offset = strict_text_offset(text_scores, vision_scores)  # lift vision above every text score
    out = np.empty((L, layout.seq_len), dtype=np.float64)
    out[:, layout.vision_positions] = vision_scores + offset
    out[:, layout.text_positions] = text_scores
    return out
