"""Fuzzing (hypothesis) of the pure parts: policies through tgvkv.select, span validation, geometry resolvers.

Random valid AND invalid inputs (spans, lengths, keep ratios, policy options, grids). The only acceptable failure is
a ValueError raised by tgvkv code itself whose message is one of ours (`OUR_MESSAGES`); anything else (IndexError,
ZeroDivisionError, TypeError, numpy's own ValueErrors, AssertionError from the Selection invariants) fails the test.
Successful results are checked against the invariants the engine relies on.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import traceback
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tgvkv import geometry
from tgvkv.layout import TokenLayout, validate_spans
from tgvkv.policies import POLICIES
from tgvkv.select import layer_budgets, run_selection, select

N = int(os.environ.get("TGVKV_FUZZ_EXAMPLES", "120"))  # per property (x 16 policies for the policy property)
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: every user-facing ValueError the fuzzed code may raise (message prefixes / patterns)
OUR_MESSAGES = [
    r"keep_ratio must be (a number in|in) \(0, 1\]",
    r"unknown method ",
    r"method '.*' has no option\(s\)",
    r"image span .* is not a \(start, end\) pair",
    r"image span \(-?\d+, -?\d+\) lies outside the sequence of -?\d+ tokens",
    r"image spans must be sorted and disjoint",
    r"sequence length must be positive",
    r"attentions\[\d+\] must be a square \[T, T\] matrix",
    r"attentions is empty",
    r"all layers must share one \[T, T\] shape",
    r"attention matrices contain NaN or inf",
    r"\w+ must be ",  # option checks: "sinks must be an integer >= 0, got ...", "kernel_size must be odd ..."
    r"(full|random|streamingllm|h2o|snapkv|pyramidkv|prefixkv|tgv-[\w-]+) ",  # per-policy option errors
    r"text->vision attention is zero in every layer",
    r"the prompt holds \d+ (vision |image |video )?(\w+ )?tokens but",
    r"LLaVA expects a square grid per image",
    r"view of \d+x\d+( \+ newlines)? needs \d+ tokens, got \d+",
    r"mm_tokens_per_image=\d+ is not a square grid",
    r"cannot split \d+ Gemma 3 image sequences",
    r"an image run of \d+ tokens does not match",
    r"sub-image tiles without their global image",
]
OUR = re.compile("|".join(f"(?:{p})" for p in OUR_MESSAGES))
COUNTS: dict[str, int] = {}


def _expect_ours(e: BaseException) -> str:
    """Assert `e` is one of our documented ValueErrors (raised in tgvkv/, known message); return its message."""
    assert type(e) is ValueError, f"unexpected {type(e).__name__}: {e}\n{''.join(traceback.format_exception(e))}"
    frames = traceback.extract_tb(e.__traceback__)
    assert "/tgvkv/" in frames[-1].filename.replace("\\", "/"), f"ValueError raised outside tgvkv: {frames[-1]}: {e}"
    msg = str(e)
    assert OUR.match(msg), f"unknown ValueError message: {msg!r}"
    return msg


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


# -- strategies ---------------------------------------------------------------------------------------------------
def _valid_spans(draw, T: int) -> list[tuple[int, int]]:
    cuts = sorted(draw(st.lists(st.integers(0, T), max_size=6, unique=True)))
    pairs = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2) if cuts[i] < cuts[i + 1]]
    return pairs


@st.composite
def spans_and_len(draw):
    """(spans, T): mostly valid spans, sometimes any of the invalid shapes a caller could pass."""
    T = draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["valid", "valid", "valid", "random", "wrong-arity", "junk", "overlap", "negative", "beyond"]))
    if kind == "valid":
        return _valid_spans(draw, T), T
    if kind == "random":
        return draw(st.lists(st.tuples(st.integers(-5, 50), st.integers(-5, 50)), max_size=4)), T
    if kind == "wrong-arity":
        return [tuple(draw(st.lists(st.integers(0, T), min_size=0, max_size=4).filter(lambda x: len(x) != 2)))], T
    if kind == "junk":
        return [draw(st.sampled_from([(1.5, 3), (0, 2.0), None, "ab", 5, ("0", "2"), (None, 1), np.array([1, 2, 3])]))], T
    if kind == "overlap":
        s = draw(st.integers(0, max(0, T - 2)))
        return [(s, min(T, s + 2)), (s, min(T, s + 1))], T
    if kind == "negative":
        return [(draw(st.integers(-10, -1)), draw(st.integers(0, T)))], T
    return [(draw(st.integers(0, T)), T + draw(st.integers(1, 10)))], T


def _attention(rng: np.random.Generator, L: int, T: int, kind: str) -> np.ndarray:
    """(L, T, T) causal row-stochastic head-averaged attention, or a degenerate variant."""
    a = rng.random((L, T, T)) ** rng.uniform(0.2, 8.0)
    if kind == "zeros":
        a = np.zeros((L, T, T))
    elif kind == "one-hot":
        a = np.zeros((L, T, T))
        a[:, np.arange(T), rng.integers(0, np.arange(T) + 1)] = 1.0
    a = np.tril(a)
    if kind != "zeros":
        a /= np.maximum(a.sum(-1, keepdims=True), 1e-300)
    if kind == "nan":
        a[0, -1, 0] = np.nan
    return a


KEEPS = st.one_of(
    st.floats(min_value=1e-6, max_value=1.0),
    st.sampled_from([1.0, 0.5, 0.05, 1e-9, 0.999999]),
    st.sampled_from([0.0, -0.1, 1.0000001, 2, float("nan"), float("inf"), -float("inf"), "0.5", "abc", None, True]),
)


def _option_values(field: dataclasses.Field):
    """Valid and invalid values for one policy option, from its declared type."""
    t = str(field.type)
    junk = st.sampled_from([None, "x", -1, 1.5, float("nan"), True, [], {}])
    if t == "bool":
        return st.one_of(st.booleans(), st.sampled_from([0, 1, "yes", None]))
    if t == "int":
        return st.one_of(st.integers(-3, 80), st.sampled_from([True, 2.5, "4", None]))
    if t == "float":
        return st.one_of(st.floats(-1.0, 300.0), st.sampled_from([float("nan"), float("inf"), True, "1", None]))
    if t == "str":
        default = field.default if isinstance(field.default, str) else ""
        known = ["tvb", "uniform", "twr", "tv", "vv", "self", "window", "tt", "text-first", "joint",
                 "evict-text-first", "evict-vision-first", "avg", "max"]
        return st.one_of(st.sampled_from([default, *known]), st.text(max_size=5), junk)
    if "tuple" in t:
        return st.one_of(st.none(), st.lists(st.floats(-0.5, 1.5), max_size=6).map(tuple), junk)
    return junk


@st.composite
def policy_options(draw, name: str) -> dict:
    fields = dataclasses.fields(POLICIES[name])
    chosen = draw(st.lists(st.sampled_from(fields), max_size=3, unique_by=lambda f: f.name)) if fields else []
    opts = {f.name: draw(_option_values(f)) for f in chosen}
    if draw(st.integers(0, 19)) == 0:
        opts["no_such_option"] = 1
    return opts


# -- properties ---------------------------------------------------------------------------------------------------
@FUZZ
@given(spans_and_len(), st.integers(-3, 3))
def test_validate_spans(case, dT):
    spans, T = case
    T = T if dT >= 0 else dT  # sometimes a non-positive sequence length
    ok = T > 0 and all(isinstance(s, tuple) and len(s) == 2 and all(isinstance(x, int) for x in s) for s in spans)
    if ok:
        prev = 0
        for s, e in spans:
            ok &= 0 <= s < e <= T and s >= prev
            prev = e
    try:
        out = validate_spans(spans, T)
    except Exception as e:  # noqa: BLE001 - classified by _expect_ours
        _expect_ours(e)
        assert not ok, f"valid spans {spans} (T={T}) refused: {e}"
        _count("validate_spans: refused")
        return
    assert ok, f"invalid spans {spans} (T={T}) accepted"
    assert out == [(int(s), int(e)) for s, e in spans]
    _count("validate_spans: accepted")


@pytest.mark.parametrize("method", sorted(POLICIES))
@FUZZ
@given(data=st.data())
def test_policy_selection(method, data):
    # "valid": well-formed spans with text after the first image, keep in (0, 1], default options (most draws);
    # "any": every kind of invalid span, keep ratio, option value and degenerate attention
    valid = data.draw(st.sampled_from([True, True, True, False, False]), "valid")
    if valid:
        T = data.draw(st.integers(3, 40), "T")
        s = data.draw(st.integers(0, T - 2), "start")
        e = data.draw(st.integers(s + 1, T - 1), "end")
        spans = [(s, e)] if data.draw(st.booleans(), "one span") or e - s < 2 else [(s, s + (e - s) // 2), ((s + e + 1) // 2 + 1, e + 1)]
        spans = [sp for sp in spans if sp[0] < sp[1] <= T]
        keep = data.draw(st.one_of(st.floats(min_value=1e-3, max_value=1.0), st.sampled_from([1.0, 0.05, 0.5])), "keep")
        opts, kind = {}, data.draw(st.sampled_from(["random"] * 5 + ["one-hot"]), "attention")
    else:
        spans, T = data.draw(spans_and_len(), "spans")
        keep = data.draw(KEEPS, "keep")
        opts = data.draw(policy_options(method), "options")
        kind = data.draw(st.sampled_from(["random"] * 6 + ["zeros", "one-hot", "nan"]), "attention")
    L = data.draw(st.integers(1, 4), "L")
    seed = data.draw(st.integers(0, 2**31 - 1), "seed")
    attn = _attention(np.random.default_rng(seed), L, T, kind)
    fn = data.draw(st.sampled_from(["run_selection", "run_selection", "select", "layer_budgets"]), "entry")
    try:
        if fn == "select":
            kept = select(method, list(attn), spans, keep, **opts)
        elif fn == "layer_budgets":
            budgets = layer_budgets(method, list(attn), spans, keep, **opts)
        else:
            sel = run_selection(method, list(attn), spans, keep, **opts)
    except Exception as e:  # noqa: BLE001 - classified by _expect_ours
        _expect_ours(e)
        _count(f"policy {method}: refused")
        return
    _count(f"policy {method}: selected")
    if fn == "select":
        assert len(kept) == L and all(np.all(np.diff(k) > 0) and (len(k) == 0 or 0 <= k[0] <= k[-1] < T) for k in kept)
        return
    if fn == "layer_budgets":
        assert budgets.shape == (L,) and np.all((budgets >= 0) & (budgets <= T))
        return
    assert len(sel.kept) == L and sel.budgets.shape == (L,) and sel.scores.shape == (L, T)
    for k, b in zip(sel.kept, sel.budgets):
        assert len(k) == b and 0 <= b <= T
        assert np.all(np.diff(k) > 0), "kept positions must be sorted and unique"
        assert len(k) == 0 or (k[0] >= 0 and k[-1] < T)
    mask = sel.kept_mask(T)
    assert mask.sum() == sel.budgets.sum()


def _llava_processor(crop: bool, shortest: int, cw: int, ch: int):
    ip = SimpleNamespace(do_center_crop=crop, size={"shortest_edge": shortest}, crop_size={"width": cw, "height": ch})
    return SimpleNamespace(image_processor=ip)


def _check_map(views, token_map, vision_positions):
    """Every vision position mapped once; cells inside their view; layout tokens have view -1."""
    pos = token_map.positions
    assert len(pos) == len(np.unique(pos))
    assert set(pos.tolist()) <= set(np.asarray(vision_positions).tolist())
    for v, r, c in zip(token_map.view_index, token_map.row, token_map.col):
        if v >= 0:
            assert 0 <= r < views[v].rows and 0 <= c < views[v].cols
        else:
            assert r == -1 and c == -1
    for v in views:
        y0, x0, y1, x1 = v.box
        assert 0 <= y0 <= y1 <= 1 and 0 <= x0 <= x1 <= 1 and v.rows > 0 and v.cols > 0


SIZES = st.tuples(st.integers(2, 5000), st.integers(2, 5000))


@FUZZ
@given(data=st.data())
def test_llava_geometry(data):
    n_images = data.draw(st.integers(0, 3), "images")
    side = data.draw(st.integers(1, 6), "side")
    per = side * side + data.draw(st.sampled_from([0, 0, 0, 1, -1]), "skew")
    gap = data.draw(st.integers(0, 3), "gap")
    spans, p = [], data.draw(st.integers(0, 3), "start")
    for _ in range(max(n_images, 1)):
        if per > 0:
            spans.append((p, p + per))
            p += per + gap
    if gap == 0 and spans:  # adjacent images form one run, as in a real prompt
        spans = [(spans[0][0], spans[-1][1])]
    sizes = [data.draw(SIZES, "size") for _ in range(n_images)]
    proc = _llava_processor(data.draw(st.booleans()), data.draw(st.integers(1, 400)), data.draw(st.integers(1, 400)),
                            data.draw(st.integers(1, 400)))
    try:
        views, tm = geometry.llava_geometry(None, proc, {}, spans, sizes)
    except Exception as e:  # noqa: BLE001
        _expect_ours(e)
        _count("geometry llava: refused")
        return
    _count("geometry llava: resolved")
    vision = np.concatenate([np.arange(s, e) for s, e in spans]) if spans else np.zeros(0, dtype=np.int64)
    _check_map(views, tm, vision)
    _check_overlays(views, tm, spans, p + 2, sizes, data)


def _check_overlays(views, tm, spans, T, sizes, data):
    layout = TokenLayout(seq_len=max(T, max((e for _, e in spans), default=0) + 1), image_spans=spans, views=views,
                         token_map=tm, image_sizes=sizes)
    kept = data.draw(st.lists(st.integers(-3, layout.seq_len + 3), max_size=20), "kept")
    grids = geometry.kept_grids(layout, kept)
    assert [g.shape for g in grids] == [(v.rows, v.cols) for v in views]
    for v in views:
        size = sizes[v.image_index] if v.image_index < len(sizes) else (10, 10)
        x0, y0, x1, y1 = geometry.cell_box(v, v.rows - 1, v.cols - 1, size)
        assert x0 <= x1 <= size[0] * (1 + 1e-9) and y0 <= y1 <= size[1] * (1 + 1e-9)


@FUZZ
@given(data=st.data())
def test_qwen_vl_geometry(data):
    merge = data.draw(st.integers(1, 3), "merge")
    grids = data.draw(st.lists(st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4)), max_size=3), "grids")
    grids = [(t, h * merge, w * merge) for t, h, w in grids]
    n_tok = sum(t * (h // merge) * (w // merge) for t, h, w in grids) + data.draw(st.sampled_from([0, 0, 0, 1, -1]))
    n_tok = max(n_tok, 0)
    ids = np.full(n_tok + 6, 5, dtype=np.int64)
    ids[3 : 3 + n_tok] = 7
    cfg = SimpleNamespace(image_token_id=7, video_token_id=8, vision_config=SimpleNamespace(spatial_merge_size=merge,
                                                                                            temporal_patch_size=2))
    inputs = {"input_ids": ids[None], "image_grid_thw": np.asarray(grids, dtype=np.int64).reshape(-1, 3)}
    try:
        views, tm = geometry.qwen_vl_geometry(cfg, None, inputs, [(3, 3 + n_tok)] if n_tok else [], [(64, 64)] * len(grids))
    except Exception as e:  # noqa: BLE001
        _expect_ours(e)
        _count("geometry qwen-vl: refused")
        return
    _count("geometry qwen-vl: resolved")
    _check_map(views, tm, np.arange(3, 3 + n_tok))
    assert len(tm.positions) == n_tok


@FUZZ
@given(data=st.data())
def test_gemma3_geometry(data):
    tokens_per_image = data.draw(st.integers(1, 20), "mm_tokens_per_image")
    crops = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=3), "crops")
    side2 = math.isqrt(tokens_per_image) ** 2
    n_tok = sum(1 + c for c in crops) * side2 + data.draw(st.sampled_from([0, 0, 0, 1]))
    ids = np.full(n_tok + 4, 1, dtype=np.int64)
    ids[2 : 2 + n_tok] = 9
    cfg = SimpleNamespace(mm_tokens_per_image=tokens_per_image, image_token_id=9)
    sizes = [data.draw(SIZES) for _ in crops]
    inputs = {"input_ids": ids[None], "num_crops": [crops]}
    try:
        views, tm = geometry.gemma3_geometry(cfg, None, inputs, [(2, 2 + n_tok)], sizes)
    except Exception as e:  # noqa: BLE001
        _expect_ours(e)
        _count("geometry gemma3: refused")
        return
    _count("geometry gemma3: resolved")
    _check_map(views, tm, np.arange(2, 2 + n_tok))


@FUZZ
@given(st.tuples(st.integers(2, 10_000), st.integers(2, 10_000)), st.integers(1, 12))
def test_pan_and_scan_boxes(size, n):
    # domain: Gemma 3's processor makes crops of at least pan_and_scan_min_crop_size (256) pixels along the long side
    n = min(n, max(1, max(size) // 256))
    boxes = geometry._pan_and_scan_boxes(size, n)
    assert len(boxes) == n
    for y0, x0, y1, x1 in boxes:
        assert 0 <= y0 <= y1 <= 1 and 0 <= x0 <= x1 <= 1
    _count("pan-and-scan boxes")


def test_zz_report_counts():
    """Printed with -s: how many fuzz cases were accepted / refused per target in this session."""
    for k in sorted(COUNTS):
        print(f"{k}: {COUNTS[k]}")
