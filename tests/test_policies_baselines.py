"""Baselines (full, random, StreamingLLM, H2O, SnapKV, PyramidKV, PrefixKV) and the registry: hand-computed cases,
decode rules on hand-made rows, validation messages, and validity of every registered method under random inputs.

Hand matrices are written in units of 1/8 (or 1/16) so every sum is exact in floating point.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tgvkv
from tgvkv.policies import POLICIES, make_policy
from tgvkv.policies import blocks
from tgvkv.policies.decode_rules import AccumulatedRule, PooledRowRule, RandomRule, RecencyRule

FAST = settings(max_examples=60, deadline=None)


def causal(rows: list[list[float]], unit: float, T: int | None = None) -> np.ndarray:
    """[T, T] matrix from ragged lower-triangular rows (row q has q + 1 entries), scaled by `unit`."""
    T = T or len(rows)
    A = np.zeros((T, T))
    for q, r in enumerate(rows):
        A[q, : len(r)] = r
    return A * unit


def sink_rows(T: int) -> np.ndarray:
    """Every query puts all its attention on position 0 (row-stochastic, causal)."""
    A = np.zeros((T, T))
    A[:, 0] = 1.0
    return A


def random_attention(rng: np.random.Generator, L: int, T: int) -> np.ndarray:
    """(L, T, T) random causal row-stochastic matrices."""
    A = np.tril(rng.random((L, T, T)) ** 3 + 1e-6)
    return A / A.sum(axis=-1, keepdims=True)


# -- full --------------------------------------------------------------------------------------------------------
def test_full_keeps_everything_whatever_the_ratio():
    A = [sink_rows(6)] * 2
    sel = tgvkv.run_selection("full", A, [(1, 4)], 0.1)
    assert sel.budgets.tolist() == [6, 6]
    assert [k.tolist() for k in sel.kept] == [[0, 1, 2, 3, 4, 5]] * 2
    assert make_policy("full").decode_rule(sel, tgvkv.TokenLayout.from_spans(6, [(1, 4)])) is None


def test_full_rejects_decode():
    with pytest.raises(ValueError, match="full never evicts"):
        make_policy("full", decode=True)


# -- random ------------------------------------------------------------------------------------------------------
def test_random_budget_and_determinism():
    A = [sink_rows(10)] * 3
    a = tgvkv.run_selection("random", A, [(2, 7)], 0.25, seed=3)  # round_half_even(2.5) = 2
    b = tgvkv.run_selection("random", A, [(2, 7)], 0.25, seed=3)
    assert a.budgets.tolist() == [2, 2, 2]
    assert [k.tolist() for k in a.kept] == [k.tolist() for k in b.kept]
    # the documented draw: numpy default_rng(seed).choice(T, K, replace=False), layer 0 first
    rng = np.random.default_rng(3)
    assert [k.tolist() for k in a.kept] == [sorted(rng.choice(10, 2, replace=False).tolist()) for _ in range(3)]
    others = {tuple(np.concatenate(tgvkv.select("random", A, [(2, 7)], 0.5, seed=s)).tolist()) for s in range(8)}
    assert len(others) > 1  # the seed matters


def test_random_decode_rule_is_seeded():
    r1, r2 = RandomRule(np.array([3]), seed=5), RandomRule(np.array([3]), seed=5)
    row = torch.full((4,), 0.25)
    v1, v2 = r1.victim(0, row, 4, 12), r2.victim(0, row, 4, 12)
    assert v1 is not None and int(v1) == int(v2) and 0 <= int(v1) < 3  # never the newest slot
    assert r1.victim(0, torch.full((3,), 1 / 3), 3, 12) is None  # not over budget
    assert make_policy("random").decode_rule(tgvkv.run_selection("random", [sink_rows(4)], [], 0.5), None) is None


# -- StreamingLLM ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "T, keep, sinks, expected",
    [
        (10, 0.6, 4, [0, 1, 2, 3, 8, 9]),  # K = 6: 4 sinks + 2 recent
        (10, 0.25, 4, [0, 9]),  # K = round_half_even(2.5) = 2: s = min(4, K - 1) = 1
        (14, 0.25, 4, [0, 1, 2, 13]),  # K = round_half_even(3.5) = 4: s = 3
        (10, 0.05, 4, [9]),  # K = max(1, round(0.5)) = 1: the last token only
        (10, 0.5, 0, [5, 6, 7, 8, 9]),  # no sinks: pure recency
        (8, 1.0, 4, list(range(8))),
    ],
)
def test_streamingllm_hand_cases(T, keep, sinks, expected):
    sel = tgvkv.run_selection("streamingllm", [sink_rows(T)] * 2, [(1, 3)], keep, sinks=sinks)
    assert [k.tolist() for k in sel.kept] == [expected, expected]
    assert sel.budgets.tolist() == [len(expected)] * 2


def test_streamingllm_decode_evicts_oldest_non_sink():
    layout = tgvkv.TokenLayout.from_spans(10, [(1, 3)])
    pol = make_policy("streamingllm")
    sel = tgvkv.run_selection(pol, [sink_rows(10)], [(1, 3)], 0.6)  # K = 6, kept 0-3, 8, 9
    rule = pol.decode_rule(sel, layout)
    assert isinstance(rule, RecencyRule)
    row = torch.tensor([0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1])  # 7 slots after the first decode token
    assert rule.victim(0, row[:6] / row[:6].sum(), 6, 10) is None  # at budget: nothing
    v = rule.victim(0, row, 7, 11)
    assert v.dtype == torch.long and v.dim() == 0 and int(v) == 4  # slot 4 = position 8, the oldest non-sink
    assert make_policy("streamingllm", decode=False).decode_rule(sel, layout) is None


# -- H2O ---------------------------------------------------------------------------------------------------------
# rows in eighths; column sums (x 1/8): c = [16, 11, 20, 11, 1, 2, 2, 1]
H2O_ROWS = [[8], [4, 4], [2, 4, 2], [1, 1, 5, 1], [1, 1, 4, 1, 1], [0, 1, 4, 2, 0, 1], [0, 0, 3, 3, 0, 1, 1],
            [0, 0, 2, 4, 0, 0, 1, 1]]


@pytest.mark.parametrize(
    "keep, recent_fraction, expected",
    [
        (0.5, 0.5, [0, 2, 6, 7]),  # K = 4, r = 2 recent {6, 7}; heavy: c2 = 20, c0 = 16
        (0.75, 0.5, [0, 2, 3, 5, 6, 7]),  # K = 6, r = 3 {5, 6, 7}; heavy 2, 0 and the tie c1 = c3 = 11 -> later (3)
        (0.5, 0.0, [0, 1, 2, 3]),  # no recent window: top-4 column sums 20, 16, 11, 11
        (0.5, 1.0, [4, 5, 6, 7]),  # only recent
        (0.625, 0.5, [0, 2, 3, 6, 7]),  # K = 5, r = floor(2.5) = 2 {6, 7}; heavy 2, 0, tie 1/3 -> 3
    ],
)
def test_h2o_hand_cases(keep, recent_fraction, expected):
    A = causal(H2O_ROWS, 1 / 8)
    sel = tgvkv.run_selection("h2o", [A], [(2, 5)], keep, recent_fraction=recent_fraction)
    np.testing.assert_array_equal(sel.scores[0], np.array([16, 11, 20, 11, 1, 2, 2, 1]) / 8)
    assert sel.kept[0].tolist() == expected
    assert sel.budgets.tolist() == [len(expected)]


def test_h2o_decode_accumulates_and_protects_recent():
    rule = AccumulatedRule(np.array([3]), initial=[np.array([1.0, 0.2, 0.5], dtype=np.float32)], recent=np.array([1]))
    # step 1: acc = [1, .2, .5, 0] + [0, .1, 0, .9] = [1, .3, .5, .9]; 4 > 3 slots; argmin over slots 0..2 -> 1
    v = rule.victim(0, torch.tensor([0.0, 0.1, 0.0, 0.9]), 4, 4)
    assert int(v) == 1
    rule.evicted(0, v)  # acc = [1, .5, .9]
    # step 2: acc = [1, .5, .9, 0] + [.1, .1, .1, .7] = [1.1, .6, 1.0, .7] -> slot 1 (0.6)
    v = rule.victim(0, torch.tensor([0.1, 0.1, 0.1, 0.7]), 4, 5)
    assert int(v) == 1
    rule.evicted(0, v)  # acc = [1.1, 1.0, .7]
    # step 3: acc = [1.1, 1.6, .7, .4]; the newest slot (.4) is protected -> slot 2 (.7)
    v = rule.victim(0, torch.tensor([0.0, 0.6, 0.0, 0.4]), 4, 6)
    assert int(v) == 2
    rule.evicted(0, v)
    torch.testing.assert_close(rule._acc[0], torch.tensor([1.1, 1.6, 0.4]))
    # under budget: accumulates, evicts nothing
    assert rule.victim(0, torch.tensor([0.5, 0.5, 0.0]), 3, 7) is None
    torch.testing.assert_close(rule._acc[0], torch.tensor([1.6, 2.1, 0.4]))


def test_h2o_decode_rule_starts_from_prefill_column_sums():
    A = causal(H2O_ROWS, 1 / 8)
    pol = make_policy("h2o")
    sel = tgvkv.run_selection(pol, [A], [(2, 5)], 0.5)  # kept [0, 2, 6, 7], c = [16, 20, 2, 1] / 8
    rule = pol.decode_rule(sel, tgvkv.TokenLayout.from_spans(8, [(2, 5)]))
    # first decode token: acc = [2, 2.5, .25, .125, 0] + row; recent r = 2 protects slots 3, 4
    v = rule.victim(0, torch.tensor([0.0, 0.0, 0.5, 0.0, 0.5]), 5, 9)
    assert int(v) == 2  # 0.75 < 2, 2.5


# -- SnapKV ------------------------------------------------------------------------------------------------------
def snap_matrix() -> np.ndarray:
    """T = 10; only rows 8 and 9 (the window) matter. Window sums over keys 0..7 (x 1/16): [2, 1, 5, 0, 0, 11, 2, 3]."""
    A = sink_rows(10)
    A[8, :9] = np.array([1, 0, 3, 0, 0, 6, 2, 0, 4]) / 16
    A[9, :10] = np.array([1, 1, 2, 0, 0, 5, 0, 3, 0, 4]) / 16
    return A


@pytest.mark.parametrize(
    "keep, options, expected",
    [
        # K = 5, window {8, 9}, 3 best raw sums: 11 (5), 5 (2), 3 (7)
        (0.5, dict(window_size=2, kernel_size=1), [2, 5, 7, 8, 9]),
        # avg pool k=3 (zero padding, /3): [3, 8, 6, 5, 11, 13, 16, 5] / 3 -> 6, 5, 4
        (0.5, dict(window_size=2, kernel_size=3), [4, 5, 6, 8, 9]),
        # max pool k=3: [2, 5, 5, 5, 11, 11, 11, 3]; K = 6 -> 4, 5, 6 and the tie at 5 (1, 2, 3) -> later (3)
        (0.6, dict(window_size=2, kernel_size=3, pooling="max"), [3, 4, 5, 6, 8, 9]),
        # K = 2 < window 4: the window shrinks to the budget, the last 2 positions
        (0.2, dict(window_size=4), [8, 9]),
    ],
)
def test_snapkv_hand_cases(keep, options, expected):
    sel = tgvkv.run_selection("snapkv", [snap_matrix()], [(2, 6)], keep, **options)
    assert sel.kept[0].tolist() == expected
    assert sel.budgets.tolist() == [len(expected)]


def test_snapkv_scores_are_pooled_window_sums():
    sel = tgvkv.run_selection("snapkv", [snap_matrix()], [(2, 6)], 0.5, window_size=2, kernel_size=5)
    s = np.array([2, 1, 5, 0, 0, 11, 2, 3]) / 16
    padded = np.pad(s, 2)
    expected = np.array([padded[j : j + 5].mean() for j in range(8)])  # torch avg_pool1d, count_include_pad
    np.testing.assert_allclose(sel.scores[0, :8], expected)
    assert np.isnan(sel.scores[0, 8:]).all()


def test_snapkv_is_prefill_only_by_default_and_decode_extension():
    layout = tgvkv.TokenLayout.from_spans(10, [(2, 6)])
    sel = tgvkv.run_selection("snapkv", [snap_matrix()], [(2, 6)], 0.5, window_size=2, kernel_size=1)
    assert make_policy("snapkv").decode_rule(sel, layout) is None
    rule = make_policy("snapkv", window_size=2, kernel_size=1, decode=True).decode_rule(sel, layout)
    assert isinstance(rule, PooledRowRule)
    row = torch.tensor([0.3, 0.05, 0.2, 0.1, 0.01, 0.34])  # 6 slots > budget 5; the last 2 are the window
    assert int(rule.victim(0, row, 6, 11)) == 1
    pooled = PooledRowRule(np.array([5]), window=2, kernel_size=3, pooling="avg")
    # avg3 over slots 0..3 of [.3, .05, .2, .1]: [.35, .55, .35, .3] / 3 -> slot 3
    assert int(pooled.victim(0, row, 6, 11)) == 3


# -- PyramidKV ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "L, T, keep, window, expected",
    [
        # K = 10, w = 4, B = 6: k_top = 6/20 = .3, k_0 = 11.7, step 3.8 -> [11.7, 7.9, 4.1, .3];
        # floors [11, 7, 4, 0] (22 of 24), remainders .7, .9 win -> [12, 8, 4, 0] + w
        (4, 20, 0.5, 4, [16, 12, 8, 4]),
        # L = 3: [11.7, 6.0, .3] -> floors [11, 6, 0], 1 left -> layer 0 (.7) -> [12, 6, 0] + 4
        (3, 20, 0.5, 4, [16, 10, 4]),
        # K = 8, w = 2, B = 6: k_0 = 11.7 > T - w = 8 -> k_0 = 8, k_top = 2 * 6 - 8 = 4
        (2, 10, 0.8, 2, [10, 6]),
        (1, 10, 0.5, 2, [5]),  # one layer: the uniform budget
    ],
)
def test_pyramidkv_budgets(L, T, keep, window, expected):
    A = [sink_rows(T)] * L
    budgets = tgvkv.layer_budgets("pyramidkv", A, [(1, 3)], keep, window_size=window)
    assert budgets.tolist() == expected
    assert budgets.sum() == L * blocks.uniform_budget(T, keep)


def test_pyramidkv_selection_uses_snapkv_scores_per_layer():
    # L = 2, T = 10, keep 0.8 -> budgets [10, 6] with window 2; layer 1 keeps the 4 best raw window sums
    A = [snap_matrix(), snap_matrix()]
    sel = tgvkv.run_selection("pyramidkv", A, [(2, 6)], 0.8, window_size=2, kernel_size=1)
    assert sel.kept[0].tolist() == list(range(10))
    assert sel.kept[1].tolist() == [2, 5, 6, 7, 8, 9]  # sums 11 (5), 5 (2), 3 (7), then tie 2 (0, 6) -> 6


# -- PrefixKV ----------------------------------------------------------------------------------------------------
def one_hot(targets: list[int]) -> np.ndarray:
    """Query q attends only to key targets[q] (<= q): column sums are integer counts."""
    A = np.zeros((len(targets), len(targets)))
    for q, k in enumerate(targets):
        A[q, k] = 1.0
    return A


# T = 14, column sums (counts):
#   layer 0: k0 = 8, k5 = 2, k8 = k10 = k12 = k13 = 1, rest 0   -> sorted cdf starts at 8/14 = .57
#   layer 1: k0 = k1 = k4 = k5 = 2, k6..k10 = 1, k13 = 1, rest 0 -> cdf .14, .29, .43, .57, ...
PREFIX_A = [one_hot([0] * 8 + [8, 5, 10, 5, 12, 13]), one_hot([0, 0, 1, 1, 4, 4, 5, 5, 6, 7, 8, 9, 10, 13])]


def test_prefixkv_hand_case_threshold_search():
    # keep 0.5: target = T * L * 0.5 = 14.  First bisection point m = 0.5: idx = [0, 3] (first cdf >= .5)
    # c = T - (idx + 1) - (4 + 1) = [8, 5], sum 13, |13 - 14| < 5: stop.
    # Rescale: int(8 * 14/13) = 8, int(5 * 14/13) = 5
    # layer 0 window 4..12 scores [0,2,0,0,1,0,1,0,1]: forget 8 keeps only k5
    # layer 1 window scores [2,2,1,1,1,1,1,0,0]: forget 5 = k11, k12 (0) then k6, k7, k8 (ties: lower first)
    sel = tgvkv.run_selection("prefixkv", PREFIX_A, [(4, 10)], 0.5)
    assert sel.info["forget"].tolist() == [8, 5]
    np.testing.assert_allclose(sel.info["layer_ratio"], [8 / 14, 5 / 14])
    assert sel.kept[0].tolist() == [0, 1, 2, 3, 5, 13]
    assert sel.kept[1].tolist() == [0, 1, 2, 3, 4, 5, 9, 10, 13]
    assert sel.budgets.tolist() == [6, 9]
    assert sel.info["decode_slot"].tolist() == [3, 4]  # kept - 25 < 1 -> kept // 2


def test_prefixkv_hand_case_unreachable_target_rescaled_and_clipped():
    # keep 0.25: target 21; the largest reachable total is 8 + 8 = 16 (|16 - 21| = 5 is not < 5), so the search
    # converges to m -> 0 with c = [8, 8]; rescaled int(8 * 21/16) = 10 each, more than the 9-token window
    sel = tgvkv.run_selection("prefixkv", PREFIX_A, [(4, 10)], 0.25)
    assert sel.info["forget"].tolist() == [10, 10]
    assert [k.tolist() for k in sel.kept] == [[0, 1, 2, 3, 13]] * 2


def test_prefixkv_offline_layer_ratios():
    # forget = round_half_even([0.25, 0.5] * 14) = [round(3.5) = 4, 7]
    sel = tgvkv.run_selection("prefixkv", PREFIX_A, [(4, 10)], 0.5, layer_ratios=(0.25, 0.5))
    assert sel.info["forget"].tolist() == [4, 7]
    assert sel.kept[0].tolist() == [0, 1, 2, 3, 5, 8, 10, 11, 12, 13]  # zeros at 4, 6, 7, 9 go (11 survives)
    assert sel.kept[1].tolist() == [0, 1, 2, 3, 4, 5, 13]
    with pytest.raises(ValueError, match="layer_ratios has 3 entries but the model has 2 layers"):
        tgvkv.select("prefixkv", PREFIX_A, [(4, 10)], 0.5, layer_ratios=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="layer_ratios must be forget fractions"):
        make_policy("prefixkv", layer_ratios=(0.5, 1.5))


def test_prefixkv_decode_fixed_slot_with_truncation():
    pol = make_policy("prefixkv", distance=-2)
    sel = tgvkv.run_selection(pol, PREFIX_A, [(4, 10)], 0.5)
    rule = pol.decode_rule(sel, tgvkv.TokenLayout.from_spans(14, [(4, 10)]))
    assert rule.slots.tolist() == [4, 7]  # kept [6, 9] - 2
    row = torch.full((7,), 1 / 7)
    assert rule.victim(0, row, 7, 15) is None  # trunc(7 - 15 * 6/14) = trunc(0.57) = 0
    v = rule.victim(0, torch.full((8,), 1 / 8), 8, 16)  # trunc(8 - 16 * 6/14) = trunc(1.14) = 1
    assert int(v) == 4 and v.dtype == torch.long
    assert make_policy("prefixkv", decode=False).decode_rule(sel, None) is None


# -- registry and validation -------------------------------------------------------------------------------------
def test_registry_lists_every_method():
    expected = {"full", "random", "streamingllm", "h2o", "snapkv", "pyramidkv", "prefixkv", "tgv-kv", "tgv-ablation",
                "tgv-uniform-window", "tgv-self-attn", "tgv-vv-tt", "tgv-tv-tt", "tgv-tvb-tv-tt",
                "tgv-evict-text-first", "tgv-evict-vision-first", "text-only"}
    assert set(POLICIES) == expected


@pytest.mark.parametrize(
    "method, default",
    [("full", False), ("random", False), ("streamingllm", True), ("h2o", True), ("snapkv", False),
     ("pyramidkv", False), ("prefixkv", True), ("tgv-kv", True), ("tgv-ablation", True), ("tgv-tv-tt", True)],
)
def test_decode_default_is_stated_and_selectable(method, default):
    cls = POLICIES[method]
    assert cls.decodes_by_default is default
    assert make_policy(method).decode is default
    if method != "full":
        assert make_policy(method, decode=not default).decode is (not default)


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("nope", {}, "unknown method 'nope'"),
        ("h2o", {"window_size": 3}, "has no option"),
        ("h2o", {"recent_fraction": 1.5}, "recent_fraction must be"),
        ("snapkv", {"kernel_size": 4}, "kernel_size must be odd"),
        ("snapkv", {"window_size": 0}, "window_size must be an integer >= 1"),
        ("snapkv", {"pooling": "median"}, "pooling must be one of"),
        ("pyramidkv", {"beta": 0}, "beta must be an integer >= 1"),
        ("prefixkv", {"distance": 0}, "distance must be a non-zero integer"),
        ("prefixkv", {"tolerance": 0}, "tolerance must be an integer >= 1"),
        ("streamingllm", {"sinks": -1}, "sinks must be an integer >= 0"),
        ("random", {"seed": "x"}, "seed must be an integer"),
        ("random", {"decode": "yes"}, "decode must be True or False"),
    ],
)
def test_bad_options_raise(method, options, match):
    with pytest.raises(ValueError, match=match):
        make_policy(method, **options)


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.01, float("nan"), "half"])
@pytest.mark.parametrize("method", ["streamingllm", "h2o", "snapkv", "pyramidkv", "prefixkv", "random", "full"])
def test_bad_keep_ratio_raises(method, keep):
    with pytest.raises(ValueError, match="keep_ratio must be"):
        tgvkv.select(method, [sink_rows(6)], [(1, 3)], keep)


@pytest.mark.parametrize("method", ["streamingllm", "h2o", "snapkv", "pyramidkv", "prefixkv", "random", "full"])
def test_span_outside_sequence_raises(method):
    with pytest.raises(ValueError, match="outside the sequence of 6 tokens"):
        tgvkv.select(method, [sink_rows(6)], [(4, 9)], 0.5)


# -- every method, random inputs ---------------------------------------------------------------------------------
SMALL_WINDOWS = {"snapkv": {"window_size": 3}, "pyramidkv": {"window_size": 3}, "tgv-ablation": {"window_size": 3},
                 "tgv-uniform-window": {"window_size": 3}}


@st.composite
def random_case(draw):
    """T, L, one or two image spans (always text after the first image), keep ratio, numpy seed."""
    T = draw(st.integers(6, 48))
    L = draw(st.integers(1, 4))
    start = draw(st.integers(0, T - 3))
    end = draw(st.integers(start + 1, T - 1))  # at least one text token after the image
    spans = [(start, end)]
    if end + 1 < T - 1 and draw(st.booleans()):  # a second image, separated by text
        s2 = draw(st.integers(end + 1, T - 2))
        spans.append((s2, draw(st.integers(s2 + 1, T))))
    keep = draw(st.floats(0.01, 1.0))
    seed = draw(st.integers(0, 2**32 - 1))
    return T, L, spans, keep, seed


@FAST
@given(random_case(), st.sampled_from(sorted(POLICIES)))
def test_every_method_returns_valid_selections(case, method):
    T, L, spans, keep, seed = case
    A = random_attention(np.random.default_rng(seed), L, T)
    sel = tgvkv.run_selection(method, list(A), spans, keep, **SMALL_WINDOWS.get(method, {}))
    assert len(sel.kept) == L and sel.budgets.shape == (L,)
    for l, k in enumerate(sel.kept):
        assert k.dtype == np.int64
        assert np.all(np.diff(k) > 0), "sorted and unique"
        assert k.size == 0 or (k[0] >= 0 and k[-1] < T)
        assert len(k) == sel.budgets[l] >= (0 if method == "text-only" else 1)
    K = blocks.uniform_budget(T, keep)
    if method == "text-only":  # every text position, no image position, whatever the budget
        text = [t for t in range(T) if not any(a <= t < b for a, b in spans)]
        assert all(k.tolist() == text for k in sel.kept)
    elif method == "full":
        assert sel.budgets.tolist() == [T] * L
    elif method in ("random", "streamingllm", "h2o", "snapkv"):
        assert sel.budgets.tolist() == [K] * L
    elif method == "pyramidkv":
        assert sel.budgets.sum() == L * K and np.all(sel.budgets >= min(3, K)) and np.all(sel.budgets <= T)
        assert np.all(np.diff(sel.budgets) <= 0)  # pyramid: non-increasing with depth
    else:  # TGV-KV family: official skeleton
        assert all(set(range(min(4, T))) <= set(k.tolist()) and k[-1] == T - 1 for k in sel.kept)
        window = max(0, T - 5)
        np.testing.assert_array_equal(sel.budgets, T - np.minimum(sel.info["forget"], window))
    kept0 = tgvkv.select(method, list(A), spans, keep, **SMALL_WINDOWS.get(method, {}))[0]
    assert kept0.tolist() == sel.kept[0].tolist()


@pytest.mark.parametrize("method", ["full", "random", "streamingllm", "h2o", "snapkv", "pyramidkv", "prefixkv"])
def test_baselines_work_on_text_only_prompts(method):
    A = random_attention(np.random.default_rng(1), 2, 12)
    sel = tgvkv.run_selection(method, list(A), [], 0.5, **SMALL_WINDOWS.get(method, {}))
    assert all(np.all(np.diff(k) > 0) and len(k) == b for k, b in zip(sel.kept, sel.budgets))
    if method == "prefixkv":  # forget counts rescaled to the target 12 and truncated (at most 1 lost per layer)
        assert 10 <= 24 - sel.budgets.sum() <= 12
    else:
        assert sel.budgets.sum() == (24 if method == "full" else 12)


@FAST
@given(random_case(), st.sampled_from(["streamingllm", "h2o", "snapkv", "pyramidkv", "random"]), st.integers(1, 12))
def test_fixed_budget_decode_keeps_the_cache_at_the_prefill_budget(case, method, steps):
    """Simulate decoding: append one slot per step, ask the rule, remove its victim; the cache never exceeds the
    prefill budget after a step, StreamingLLM keeps its sinks, H2O never evicts a recent slot."""
    T, L, spans, keep, seed = case
    rng = np.random.default_rng(seed)
    A = random_attention(rng, L, T)
    pol = make_policy(method, decode=True, **SMALL_WINDOWS.get(method, {}))
    sel = tgvkv.run_selection(pol, list(A), spans, keep)
    rule = pol.decode_rule(sel, tgvkv.TokenLayout.from_spans(T, spans))
    for l in range(L):
        slots = sel.kept[l].tolist()
        for step in range(steps):
            slots.append(T + step)
            row = torch.as_tensor(rng.dirichlet(np.ones(len(slots))), dtype=torch.float32)
            v = rule.victim(l, row, len(slots), T + step + 1)
            if v is not None:
                assert v.dim() == 0 and 0 <= int(v) < len(slots)
                if method == "h2o":
                    assert int(v) < len(slots) - int(sel.info["recent"][l])
                slots.pop(int(v))
                rule.evicted(l, v)
            assert len(slots) <= sel.budgets[l]
        if method == "streamingllm":
            s = int(sel.info["sinks"][l])
            assert slots[:s] == list(range(s))


# -- every method through the engine (tiny random LLaVA, CPU) -------------------------------------------------------
QUESTION = "what is the colour of the circle ?"
ENGINE_OPTIONS = {"snapkv": {"window_size": 4}, "pyramidkv": {"window_size": 4}, "tgv-ablation": {"window_size": 4},
                  "tgv-uniform-window": {"window_size": 4}, "prefixkv": {"distance": -3}}


@pytest.fixture(scope="module")
def engine():
    """(model, processor, image, eager head-mean attention per layer, image spans) for one prompt."""
    from tiny_models import random_image, tiny_llava

    from tgvkv import hf_compat
    from tgvkv.layout import contiguous_runs

    model, proc = tiny_llava(seed=1)
    img = random_image(21)
    prompt = hf_compat.render_prompt(proc, QUESTION, 1)
    inputs = hf_compat.process_inputs(proc, [img], prompt, torch.device("cpu"), torch.float32)
    old = model.config.get_text_config(decoder=True)._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.inference_mode():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation({"text_config": old})
    attentions = [a[0].mean(0) for a in out.attentions]
    spans = contiguous_runs(inputs["input_ids"][0].numpy() == model.config.image_token_id)
    return model, proc, img, attentions, spans


def _run(engine, method, keep=0.3, options=None, diagnostics=True, **run):
    from tgvkv.generation import CaptureOptions, RunOptions, generate

    model, proc, img, _, _ = engine
    opts = ENGINE_OPTIONS.get(method, {}) if options is None else options
    return generate(model, proc, [img], QUESTION, method, keep, options=RunOptions(**run),
                    capture=CaptureOptions(diagnostics=diagnostics), policy_options=opts)


@pytest.mark.parametrize("method", sorted(POLICIES))
def test_engine_selection_equals_pure_select(engine, method):
    """SDPA capture in the engine, with and without diagnostics, selects what `tgvkv.select` does on eager maps."""
    _, _, _, attentions, spans = engine
    kept = [k.tolist() for k in tgvkv.select(method, attentions, spans, 0.3, **ENGINE_OPTIONS.get(method, {}))]
    for diagnostics in (True, False):
        tr = _run(engine, method, diagnostics=diagnostics, max_new_tokens=1).trace
        assert [tr.kept_positions(l).tolist() for l in range(tr.num_layers)] == kept
        assert tr.cache_len_final.tolist() == [len(k) for k in kept]


@pytest.mark.parametrize(
    "method, options",
    [("streamingllm", {}), ("h2o", {}), ("snapkv", {"window_size": 4, "decode": True}),
     ("pyramidkv", {"window_size": 4, "decode": True}), ("random", {"decode": True, "seed": 2})],
)
def test_engine_fixed_budget_decode_keeps_prefill_budget(engine, method, options):
    res = _run(engine, method, options=options, max_new_tokens=8)
    tr = res.trace
    assert tr.cache_len_final.tolist() == tr.budgets.tolist()  # one eviction per step once over budget
    assert len(tr.decode_evictions) == max(0, len(res.token_ids) - 1) * tr.num_layers
    if method == "streamingllm":  # the evicted positions are never sinks
        assert np.all(tr.decode_evictions[:, 2] >= 4)


@pytest.mark.parametrize("method", ["h2o", "streamingllm"])
def test_engine_fixed_budget_decode_after_a_followup_turn(engine, method):
    """A multi-token follow-up turn is appended whole; the rule still evicts one slot per later step, so the cache
    stays above the prefill budget by the follow-up's length (H2O's accumulator grows by the whole turn)."""
    res = _run(engine, method, max_new_tokens=8, followup="where is the square ?")
    over = res.trace.cache_len_final - res.trace.budgets
    assert np.all(over == over[0]) and over[0] > 0
    assert res.followup_text is not None


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "random", "full"])
def test_engine_prefill_only_methods_grow_during_decoding(engine, method):
    res = _run(engine, method, max_new_tokens=6)
    tr = res.trace
    growth = tr.cache_len_final - tr.budgets
    assert len(tr.decode_evictions) == 0
    assert np.all(growth == growth[0]) and growth[0] == len(res.token_ids) - 1  # official protocol: last not fed
