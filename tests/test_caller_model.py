"""Library calls leave the caller's model as they found it: attention implementation, config, outputs; also when the
run raises, when runs nest or overlap in threads, and when the caller routed the model through capture for good."""
from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from tiny_models import random_image, tiny_llava

import tgvkv
from tgvkv import capture, hf_compat
from tgvkv.batch import BatchItem, generate_batch
from tgvkv.policies import Policy
from tgvkv.stats import StatRequest

Q = "what is the colour of the circle ?"


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=1)


def _snapshot(model, proc, img) -> dict:
    """What a caller can observe of the model: attention settings, configs, and a plain forward's logits."""
    inputs = hf_compat.process_inputs(proc, [img], hf_compat.render_prompt(proc, Q, 1), torch.device("cpu"),
                                      torch.float32)
    with torch.inference_mode():
        logits = model(**inputs).logits.clone()
    return {
        "language": capture.language_attention(model),
        "top": model.config._attn_implementation,
        "vision": model.config.vision_config._attn_implementation,
        "config": model.config.to_json_string(),
        "generation_config": model.generation_config.to_json_string(),
        "training": model.training,
        "logits": logits,
    }


def _assert_unchanged(before: dict, after: dict) -> None:
    for key in ("language", "top", "vision", "config", "generation_config", "training"):
        assert after[key] == before[key], key
    assert torch.equal(after["logits"], before["logits"])


def test_generate_and_compare_leave_the_model_as_found(llava):
    model, proc = llava
    img = random_image(3)
    before = _snapshot(model, proc, img)
    assert before["language"] == "sdpa"
    res = tgvkv.generate(model, proc, [img], Q, "tgv-kv", 0.3, max_new_tokens=6)
    assert res.trace.budgets.min() < res.trace.seq_len  # it did evict
    _assert_unchanged(before, _snapshot(model, proc, img))
    tgvkv.compare(model, proc, [img], Q, "snapkv", 0.3, max_new_tokens=6)
    _assert_unchanged(before, _snapshot(model, proc, img))
    generate_batch(model, proc, [BatchItem([img], Q), BatchItem([random_image(4)], Q)], "tgv-kv", 0.3, 4)
    _assert_unchanged(before, _snapshot(model, proc, img))


@dataclass
class _FailingPolicy(Policy):
    """A policy whose selection raises: the run stops after the prefill, inside the capturing context."""

    name: ClassVar[str] = "failing"

    def request(self, layout):
        return StatRequest(layout.text_positions.astype(np.int64))

    def select(self, stats, layout, keep_ratio):
        raise RuntimeError("selection failed on purpose")


def test_model_restored_after_an_exception_inside_the_run(llava):
    model, proc = llava
    img = random_image(5)
    before = _snapshot(model, proc, img)
    with pytest.raises(RuntimeError, match="selection failed on purpose"):
        tgvkv.generate(model, proc, [img], Q, _FailingPolicy(), 0.3, max_new_tokens=4)
    _assert_unchanged(before, _snapshot(model, proc, img))
    with pytest.raises(RuntimeError, match="selection failed on purpose"):
        tgvkv.compare(model, proc, [img], Q, _FailingPolicy(), 0.3, max_new_tokens=4)
    _assert_unchanged(before, _snapshot(model, proc, img))


def test_caller_choice_of_eager_is_restored(llava):
    model, proc = llava
    model.set_attn_implementation({"text_config": "eager"})
    try:
        tgvkv.generate(model, proc, [random_image(6)], Q, "tgv-kv", 0.3, max_new_tokens=4)
        assert capture.language_attention(model) == "eager"
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})


def test_a_model_routed_for_good_stays_routed(llava):
    model, proc = llava
    hf_compat.enable_capture(model, eager_reference=True)
    try:
        tgvkv.generate(model, proc, [random_image(7)], Q, "tgv-kv", 0.3, max_new_tokens=4)
        assert capture.language_attention(model) == capture.EAGER_NAME  # the caller's choice, kept
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})


def test_nested_and_overlapping_runs_share_one_routing(llava):
    model, proc = llava
    with capture.capturing(model):
        with capture.capturing(model):
            assert capture.language_attention(model) == capture.SDPA_NAME
        assert capture.language_attention(model) == capture.SDPA_NAME  # the outer run is still inside
    assert capture.language_attention(model) == "sdpa"

    inside, leave = threading.Event(), threading.Event()
    seen: list[str | None] = []

    def long_run():
        with capture.capturing(model):
            inside.set()
            leave.wait(timeout=60)
            seen.append(capture.language_attention(model))

    t = threading.Thread(target=long_run)
    t.start()
    assert inside.wait(timeout=60)
    res = tgvkv.generate(model, proc, [random_image(8)], Q, "tgv-kv", 0.3, max_new_tokens=4)  # starts and ends
    assert res.trace.budgets.min() < res.trace.seq_len
    assert capture.language_attention(model) == capture.SDPA_NAME  # the other run has not finished
    leave.set()
    t.join(timeout=60)
    assert seen == [capture.SDPA_NAME]
    assert capture.language_attention(model) == "sdpa"  # the last run out restored it


def test_importing_registers_nothing():
    """The capturing attention functions are registered on first use, not as a side effect of `import tgvkv`."""
    code = ("import tgvkv, tgvkv.generation, tgvkv.batch, tgvkv.capture\n"
            "from transformers import AttentionInterface\n"
            "print(sorted(n for n in AttentionInterface._global_mapping if n.startswith('tgvkv')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"


def test_same_answers_before_and_after_routing(llava):
    """A run inside an explicit `capturing` block and one outside it give the same tokens and kept sets."""
    model, proc = llava
    img = random_image(9)
    a = tgvkv.generate(model, proc, [img], Q, "tgv-kv", 0.2, max_new_tokens=6)
    with tgvkv.capture.capturing(model):
        b = tgvkv.generate(model, proc, [img], Q, "tgv-kv", 0.2, max_new_tokens=6)
    assert a.token_ids.tolist() == b.token_ids.tolist()
    assert np.array_equal(a.trace.kept_mask, b.trace.kept_mask)
