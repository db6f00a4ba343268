"""Engine on a tiny random-weight LLaVA: parity with plain generate, SDPA vs eager, budgets, bytes, positions."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from tiny_models import attn, random_image, tiny_llava

import tgvkv
from tgvkv import hf_compat
from tgvkv.generation import CaptureOptions, RunOptions, generate

Q = "what is the colour of the circle ?"
FOLLOWUP = "where is the square ?"


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=1)


def plain_generate(model, proc, images, prompt: str, n: int) -> list[int]:
    inputs = hf_compat.process_inputs(proc, images, prompt, torch.device("cpu"), torch.float32)
    with attn(model, "sdpa"), torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("seed", [3, 4, 5])
@pytest.mark.parametrize("protocol", ["official", "strict"])
def test_full_budget_reproduces_plain_generate(llava, seed, protocol):
    model, proc = llava
    img = random_image(seed)
    expected = plain_generate(model, proc, [img], hf_compat.render_prompt(proc, Q, 1), 12)
    res = generate(model, proc, [img], Q, "tgv-kv", 1.0, options=RunOptions(max_new_tokens=12, protocol=protocol))
    assert res.token_ids.tolist() == expected
    assert res.trace.budgets.tolist() == [res.trace.seq_len] * 3
    assert len(res.trace.decode_evictions) == 0


def test_followup_at_full_budget_matches_plain_generate_of_the_conversation(llava):
    model, proc = llava
    img = random_image(7)
    res = generate(model, proc, [img], Q, "tgv-kv", 1.0, options=RunOptions(max_new_tokens=6, followup=FOLLOWUP))
    conversation = hf_compat.render_prompt(proc, Q, 1) + hf_compat.followup_suffix(proc, Q, 1, res.text, FOLLOWUP)
    expected = plain_generate(model, proc, [img], conversation, 6)
    assert res.trace.followup_ids.tolist() == expected


@pytest.mark.parametrize("keep", [0.05, 0.1, 0.3, 0.5])
def test_sdpa_and_eager_paths_agree(llava, keep):
    model, proc = llava
    img = random_image(11)
    opts = RunOptions(max_new_tokens=12, followup=FOLLOWUP)
    with attn(model, "tgvkv"):
        a = generate(model, proc, [img], Q, "tgv-kv", keep, options=opts)
    with attn(model, "tgvkv_eager"):
        b = generate(model, proc, [img], Q, "tgv-kv", keep, options=opts)
    assert a.token_ids.tolist() == b.token_ids.tolist()
    assert a.trace.followup_ids.tolist() == b.trace.followup_ids.tolist()
    np.testing.assert_allclose(a.trace.query_rows, b.trace.query_rows, atol=1e-5)
    np.testing.assert_allclose(a.trace.column_sums, b.trace.column_sums, atol=1e-5)
    np.testing.assert_allclose(a.trace.attention_maps.astype(np.float32), b.trace.attention_maps.astype(np.float32), atol=1e-3)
    assert np.array_equal(a.trace.kept_mask, b.trace.kept_mask)
    assert np.array_equal(a.trace.decode_evictions, b.trace.decode_evictions)


def eager_head_mean_attention(model, proc, img, question):
    """Reference statistics: transformers' own eager attention with output_attentions, head-averaged per layer."""
    inputs = hf_compat.process_inputs(proc, [img], hf_compat.render_prompt(proc, question, 1), torch.device("cpu"), torch.float32)
    with attn(model, "eager"), torch.inference_mode():
        out = model(**inputs, output_attentions=True)
    return [a[0].mean(0) for a in out.attentions], inputs["input_ids"]


@pytest.mark.parametrize("keep", [0.05, 0.2, 0.5])
def test_cache_lengths_and_bytes_equal_layer_budgets(llava, keep):
    model, proc = llava
    img = random_image(21)
    attentions, ids = eager_head_mean_attention(model, proc, img, Q)
    spans = [(int(s), int(e)) for s, e in tgvkv.layout.contiguous_runs((ids[0] == model.config.image_token_id).numpy())]
    budgets = tgvkv.layer_budgets("tgv-kv", attentions, spans, keep)
    kept = tgvkv.select("tgv-kv", attentions, spans, keep)
    res = generate(model, proc, [img], Q, "tgv-kv", keep, options=RunOptions(max_new_tokens=1))  # no decode forward
    tr = res.trace
    assert tr.budgets.tolist() == budgets.tolist()
    assert tr.cache_len_final.tolist() == budgets.tolist()
    for l in range(tr.num_layers):
        assert tr.kept_positions(l).tolist() == kept[l].tolist()
    text_cfg = model.config.text_config
    per_token = 2 * text_cfg.num_key_value_heads * (text_cfg.hidden_size // text_cfg.num_attention_heads) * 4  # K+V fp32
    assert tr.kv_bytes_full.tolist() == [tr.seq_len * per_token] * tr.num_layers
    assert tr.kv_bytes_kept.tolist() == (budgets * per_token).tolist()
    if keep <= 0.2:
        assert tr.kv_bytes_kept.sum() < 0.5 * tr.kv_bytes_full.sum()


def _capture_decode_positions(model):
    """Record the RoPE cos table each decode forward hands to decoder layer 0 (it is a function of the position)."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        cos = kwargs["position_embeddings"][0]
        if cos.shape[-2] == 1:
            seen.append(cos.detach().clone())

    handle = model.model.language_model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("protocol", ["official", "strict"])
def test_decode_positions_unchanged_by_eviction(llava, protocol):
    model, proc = llava
    img = random_image(6)  # an input whose answers run the full 8 tokens in both runs
    runs = {}
    for keep in (1.0, 0.1):
        seen, handle = _capture_decode_positions(model)
        try:
            res = generate(model, proc, [img], Q, "tgv-kv", keep, options=RunOptions(max_new_tokens=8, protocol=protocol))
        finally:
            handle.remove()
        runs[keep] = (seen, res)
    full, evicted = runs[1.0][0], runs[0.1][0]
    n = min(len(full), len(evicted))
    assert n >= 3
    assert evicted[0].shape == full[0].shape
    for a, b in zip(full[:n], evicted[:n]):
        assert torch.equal(a, b)
    assert runs[0.1][1].trace.cache_len_final.max() < runs[0.1][1].trace.seq_len  # eviction really happened


def test_decode_logits_equal_masked_full_forward():
    """Ground truth: decoding on the evicted cache == a cache-free forward where new tokens see only kept KV."""
    model, proc = tiny_llava(seed=2, layers=1)  # one layer: one kept set, expressible as one 4-D mask
    img = random_image(9)
    res = generate(model, proc, [img], Q, "tgv-kv", 0.2, options=RunOptions(max_new_tokens=6), policy_options={"decode": False})
    tr = res.trace
    T, G = tr.seq_len, len(res.token_ids)
    ids = torch.tensor(np.concatenate([tr.prompt_ids, res.token_ids[:-1]]))[None]
    allowed = torch.tril(torch.ones(T + G - 1, T + G - 1, dtype=torch.bool))
    allowed[T:, :T] &= torch.as_tensor(tr.kept_mask[0])[None, :]  # generated tokens see only kept prompt KV
    mask = torch.zeros(1, 1, T + G - 1, T + G - 1).masked_fill(~allowed, torch.finfo(torch.float32).min)
    inputs = hf_compat.process_inputs(proc, [img], hf_compat.render_prompt(proc, Q, 1), torch.device("cpu"), torch.float32)
    with attn(model, "tgvkv_eager"), torch.inference_mode():
        out = model(input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=mask,
                    position_ids=torch.arange(T + G - 1)[None])
    reference = out.logits[0, T - 1 :]  # logits that predicted each generated token
    assert G >= 3
    np.testing.assert_allclose(res.step_logits.numpy(), reference.numpy(), atol=1e-4)


def test_evicted_tensors_are_released(llava):
    model, proc = llava
    res = generate(model, proc, [random_image(1)], Q, "tgv-kv", 0.05, options=RunOptions(max_new_tokens=1))
    tr = res.trace
    # storage bytes (not views of the old buffer): kept bytes scale with the budget exactly
    assert (tr.kv_bytes_kept / tr.budgets).tolist() == (tr.kv_bytes_full / tr.seq_len).tolist()


def test_trace_round_trips_json_and_npz(llava, tmp_path):
    model, proc = llava
    res = generate(model, proc, [random_image(2)], Q, "tgv-kv", 0.2, options=RunOptions(max_new_tokens=5, followup=FOLLOWUP))
    for suffix in (".npz", ".json"):
        path = res.trace.save(tmp_path / f"trace{suffix}")
        back = tgvkv.Trace.load(path)
        a_meta, a_arr = res.trace.to_parts()
        b_meta, b_arr = back.to_parts()
        assert a_meta == b_meta
        assert sorted(a_arr) == sorted(b_arr)
        for k in a_arr:
            assert a_arr[k].dtype == b_arr[k].dtype, k
            np.testing.assert_array_equal(a_arr[k], b_arr[k], err_msg=k)


def test_block_sums_partition_the_attention(llava):
    model, proc = llava
    res = generate(model, proc, [random_image(2)], Q, "tgv-kv", 0.2, options=RunOptions(max_new_tokens=2))
    tr = res.trace
    maps = tr.attention_maps.astype(np.float64)
    vis = tr.layout.is_vision
    for l in range(tr.num_layers):
        expected = [[maps[l][~vis][:, ~vis].sum(), maps[l][~vis][:, vis].sum()], [maps[l][vis][:, ~vis].sum(), maps[l][vis][:, vis].sum()]]
        np.testing.assert_allclose(tr.block_sums[l], expected, rtol=2e-3)
        assert tr.block_sums[l].sum() == pytest.approx(tr.seq_len, rel=1e-4)  # every row sums to 1


def test_bad_inputs_raise_clear_errors(llava):
    model, proc = llava
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="has no `image_token_id`"):
        hf_compat.model_facts(LlamaConfig())
    attn_mats = [np.tril(np.ones((10, 10))) / np.arange(1, 11)[:, None]] * 2
    with pytest.raises(ValueError, match="outside the sequence"):
        tgvkv.select("tgv-kv", attn_mats, [(5, 12)], 0.5)
    with pytest.raises(ValueError, match="outside the sequence"):
        tgvkv.select("tgv-kv", attn_mats, [(-1, 3)], 0.5)
    for bad in (0.0, -0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match="keep_ratio must be"):
            tgvkv.select("tgv-kv", attn_mats, [(2, 6)], bad)
        with pytest.raises(ValueError, match="keep_ratio must be"):
            generate(model, proc, [random_image(0)], Q, "tgv-kv", bad)
    with pytest.raises(ValueError, match="unknown method"):
        tgvkv.select("no-such-method", attn_mats, [(2, 6)], 0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        RunOptions(max_new_tokens=0)
    with pytest.raises(ValueError, match="question is empty"):
        generate(model, proc, [random_image(0)], "   ", "tgv-kv", 0.5)


def test_diagnostics_off_still_evicts_identically(llava):
    model, proc = llava
    img = random_image(8)
    a = generate(model, proc, [img], Q, "tgv-kv", 0.1, options=RunOptions(max_new_tokens=8))
    b = generate(model, proc, [img], Q, "tgv-kv", 0.1, options=RunOptions(max_new_tokens=8),
                 capture=CaptureOptions(diagnostics=False, hidden_states=False))
    assert a.token_ids.tolist() == b.token_ids.tolist()
    assert np.array_equal(a.trace.kept_mask, b.trace.kept_mask)
    assert b.trace.attention_maps is None and b.trace.block_sums is None


def test_first_token_uses_the_models_generation_settings():
    """Repetition penalty (set by e.g. Qwen2-VL checkpoints) applies to the first token too: parity with plain generate."""
    model, proc = tiny_llava(seed=1)
    model.generation_config.repetition_penalty = 3.0
    img = random_image(3)
    expected = plain_generate(model, proc, [img], hf_compat.render_prompt(proc, Q, 1), 10)
    res = generate(model, proc, [img], Q, "tgv-kv", 1.0, options=RunOptions(max_new_tokens=10))
    assert res.token_ids.tolist() == expected
    model.generation_config.repetition_penalty = 1.0
    assert generate(model, proc, [img], Q, "tgv-kv", 1.0, options=RunOptions(max_new_tokens=10)).token_ids.tolist() != expected


def test_seeded_sampling_matches_plain_generate(llava):
    model, proc = llava
    img = random_image(4)
    inputs = hf_compat.process_inputs(proc, [img], hf_compat.render_prompt(proc, Q, 1), torch.device("cpu"), torch.float32)
    torch.manual_seed(123)
    with attn(model, "sdpa"), torch.inference_mode():
        plain = model.generate(**inputs, max_new_tokens=10, do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    expected = plain[0, inputs["input_ids"].shape[1] :].tolist()
    opts = RunOptions(max_new_tokens=10, do_sample=True, seed=123)
    assert generate(model, proc, [img], Q, "tgv-kv", 1.0, options=opts).token_ids.tolist() == expected
