"""The Explain tab's numbers are the policy's own (demo model): for a run ranked by TWR, the ones its selection
recorded; for any other method, TGV-KV's own functions on the trace's stored attention, which give what a TGV-KV run
on the same prompt recorded."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tgvkv
from analysis.compute import text_to_image_scores
from tgvkv.policies import TGVDetails, make_policy
from tgvkv.stats import PrefillStats
from tgvkv.trace import Trace
from analysis.webapp.explain import explain_numbers

ROOT = Path(__file__).resolve().parents[1]
KEEPS = (0.1, 0.25)


@pytest.fixture(scope="module")
def demo():
    model, processor = tgvkv.load_demo_model()
    example = json.loads((ROOT / "assets/examples/examples.json").read_text())[0]
    image = Image.open(ROOT / "assets/examples" / example["image"]).convert("RGB")
    traces: dict[tuple[str, float], Trace] = {}

    def run(method: str, keep: float) -> Trace:
        if (method, keep) not in traces:
            res = tgvkv.generate(model, processor, [image], example["question"], method, keep, max_new_tokens=4)
            traces[method, keep] = res.trace
        return traces[method, keep]

    return run


def stored_stats(trace: Trace) -> PrefillStats:
    """The prefill statistics a trace keeps: text-query rows and the column sums that were captured."""
    cols = np.asarray(trace.column_sums)
    return PrefillStats(rows=np.asarray(trace.query_rows), query_positions=np.asarray(trace.query_positions),
                        column_sums=cols, column_mask=~np.isnan(cols[0]))


# tgv-kv and an ablation preset that keeps TWR ranking but spends a uniform budget
@pytest.mark.parametrize("method", ["tgv-kv", "tgv-evict-vision-first"])
@pytest.mark.parametrize("keep", KEEPS)
def test_explain_shows_the_numbers_the_selection_recorded(demo, method, keep):
    trace = demo(method, keep)
    details = trace.tgv_details()
    nums = explain_numbers(trace)
    tq = nums.quantities
    assert tq.from_policy
    np.testing.assert_array_equal(tq.mass, details.tvb_mass)
    np.testing.assert_array_equal(tq.text_weights, details.text_weights)
    np.testing.assert_array_equal(tq.vision_scores, details.vision_scores)
    np.testing.assert_array_equal(tq.text_positions, trace.layout.text_query_positions)
    np.testing.assert_array_equal(nums.budgets, trace.budgets)
    np.testing.assert_array_equal(nums.text_kept, trace.kept_mask[:, ~trace.layout.is_vision].sum(axis=1))
    assert nums.top_text.tolist() == np.argsort(-details.text_weights.mean(axis=0))[:3].tolist()
    # the patches step 3 ranks are the selection's own vision scores
    layer = trace.largest_evicted_layer()
    np.testing.assert_array_equal(text_to_image_scores(trace, layer)[trace.layout.vision_positions],
                                  details.vision_scores[layer])

    # and the record is the policy's: its own select on the statistics the trace stored gives the same selection
    again = make_policy(method).select(stored_stats(trace), trace.layout, keep)
    assert [k.tolist() for k in again.kept] == [np.flatnonzero(m).tolist() for m in trace.kept_mask]
    np.testing.assert_array_equal(again.budgets, trace.budgets)
    np.testing.assert_allclose(again.scores, trace.scores, rtol=1e-6)
    redone = TGVDetails.from_info(again.info)
    for field in ("tvb_mass", "text_weights", "vision_scores"):
        np.testing.assert_allclose(getattr(redone, field), getattr(details, field), rtol=1e-6, err_msg=field)
    np.testing.assert_array_equal(redone.forget, details.forget)


@pytest.mark.parametrize("method", ["h2o", "tgv-tv-tt"])  # a baseline, and an ablation that does not rank by TWR
def test_explain_for_another_method_is_what_tgv_kv_recorded(demo, method):
    keep = KEEPS[0]
    tgv = demo("tgv-kv", keep).tgv_details()
    other = demo(method, keep)
    nums = explain_numbers(other)
    assert not nums.quantities.from_policy
    np.testing.assert_allclose(nums.quantities.mass, tgv.tvb_mass, rtol=1e-6)
    np.testing.assert_allclose(nums.quantities.text_weights, tgv.text_weights, rtol=1e-6)
    np.testing.assert_allclose(nums.quantities.vision_scores, tgv.vision_scores, rtol=1e-6)
    np.testing.assert_array_equal(nums.budgets, other.budgets)  # the budgets shown are the method's own
    assert not np.array_equal(other.budgets, demo("tgv-kv", keep).budgets)
