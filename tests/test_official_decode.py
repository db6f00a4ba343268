"""tgv-kv's decode decisions against an independent re-implementation of the official rule (official_reference.py).

Every decode-rule call of the engine (layer x step) is re-decided from the official code's own expressions: layer
ratios from eager float32 attention as the official `_prefill` computes them, forget counts as its numpy `_decode`.
Families whose image is several vision spans (Idefics3 / SmolVLM tiles) are left out: the official code assumes one
contiguous image run, so its rule is not defined for them (docs/policies.md, "Differences from the official code").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny_families as tf
from official_reference import RecordingTGVKV, check_decode, float64_forget, official_decode_victim
from tiny_models import random_image, tiny_llava

from tgvkv.generation import CaptureOptions, RunOptions, generate

Q = "what is the colour of the circle ?"
KEEPS = (0.05, 0.1, 0.25, 0.5)
# one contiguous image span per prompt: the official rule is defined
FAMILIES = {
    "llava": (tiny_llava, (40, 32)),
    "llava_next": (tf.tiny_llava_next, (60, 30)),
    "llava_onevision": (tf.tiny_onevision, (50, 40)),
    "qwen2_vl": (tf.tiny_qwen2_vl, (40, 24)),
    "qwen2_5_vl": (tf.tiny_qwen2_5_vl, (24, 40)),
    "qwen3_vl": (tf.tiny_qwen3_vl, (40, 24)),
    "gemma3": (tf.tiny_gemma3, (48, 20)),
}
DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo-vlm"


def test_whole_number_case_on_tiny_gemma3_follows_float32():
    """One full-attention layer at keep 0.1: ratio 0.9 (float32 0.89999998). At S = 6, N = 50 the official float32
    arithmetic gives 6 - 50 * 0.10000002 = 0.99999905 -> no eviction; float64 gave 1.0000000000000009 -> evict."""
    model, proc = tf.tiny_gemma3(layers=2)
    pol = RecordingTGVKV()
    res = generate(model, proc, [random_image(0, (48, 20))], "where is the circle ?", pol, 0.1,
                   options=RunOptions(max_new_tokens=40),
                   capture=CaptureOptions(diagnostics=False, hidden_states=False))
    assert res.trace.selection_info["evictable_layers"].tolist() == [False, True]
    ratios = pol.selection.info["layer_ratio"]
    assert ratios.dtype == np.float32 and ratios.tolist() == [np.float32(0.9)]
    calls = {c.logical_len: c for c in pol.rule.calls}
    for n, s in ((50, 6), (60, 7)):  # whole-number steps: no eviction (float64 evicted here)
        c = calls[n]
        assert c.cache_len == s and c.victim is None
        assert float64_forget(s, n, 0.9) == 1
    assert calls[51].victim is not None  # 6 - 51 * 0.1 = 0.9 after the slot that came in: S = 7 -> evict
    protected = int(pol.selection.info["protected_suffix"][0])
    assert all(official_decode_victim(ratios, 0, c.attn_row, c.cache_len, c.logical_len, protected) == c.victim
               for c in pol.rule.calls)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, size = FAMILIES[request.param]
    model, proc = build()
    return request.param, model, proc, [random_image(3, size)]


@pytest.mark.parametrize("keep", KEEPS)
def test_every_decode_decision_equals_the_official_rule(family, keep):
    name, model, proc, images = family
    check = check_decode(model, proc, images, Q, keep, max_new_tokens=16)
    assert check.decisions > 0 and check.evictions > 0, name
    assert check.equal == check.decisions, f"{name} keep {keep}: {check}"


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="demo model not shipped")
def test_demo_model_decode_decisions_equal_the_official_rule():
    from tgvkv.eval.tasks import load_task
    from tgvkv.loading import load_model

    model, proc = load_model(str(DEMO))
    examples = load_task("demo", 7, "test", "auto").examples[::3]  # three question types (the full check: the script)
    for keep in KEEPS:
        total = equal = 0
        for ex in examples:
            check = check_decode(model, proc, ex.load_images(), ex.question, keep, max_new_tokens=16)
            total, equal = total + check.decisions, equal + check.equal
        assert total > 0 and equal == total, f"keep {keep}: {equal}/{total}"
