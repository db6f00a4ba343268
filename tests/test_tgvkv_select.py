"""`tgv-kv` against hand computations from the official rule (docs/tgvkv.md section 3), its invariants under random
attention, the official decode rule on hand-made rows, and the ablation rows as compositions of the same blocks.

Hand matrices are in units u = 1/8 (each row sums to 8u), so every sum below is exact in floating point.
Layout notation: pre text [0, image_start), vision [image_start, ts), post text [ts, T); window = 4 .. T-2.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tgvkv
from tgvkv.policies import make_policy
from tgvkv.policies.decode_rules import OfficialDecodeRule

U = 1 / 8
FAST = settings(max_examples=80, deadline=None)


def with_text_rows(T: int, rows: dict[int, list[int]]) -> np.ndarray:
    """Every query attends only to position 0 (a sink), except the given rows (in units u, left-aligned)."""
    A = np.zeros((T, T))
    A[:, 0] = 1.0
    for q, r in rows.items():
        assert sum(r) == 8 and len(r) == q + 1
        A[q] = 0.0
        A[q, : q + 1] = np.array(r) * U
    return A


# -- example A: T = 10, L = 2, image (4, 7), text 7, 8, 9; keep 0.5 ----------------------------------------------
# layer 0 (text rows 7..9):           TI rows        TT rows
#   row 7: [3,0,0,0, 2,1,0, 2]        [2,1,0]        [2]
#   row 8: [3,0,0,0, 0,0,1, 2,2]      [0,0,1]        [2,2]
#   row 9: [3,0,0,0, 0,1,1, 1,1,1]    [0,1,1]        [1,1,1]
#   s_0 = 6u.  w (mean TT column over the queries that see it): w7 = 5/3, w8 = 3/2, w9 = 1   (units u)
#   TWR (units u^2): v4 = 2*5/3 = 10/3;  v5 = 1*5/3 + 1*1 = 8/3;  v6 = 1*3/2 + 1*1 = 5/2
# layer 1:
#   row 7: [4,1,0,0, 0,1,0, 2]        [0,1,0]        [2]
#   row 8: [4,0,1,0, 0,0,0, 1,2]      [0,0,0]        [1,2]
#   row 9: [4,0,0,1, 1,0,0, 1,0,1]    [1,0,0]        [1,0,1]
#   s_1 = 2u.  r = [6/8, 2/8] = [0.75, 0.25] (exact)
def example_a() -> list[np.ndarray]:
    l0 = with_text_rows(10, {7: [3, 0, 0, 0, 2, 1, 0, 2], 8: [3, 0, 0, 0, 0, 0, 1, 2, 2],
                             9: [3, 0, 0, 0, 0, 1, 1, 1, 1, 1]})
    l1 = with_text_rows(10, {7: [4, 1, 0, 0, 0, 1, 0, 2], 8: [4, 0, 1, 0, 0, 0, 0, 1, 2],
                             9: [4, 0, 0, 1, 1, 0, 0, 1, 0, 1]})
    return [l0, l1]


SPANS_A = [(4, 7)]


def test_example_a_rounding_half_to_even_and_floor_of_five():
    # ratio_l = 1 - L * keep * r_l = 1 - r_l = [0.25, 0.75];  ratio * T = [2.5, 7.5]
    # forget = round_half_even -> [2, 8]   (round-half-up would give 3 in layer 0)
    # layer 0: evict the 2 lowest window scores: v6 = 5/2 and v5 = 8/3 -> keep v4 (10/3) and all text
    # layer 1: forget 8 > window size 5 -> the whole window goes: keep 4 sinks + last = 4 + max(0, 5 - 8) + 1 = 5
    sel = tgvkv.run_selection("tgv-kv", example_a(), SPANS_A, 0.5)
    np.testing.assert_allclose(sel.info["tvb_mass"], [6 * U, 2 * U])
    np.testing.assert_allclose(sel.info["layer_ratio"], [0.25, 0.75])
    assert sel.info["forget"].tolist() == [2, 8]
    assert sel.kept[0].tolist() == [0, 1, 2, 3, 4, 7, 8, 9]
    assert sel.kept[1].tolist() == [0, 1, 2, 3, 9]
    assert sel.budgets.tolist() == [8, 5]
    np.testing.assert_allclose(sel.info["text_weights"][0], np.array([5 / 3, 3 / 2, 1]) * U)
    np.testing.assert_allclose(sel.info["vision_scores"][0], np.array([10 / 3, 8 / 3, 5 / 2]) * U * U)
    # text scores: column sum over all queries + 100 (key 7 layer 0: 2 + 2 + 1 = 5u)
    assert sel.scores[0, 7] == pytest.approx(100 + 5 * U)
    assert sel.info["protected_suffix"].tolist() == [3, 1]  # kept positions >= ts = 7
    assert tgvkv.layer_budgets("tgv-kv", example_a(), SPANS_A, 0.5).tolist() == [8, 5]


def test_example_a_keep_all_when_less_than_one_token_to_prune():
    # (1 - 0.95) * 10 = 0.5 < 1: nothing is pruned although TVB alone would give layer 1 round(10 * 0.525) = 5
    pol = make_policy("tgv-kv")
    sel = tgvkv.run_selection(pol, example_a(), SPANS_A, 0.95)
    assert [k.tolist() for k in sel.kept] == [list(range(10))] * 2
    assert sel.budgets.tolist() == [10, 10]
    assert sel.info["forget"].tolist() == [0, 0]
    assert pol.decode_rule(sel, tgvkv.TokenLayout.from_spans(10, SPANS_A)) is None  # ratio 0: never evicts
    assert tgvkv.select("tgv-kv", example_a(), SPANS_A, 1.0)[1].tolist() == list(range(10))


# -- example B: T = 12, L = 2, image (4, 9), text 9, 10, 11; keep 0.75 -------------------------------------------
# layer 0 TI row sums 4 + 3 + 3 = s_0 = 10u;  layer 1 TI row sums 3 + 1 + 1 = s_1 = 5u;  r = [2/3, 1/3]
# ratio = 1 - 2 * 0.75 * r = [0, 0.5]  ->  forget = [0, round(6.0) = 6]
# layer 1: the window 4..10 holds 5 vision tokens and text 9, 10; forget 6 > 5 vision: all vision go, then the
# lower text score: key 9 = A[9,9] + A[10,9] + A[11,9] = 1 + 1 + 2 = 4u, key 10 = A[10,10] + A[11,10] = 2u -> 10 goes
def example_b() -> list[np.ndarray]:
    l0 = with_text_rows(12, {9: [1, 0, 0, 0, 1, 1, 1, 1, 0, 3], 10: [3, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1],
                             11: [2, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1, 1]})
    l1 = with_text_rows(12, {9: [4, 0, 0, 0, 0, 1, 0, 2, 0, 1], 10: [4, 1, 0, 0, 1, 0, 0, 0, 0, 1, 1],
                             11: [3, 0, 0, 0, 0, 0, 1, 0, 0, 2, 1, 1]})
    return [l0, l1]


def test_example_b_text_evicted_when_forget_exceeds_window_vision():
    sel = tgvkv.run_selection("tgv-kv", example_b(), [(4, 9)], 0.75)
    np.testing.assert_allclose(sel.info["tvb_mass"], [10 * U, 5 * U])
    np.testing.assert_allclose(sel.info["layer_ratio"], [0.0, 0.5], atol=1e-12)
    assert sel.info["forget"].tolist() == [0, 6]
    assert sel.kept[0].tolist() == list(range(12))
    assert sel.kept[1].tolist() == [0, 1, 2, 3, 9, 11]
    assert sel.budgets.tolist() == [12, 6]  # 4 + max(0, 7 - 6) + 1 = 6
    assert sel.scores[1, 9] == pytest.approx(100 + 4 * U) and sel.scores[1, 10] == pytest.approx(100 + 2 * U)
    assert sel.info["protected_suffix"].tolist() == [3, 2]


# -- example C: three layers, TWR ranking inside the window, a vision token inside the sinks -----------------------
# T = 11, L = 3, image (3, 7), text 7..10 (Lt = 4); the three layers are equal, so r_l = 1/3 and
# ratio_l = 1 - 3 * keep / 3 = 1 - keep.  Window = 4..9 = vision 4, 5, 6 + text 7, 8, 9; vision 3 is a sink.
#   row 7:  [2,0,0, 1,1,1,1, 2]             TI [1,1,1,1]   TT [2]
#   row 8:  [2,0,0, 1,0,1,0, 2,2]           TI [1,0,1,0]   TT [2,2]
#   row 9:  [2,0,0, 0,1,0,1, 1,2,1]         TI [0,1,0,1]   TT [1,2,1]
#   row 10: [1,0,0, 1,1,1,0, 1,1,1,1]       TI [1,1,1,0]   TT [1,1,1,1]
# w7 = (2+2+1+1)/4 = 3/2, w8 = (2+2+1)/3 = 5/3, w9 = (1+1)/2 = 1, w10 = 1   (units u)
# TWR: v3 = w7 + w8 + w10 = 25/6;  v4 = w7 + w9 + w10 = 7/2;  v5 = w7 + w8 + w10 = 25/6;  v6 = w7 + w9 = 5/2
def test_example_c_sinks_protect_an_early_vision_token():
    rows = {7: [2, 0, 0, 1, 1, 1, 1, 2], 8: [2, 0, 0, 1, 0, 1, 0, 2, 2], 9: [2, 0, 0, 0, 1, 0, 1, 1, 2, 1],
            10: [1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1]}
    A = [with_text_rows(11, rows)] * 3
    # keep 0.5: forget = round(0.5 * 11) = 6 = the whole window (text 7, 8, 9 too); sink 3 (vision) and 10 stay
    sel = tgvkv.run_selection("tgv-kv", A, [(3, 7)], 0.5)
    assert sel.info["forget"].tolist() == [6, 6, 6]
    assert [k.tolist() for k in sel.kept] == [[0, 1, 2, 3, 10]] * 3
    # keep 0.75: ratio 0.25 -> round(2.75) = 3: the three window vision tokens (text scores are >= 100)
    sel = tgvkv.run_selection("tgv-kv", A, [(3, 7)], 0.75)
    assert sel.info["forget"].tolist() == [3, 3, 3]
    np.testing.assert_allclose(sel.info["vision_scores"][0], np.array([25 / 6, 7 / 2, 25 / 6, 5 / 2]) * U * U)
    assert sel.kept[0].tolist() == [0, 1, 2, 3, 7, 8, 9, 10]
    # keep 0.85: (1 - 0.85) * 11 = 1.65 -> round 2: the two lowest TWR in the window: v6 (5/2), v4 (7/2)
    sel = tgvkv.run_selection("tgv-kv", A, [(3, 7)], 0.85)
    assert sel.info["forget"].tolist() == [2, 2, 2]
    assert sel.kept[0].tolist() == [0, 1, 2, 3, 5, 7, 8, 9, 10]


# -- invariants under random attention ----------------------------------------------------------------------------
def random_attention(rng: np.random.Generator, L: int, T: int) -> np.ndarray:
    A = np.tril(rng.random((L, T, T)) ** 3 + 1e-6)
    return A / A.sum(axis=-1, keepdims=True)


@st.composite
def tgv_case(draw):
    T = draw(st.integers(6, 64))
    L = draw(st.integers(1, 4))
    start = draw(st.integers(0, T - 2))
    end = draw(st.integers(start + 1, T - 1))
    keep = draw(st.floats(0.01, 1.0))
    seed = draw(st.integers(0, 2**32 - 1))
    return T, L, [(start, end)], keep, seed


@FAST
@given(tgv_case())
def test_tgv_kv_invariants(case):
    T, L, spans, keep, seed = case
    A = random_attention(np.random.default_rng(seed), L, T)
    sel = tgvkv.run_selection("tgv-kv", list(A), spans, keep)
    layout = tgvkv.TokenLayout.from_spans(T, spans)
    vision, window = layout.is_vision, np.arange(4, max(4, T - 1))
    for l, k in enumerate(sel.kept):
        assert np.all(np.diff(k) > 0) and k[0] >= 0 and k[-1] == T - 1  # sorted, unique, last position kept
        assert set(range(min(4, T))) <= set(k.tolist())  # sinks
        assert len(k) == sel.budgets[l] == T - min(int(sel.info["forget"][l]), len(window))
        evicted = np.setdiff1d(window, k)
        if np.any(~vision[evicted]):  # some window text evicted: no window vision token may survive
            assert not np.any(vision[np.intersect1d(window, k)])
    if (1 - keep) * T < 1:
        assert sel.budgets.tolist() == [T] * L
    # budgets follow the official formula with round-half-even
    s = A[:, layout.text_query_positions][:, :, layout.vision_positions].sum(axis=(1, 2))
    if (1 - keep) * T >= 1:
        forget = np.maximum(0, np.round((1 - L * keep * s / s.sum()) * T)).astype(int)
        assert sel.info["forget"].tolist() == forget.tolist()


@FAST
@given(tgv_case())
def test_tgv_ablation_defaults_equal_tgv_kv(case):
    T, L, spans, keep, seed = case
    A = list(random_attention(np.random.default_rng(seed), L, T))
    a, b = tgvkv.run_selection("tgv-kv", A, spans, keep), tgvkv.run_selection("tgv-ablation", A, spans, keep)
    assert [k.tolist() for k in a.kept] == [k.tolist() for k in b.kept]
    np.testing.assert_array_equal(a.scores, b.scores)


@FAST
@given(tgv_case(), st.sampled_from(["tgv-evict-vision-first", "tgv-evict-text-first"]))
def test_strict_retention_orders(case, method):
    T, L, spans, keep, seed = case
    A = list(random_attention(np.random.default_rng(seed), L, T))
    sel = tgvkv.run_selection(method, A, spans, keep)
    vision = tgvkv.TokenLayout.from_spans(T, spans).is_vision
    first = vision if method == "tgv-evict-vision-first" else ~vision
    window = np.arange(4, max(4, T - 1))
    for k in sel.kept:
        evicted = np.setdiff1d(window, k)
        if np.any(~first[evicted]):  # the protected modality lost a token: none of the first one may survive
            assert not np.any(first[np.intersect1d(window, k)])


# -- decode rule --------------------------------------------------------------------------------------------------
def rule(ratio: float, protected: int) -> OfficialDecodeRule:
    return OfficialDecodeRule(np.array([ratio]), np.array([protected]))


def test_decode_forget_uses_truncation():
    row = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.3, 0.05, 0.2, 0.1, 0.05])
    # S = 9, N = 11, ratio 0.25: 9 - 11 * 0.75 = 0.75 -> trunc 0 (rounding would give 1): nothing
    assert rule(0.25, 1).victim(0, row, 9, 11) is None
    # S = 10, N = 11: 10 - 8.25 = 1.75 -> 1: the first minimum of slots [4, 10 - 1)
    row10 = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.3, 0.05, 0.2, 0.1, 0.05, 0.0])
    v = rule(0.25, 1).victim(0, row10, 10, 11)
    assert v.dim() == 0 and int(v) == 5  # 0.05 at slots 5 and 8: first on ties


def test_decode_one_eviction_per_step_protected_suffix_and_sinks():
    # forget = trunc(12 - 11 * 0.5) = 6 but only one slot is named; the global minimum sits in the sinks (slot 1)
    # and in the protected suffix (slots 9..11, P = 3): neither is chosen
    row = torch.tensor([0.2, 0.0, 0.1, 0.1, 0.08, 0.09, 0.07, 0.1, 0.1, 0.0, 0.0, 0.06])
    v = rule(0.5, 3).victim(0, row, 12, 11)
    assert int(v) == 6
    # range [4, S - P) empty -> nothing
    assert rule(0.5, 3).victim(0, row[:7], 7, 20) is None


@pytest.mark.parametrize("ratio", [0.0, -0.3])
def test_decode_ratio_not_positive_never_evicts(ratio):
    assert rule(ratio, 1).victim(0, torch.full((50,), 0.02), 50, 10) is None


def test_decode_rule_from_example_a():
    pol = make_policy("tgv-kv")
    sel = tgvkv.run_selection(pol, example_a(), SPANS_A, 0.5)
    r = pol.decode_rule(sel, tgvkv.TokenLayout.from_spans(10, SPANS_A))
    np.testing.assert_allclose(r.ratios, [0.25, 0.75])
    assert r.protected.tolist() == [3, 1]
    # layer 1 after the first decode forward: S = 6 slots (positions 0-3, 9, 10), N = 11: 6 - 11 * 0.25 = 3.25 -> 1;
    # range [4, 6 - 1) = slot 4 only
    assert int(r.victim(1, torch.full((6,), 1 / 6), 6, 11)) == 4
    assert make_policy("tgv-kv", decode=False).decode_rule(sel, None) is None


# -- ablation rows on example A (hand-computed) ---------------------------------------------------------------------
# example A extra facts: column sums of window keys (units u).  layer 0: v4 = 2, v5 = 2, v6 = 2, t7 = 5, t8 = 3;
# layer 1: v4 = 1, v5 = 1, v6 = 0, t7 = 4, t8 = 2.  TV (text rows only) equals these for vision here, because
# vision queries attend only to position 0.  Layer 1 TWR: w7 = 4/3, w8 = 1, w9 = 1 -> v4 = 1, v5 = 4/3, v6 = 0.
@pytest.mark.parametrize(
    "method, keep, options, expected",
    [
        # TVB budgets as tgv-kv (forget [2, 8]); joint raw scores: layer 0 vision TV all 2u -> ties evict 4, 5
        ("tgv-tvb-tv-tt", 0.5, {}, [[0, 1, 2, 3, 6, 7, 8, 9], [0, 1, 2, 3, 9]]),
        # uniform: forget = round(0.4 * 10) = 4: all vision (2u, 2u, 2u / 1u, 1u, 0) then t8 (3u / 2u)
        ("tgv-tv-tt", 0.6, {}, [[0, 1, 2, 3, 7, 9], [0, 1, 2, 3, 7, 9]]),
        # uniform forget round(0.2 * 10) = 2: strict text first -> text 7, 8 go, vision stays
        ("tgv-evict-text-first", 0.8, {}, [[0, 1, 2, 3, 4, 5, 6, 9]] * 2),
        # strict vision first, TWR: layer 0 evicts v6 (5/2), v5 (8/3); layer 1 v6 (0), v4 (1)
        ("tgv-evict-vision-first", 0.8, {}, [[0, 1, 2, 3, 4, 7, 8, 9], [0, 1, 2, 3, 5, 7, 8, 9]]),
        # column sums of all keys, joint: layer 0 ties 2u -> 4, 5; layer 1: 6 (0), then 4 (1u, lower of the tie)
        ("tgv-self-attn", 0.8, {}, [[0, 1, 2, 3, 6, 7, 8, 9], [0, 1, 2, 3, 5, 7, 8, 9]]),
        # observation window = rows 8, 9; window keys 8, 9 get the layer max.  layer 0 sums: v4 0, v5 1, v6 2, t7 3
        # -> 4, 5 go; layer 1: v4 1, v5 0, v6 0, t7 2 -> 5, 6 go
        ("tgv-uniform-window", 0.8, {"window_size": 2}, [[0, 1, 2, 3, 6, 7, 8, 9], [0, 1, 2, 3, 4, 7, 8, 9]]),
    ],
)
def test_ablation_rows_hand_cases(method, keep, options, expected):
    sel = tgvkv.run_selection(method, example_a(), SPANS_A, keep, **options)
    assert [k.tolist() for k in sel.kept] == expected
    assert sel.budgets.tolist() == [len(e) for e in expected]


def test_vv_scores_are_attention_from_vision_queries():
    A = random_attention(np.random.default_rng(0), 2, 14)
    spans = [(2, 6), (8, 11)]  # two images, text between them is a text query too
    sel = tgvkv.run_selection("tgv-vv-tt", list(A), spans, 0.5)
    vis = tgvkv.TokenLayout.from_spans(14, spans).vision_positions
    direct = A[:, vis][:, :, vis].sum(axis=1)  # sum over vision queries of attention to each vision key
    np.testing.assert_allclose(sel.info["vision_scores"], direct, atol=1e-12)
    np.testing.assert_allclose(sel.scores[:, vis], direct, atol=1e-12)  # joint: no offset


def test_uniform_rows_decode_with_uniform_ratios():
    pol = make_policy("tgv-tv-tt")
    sel = tgvkv.run_selection(pol, example_a(), SPANS_A, 0.6)
    r = pol.decode_rule(sel, tgvkv.TokenLayout.from_spans(10, SPANS_A))
    np.testing.assert_allclose(r.ratios, [0.4, 0.4])
    assert r.protected.tolist() == [2, 2]  # kept 7 and 9 after the image


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("tgv-self-attn", {"budget": "tvb"}, "tgv-self-attn fixes budget='uniform'"),
        ("tgv-ablation", {"vision_rank": "qq"}, "vision_rank must be one of"),
        ("tgv-ablation", {"retention": "never"}, "retention must be one of"),
        ("tgv-ablation", {"text_offset": -1.0}, "text_offset must be"),
        ("tgv-kv", {"budget": "uniform"}, "has no option"),
    ],
)
def test_ablation_bad_options(method, options, match):
    with pytest.raises(ValueError, match=match):
        make_policy(method, **options)


@pytest.mark.parametrize("method", ["tgv-kv", "tgv-tv-tt", "tgv-uniform-window"])
def test_tgv_family_input_errors(method):
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        tgvkv.select(method, example_a(), SPANS_A, 1.5)
    with pytest.raises(ValueError, match="outside the sequence"):
        tgvkv.select(method, example_a(), [(4, 12)], 0.5)
    with pytest.raises(ValueError, match="no vision tokens"):
        tgvkv.select(method, example_a(), [], 0.5)
    with pytest.raises(ValueError, match="ends with vision tokens"):
        tgvkv.select(method, example_a(), [(4, 10)], 0.5)


def test_decode_forget_in_the_official_number_types():
    """Ratios float32, N * (1 - ratio) float32, subtraction from the int64 length float64 (the official numpy)."""
    from tgvkv.policies.blocks import official_decode_forget

    official = (np.array([6]) - 50 * (1 - np.array([0.9], dtype=np.float32))).astype(np.int32)[0]
    assert official == 0 and official_decode_forget(6, 50, np.float32(0.9)) == 0
    assert 6 - 50 * (1 - 0.9) == 1.0000000000000009  # float64 would evict here
    assert float((np.array([6]) - 50 * (1 - np.array([0.9], dtype=np.float32)))[0]) == pytest.approx(0.99999905, abs=1e-8)
    assert official_decode_forget(7, 50, np.float32(0.9)) == 1
    assert official_decode_forget(12, 110, np.float32(0.9)) == 0 and int(12 - 110 * (1 - 0.9)) == 1
    assert rule(0.9, 1).victim(0, torch.full((6,), 1 / 6), 6, 50) is None
    assert int(rule(0.9, 1).victim(0, torch.tensor([0.2, 0.2, 0.2, 0.2, 0.05, 0.1, 0.05]), 7, 50)) == 4
    # ratios are stored as float32 by the selection too
    sel = tgvkv.run_selection("tgv-kv", example_a(), SPANS_A, 0.5)
    assert sel.info["layer_ratio"].dtype == np.float32
