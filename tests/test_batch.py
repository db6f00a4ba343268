"""Batched decoding (tgvkv.batch) equals per-sample batch-1 engine runs, token for token (greedy, fp32)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import random_image, tiny_llava

from tgvkv.batch import BatchItem, generate_batch
from tgvkv.generation import CaptureOptions, RunOptions, generate

QUESTIONS = ["what is the colour of the circle ?", "where is the square ?", "what is the shape ?",
             "is the red circle left ?"]
N = 8


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=1, image_size=64)  # 64 image tokens


def _opts(policy):
    return {"decode": False} if policy == "tgv-kv" else None  # batched decoding is prefill-only


def _single(model, proc, item, policy, keep):
    return generate(model, proc, item.images, item.question, policy, keep, options=RunOptions(max_new_tokens=N),
                    capture=CaptureOptions(diagnostics=False, hidden_states=False), policy_options=_opts(policy))


@pytest.mark.parametrize("policy,keep", [(None, 1.0), ("tgv-kv", 1.0), ("tgv-kv", 0.5), ("tgv-kv", 0.1),
                                         ("tgv-kv", 0.05), ("pyramidkv", 0.3), ("snapkv", 0.1)])
def test_different_prompts_match_batch1_runs(llava, policy, keep):
    model, proc = llava
    items = [BatchItem([random_image(s, (64, 64))], q) for s, q in enumerate(QUESTIONS)]  # lengths differ
    res = generate_batch(model, proc, items, policy, keep, N, policy_options=_opts(policy), return_logits=True)
    assert len(set(res.prompt_lengths.tolist())) > 1
    for b, item in enumerate(items):
        one = _single(model, proc, item, policy, keep)
        assert res.token_ids[b].tolist() == one.token_ids.tolist()
        assert [k.tolist() for k in res.kept[b]] == [np.flatnonzero(m).tolist() for m in one.trace.kept_mask]
        g = len(one.token_ids)
        torch.testing.assert_close(res.step_logits[b, :g], one.step_logits, atol=1e-5, rtol=1e-5)
    assert np.array_equal(res.padded_lengths, res.budgets.max(axis=0))


def test_identical_prompts_give_identical_rows_and_batch1_tokens(llava):
    model, proc = llava
    item = BatchItem([random_image(11, (64, 64))], QUESTIONS[0])
    res = generate_batch(model, proc, [item] * 4, "tgv-kv", 0.1, N, policy_options=_opts("tgv-kv"))
    one = _single(model, proc, item, "tgv-kv", 0.1)
    for row in res.token_ids:
        assert row.tolist() == one.token_ids.tolist()
    assert res.padding_fraction == 0.0


def test_uneven_budgets_are_padded_per_layer_and_bytes_are_measured(llava):
    model, proc = llava
    items = [BatchItem([random_image(s, (64, 64))], q) for s, q in enumerate(QUESTIONS)]
    res = generate_batch(model, proc, items, "pyramidkv", 0.3, 4, ignore_eos=True)
    assert res.padding_fraction > 0 or len(set(res.padded_lengths.tolist())) > 1
    assert all(len(t) == 4 for t in res.token_ids)
    H, D, L = 2, 16, 3  # tiny_llava: 2 kv heads of 16 dims, 3 layers, fp32
    assert res.kv_bytes_batch_prompt == 2 * len(items) * H * D * 4 * int(res.padded_lengths.sum())
    assert res.kv_bytes_batch == res.kv_bytes_batch_prompt + 2 * len(items) * H * D * 4 * L * 4
    assert res.kv_bytes_kept == 2 * H * D * 4 * int(res.budgets.sum())
    assert res.kv_bytes_full == 2 * H * D * 4 * L * int(res.prompt_lengths.sum())


def test_rejects_bad_arguments(llava):
    model, proc = llava
    with pytest.raises(ValueError):
        generate_batch(model, proc, [], "tgv-kv", 0.1, 4)
    with pytest.raises(ValueError):
        generate_batch(model, proc, [BatchItem([random_image(0)], "what ?")], "tgv-kv", 0.0, 4)


@pytest.mark.parametrize("builder", ["tiny_qwen2_vl", "tiny_llava_next"])
def test_other_families_match_batch1_runs(builder):
    """Qwen2-VL: M-RoPE, the first generated position is T + rope_deltas; LLaVA-NeXT: anyres prompts of other lengths."""
    import tiny_families

    model, proc = getattr(tiny_families, builder)(seed=1)
    items = [BatchItem([random_image(s, (32 + 8 * s, 32))], q) for s, q in enumerate(QUESTIONS[:3])]
    for policy, keep in [(None, 1.0), ("tgv-kv", 0.1)]:
        res = generate_batch(model, proc, items, policy, keep, N, policy_options=_opts(policy))
        for b, item in enumerate(items):
            assert res.token_ids[b].tolist() == _single(model, proc, item, policy, keep).token_ids.tolist()


def test_sliding_window_models_are_refused():
    from tiny_families import tiny_gemma3

    model, proc = tiny_gemma3(seed=0)
    with pytest.raises(ValueError, match="sliding-window"):
        generate_batch(model, proc, [BatchItem([random_image(0)], QUESTIONS[0])], "tgv-kv", 0.1, 2)


def test_multi_token_append_on_the_packed_cache_equals_token_by_token(llava):
    """The per-layer validity mask combines with the causal mask when several tokens are appended at once."""
    from tgvkv.batch import PREFILL_OPTIONS, BatchCache, pack_caches, prefill_sample
    from tgvkv.steps import check_request
    from tgvkv.capture import Recorder, recording
    from tgvkv.policies import make_policy

    from tgvkv import hf_compat

    model, proc = llava
    hf_compat.enable_capture(model)
    items = [BatchItem([random_image(s, (64, 64))], q) for s, q in enumerate(QUESTIONS[:3])]
    pol = make_policy("pyramidkv")
    new = torch.tensor([[7, 8], [9, 10], [11, 12]])

    def packed():
        parts = [prefill_sample(model, proc, check_request(proc, it.images, it.question, pol, 0.3, PREFILL_OPTIONS))
                 for it in items]
        masks: dict = {}
        layers, _, _ = pack_caches([p.cache for p in parts], 4)
        starts = torch.tensor([p.start for p in parts])
        return BatchCache(layers, masks), masks, starts

    cache, masks, starts = packed()
    with torch.inference_mode(), recording(Recorder(key_masks=masks)):
        both = model(input_ids=new, position_ids=starts[:, None] + torch.arange(2), past_key_values=cache).logits
    cache, masks, starts = packed()
    with torch.inference_mode(), recording(Recorder(key_masks=masks)):
        one = [model(input_ids=new[:, i : i + 1], position_ids=starts[:, None] + i, past_key_values=cache).logits
               for i in range(2)]
    torch.testing.assert_close(both, torch.cat(one, dim=1), atol=1e-5, rtol=1e-5)
