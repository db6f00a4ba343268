"""One TGV skeleton: tgv-kv, tgv-ablation and the paper's ablation rows are presets of `TGVKV`; policy kinds; the
typed `TGVDetails` record that other modules read instead of `Selection.info` keys."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import tgvkv
from tgvkv.policies import POLICIES, TGVDetails, make_policy, method_kind, method_sort_key
from tgvkv.policies.decode_rules import OfficialDecodeRule
from tgvkv.policies.tgv_kv import TGVKV, TGVAblation
from tgvkv.trace import Trace

TGV_NAMES = sorted(n for n, cls in POLICIES.items() if cls.kind in ("tgv", "tgv-ablation"))
SPANS = [(2, 10)]
T = 16


def attention(seed: int = 0, layers: int = 3) -> list[np.ndarray]:
    """Random causal head-averaged attention (rows sum to 1)."""
    rng = np.random.default_rng(seed)
    a = np.tril(rng.random((layers, T, T)) + 1e-3)
    return list(a / a.sum(axis=-1, keepdims=True))


def test_every_tgv_preset_is_the_one_class():
    assert len(TGV_NAMES) == 9  # tgv-kv, tgv-ablation and the seven rows of the paper's ablation table
    for name in TGV_NAMES:
        assert issubclass(POLICIES[name], TGVKV), name
    assert POLICIES["tgv-kv"] is TGVKV and POLICIES["tgv-ablation"] is TGVAblation


def test_kinds_come_from_the_registry():
    kinds = {n: method_kind(n) for n in POLICIES}
    assert kinds["tgv-kv"] == "tgv" and kinds["text-only"] == "probe"
    assert {n for n, k in kinds.items() if k == "tgv-ablation"} == set(TGV_NAMES) - {"tgv-kv"}
    assert {n for n, k in kinds.items() if k == "baseline"} == {"full", "random", "streamingllm", "h2o", "snapkv",
                                                                 "pyramidkv", "prefixkv"}
    assert method_kind("tgv-from-an-older-results-folder") is None


def test_sort_order_tgv_baselines_ablations_then_unregistered():
    names = ["zz-unknown", "tgv-tv-tt", "h2o", "text-only", "tgv-kv", "aa-unknown", "full"]
    assert sorted(names, key=method_sort_key) == ["tgv-kv", "full", "h2o", "text-only", "tgv-tv-tt", "aa-unknown",
                                                  "zz-unknown"]


def test_register_refuses_an_unknown_kind():
    @dataclasses.dataclass
    class Odd(TGVKV):
        name = "odd"
        kind = "mystery"

    with pytest.raises(ValueError, match="kind must be one of"):
        tgvkv.policies.register(Odd)
    assert "odd" not in POLICIES


def test_describe_and_options_are_the_presets_own():
    assert make_policy("tgv-kv").describe() == {"method": "tgv-kv", "sinks": 4, "text_offset": 100.0, "decode": True,
                                                "precision": "float64"}
    assert make_policy("tgv-tv-tt").describe() == {
        "method": "tgv-tv-tt", "budget": "uniform", "vision_rank": "tv", "text_rank": "tt", "retention": "joint",
        "window_size": 32, "sinks": 4, "text_offset": 100.0, "decode": True}
    with pytest.raises(ValueError, match=r"method 'tgv-kv' has no option\(s\) \['budget'\]"):
        make_policy("tgv-kv", budget="uniform")
    with pytest.raises(ValueError, match="tgv-kv fixes budget='tvb'"):
        TGVKV(budget="uniform")  # built directly: still tgv-kv's identity
    with pytest.raises(ValueError, match="tgv-tv-tt fixes vision_rank='tv'"):
        make_policy("tgv-tv-tt", vision_rank="twr")
    with pytest.raises(ValueError, match="exists for tgv-kv's components only"):
        TGVAblation(vision_rank="tv", precision="bfloat16")
    assert make_policy("tgv-ablation", vision_rank="tv", budget="uniform", retention="joint").vision_rank == "tv"


@pytest.mark.parametrize("name", TGV_NAMES)
def test_every_preset_records_tgv_details_and_decodes_by_the_official_rule(name):
    policy = make_policy(name, window_size=4) if "window_size" in POLICIES[name].option_names() else make_policy(name)
    sel = tgvkv.run_selection(policy, attention(), SPANS, 0.25)
    details = TGVDetails.from_info(sel.info)
    L = 3
    assert details.tvb_mass.shape == details.layer_ratio.shape == details.forget.shape == (L,)
    assert details.vision_scores.shape == (L, SPANS[0][1] - SPANS[0][0])
    assert (details.text_weights is not None) == (policy.vision_rank == "twr")
    np.testing.assert_array_equal(sel.budgets, [len(k) for k in sel.kept])
    assert details.layer_ratio.dtype == np.float32 and details.forget.tolist() == np.round(
        details.layer_ratio.astype(np.float64) * T).astype(int).tolist()
    layout = tgvkv.TokenLayout.from_spans(T, SPANS)
    rule = policy.decode_rule(sel, layout)
    assert isinstance(rule, OfficialDecodeRule)
    np.testing.assert_array_equal(rule.ratios, details.layer_ratio)
    np.testing.assert_array_equal(rule.protected, details.protected_suffix)
    assert make_policy(name, decode=False).decode_rule(sel, layout) is None


def test_tgv_ablation_defaults_give_tgv_kv_arrays_and_key_order():
    a = tgvkv.run_selection("tgv-kv", attention(3), SPANS, 0.1)
    b = tgvkv.run_selection("tgv-ablation", attention(3), SPANS, 0.1)
    assert list(a.info) == list(b.info) == ["tvb_mass", "layer_ratio", "forget", "text_weights", "vision_scores",
                                            "protected_suffix"]
    for k in a.info:
        np.testing.assert_array_equal(a.info[k], b.info[k])


def test_a_renamed_key_fails_in_one_place_with_a_clear_error():
    sel = tgvkv.run_selection("tgv-kv", attention(), SPANS, 0.25)
    info = dict(sel.info)
    info["tvb_share"] = info.pop("tvb_mass")
    with pytest.raises(ValueError, match="not a TGV-KV selection record: no tvb_mass among its arrays"):
        TGVDetails.from_info(info)
    layout = tgvkv.TokenLayout.from_spans(T, SPANS)
    trace = Trace(model="m", method="tgv-kv", keep_ratio=0.25, protocol="official", question="q", layout=layout,
                  prompt_ids=np.zeros(T, np.int64), num_layers=3, selection_info=info)
    with pytest.raises(ValueError, match="no tvb_mass"):
        trace.tgv_details()
    assert dataclasses.replace(trace, selection_info=dict(sel.info)).tgv_details().forget.tolist() == \
        sel.info["forget"].tolist()
    assert dataclasses.replace(trace, method="h2o").tgv_details() is None  # other methods write no record
    assert dataclasses.replace(trace, method="not-registered").tgv_details() is None


def test_eval_figures_group_by_kind_and_draw_unregistered_names_with_the_baselines():
    from tgvkv.eval.plot import _groups, _style

    groups = dict(_groups(["tgv-kv", "h2o", "text-only", "tgv-tv-tt", "tgv-old-row"]))
    assert groups == {"TGV-KV vs baselines": ["tgv-kv", "h2o", "text-only", "tgv-old-row"],
                      "TGV-KV vs its ablations": ["tgv-kv", "tgv-tv-tt"]}
    assert [g for g, _ in _groups(["tgv-kv", "h2o", "tgv-old-row"])] == ["TGV-KV vs baselines"]
    assert _style("tgv-tv-tt", 0)["ls"] == "--" and _style("tgv-old-row", 0)["ls"] == _style("h2o", 0)["ls"] == "-"
