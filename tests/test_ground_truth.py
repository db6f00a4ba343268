"""Ground truth for the evicting engine, at full strength: for every registered policy, with decode eviction on, on
a 3-layer model with different kept sets per layer, the logits of every decode step (answer and follow-up turn,
official and strict protocols) equal one cache-free forward over the whole conversation in which each layer's
queries see exactly the keys that layer's cache held at that step (per-layer, per-step masks, original positions).

The masks are rebuilt from what the trace records (kept prompt positions per layer, every decode eviction with its
step), so a wrong slot bookkeeping, a wrong position or an eviction applied at the wrong step all show up.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import attn, random_image, tiny_llava
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from tgvkv import hf_compat
from tgvkv.generation import CaptureOptions, RunOptions, generate
from tgvkv.policies import POLICIES

Q, FOLLOWUP = "what is the colour of the circle ?", "where is the square ?"
KEEP = 0.3
# options that make the small prompt exercise each method (windows shorter than the text, a PrefixKV slot in range)
OPTIONS = {"snapkv": {"window_size": 4}, "pyramidkv": {"window_size": 4}, "tgv-ablation": {"window_size": 4},
           "tgv-uniform-window": {"window_size": 4}, "prefixkv": {"distance": -3}, "random": {"seed": 5}}
_MASKS: dict[int, torch.Tensor] = {}  # layer -> (Q, K) bool, read by the reference attention below


def _per_layer_masked_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager attention that ignores the model's mask and uses this layer's own (queries x keys) mask."""
    allowed = _MASKS[module.layer_idx]
    n_rep = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = torch.matmul(query, k.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    scores = scores.masked_fill(~allowed[None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), None


AttentionInterface.register("gt_per_layer", _per_layer_masked_attention)
AttentionMaskInterface.register("gt_per_layer", eager_mask)


def _decode_options(method: str) -> dict:
    names = {f.name for f in dataclasses.fields(POLICIES[method])}
    opts = dict(OPTIONS.get(method, {}))
    if "decode" in names and method != "full":
        opts["decode"] = True
    return opts


def _conversation(proc, res, eos: int) -> tuple[list[int], int]:
    """Ids of the whole conversation as the engine fed them, and where the follow-up's answer starts."""
    answer = res.token_ids.tolist()
    ids = res.trace.prompt_ids.tolist() + answer
    if not answer or answer[-1] != eos:
        ids.append(eos)  # the template closes the assistant turn with EOS
    suffix = hf_compat.followup_suffix(proc, Q, 1, res.text, FOLLOWUP)
    ids += proc.tokenizer(suffix, add_special_tokens=False)["input_ids"]
    return ids + res.trace.followup_ids.tolist(), len(ids)


def _masks(trace, length: int, protocol: str) -> dict[int, torch.Tensor]:
    """Per layer, (length x length): prompt rows causal and full (prefill); every later row sees the kept prompt
    positions (strict: and the re-run last prompt position), everything appended since, minus the positions
    evicted at decode before that row's forward (an eviction logged at step s precedes the forward at T + s)."""
    T = trace.seq_len
    start = T if protocol == "official" else T - 1
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    out = {}
    for layer in range(trace.num_layers):
        seen = torch.zeros(length, dtype=torch.bool)
        seen[:T] = torch.as_tensor(trace.kept_mask[layer])
        seen[start:] = True  # appended after eviction (strict: the last prompt position again)
        allowed = causal.clone()
        allowed[start:] &= seen[None, :]
        for step, ev_layer, position in trace.decode_evictions.tolist():
            if ev_layer == layer:
                allowed[T + step :, position] = False
        out[layer] = allowed
    return out


@pytest.fixture(scope="module")
def llava():
    model, proc = tiny_llava(seed=2, layers=3)
    return model, proc, random_image(9)


@pytest.mark.parametrize("protocol", ["official", "strict"])
@pytest.mark.parametrize("method", sorted(POLICIES))
def test_decode_logits_equal_per_layer_masked_full_forward(llava, method, protocol):
    model, proc, img = llava
    opts = RunOptions(max_new_tokens=6, protocol=protocol, followup=FOLLOWUP, followup_max_new_tokens=4)
    res = generate(model, proc, [img], Q, method, KEEP, options=opts, policy_options=_decode_options(method),
                   capture=CaptureOptions(diagnostics=False, hidden_states=False))
    tr = res.trace
    T, G, F = tr.seq_len, len(res.token_ids), len(tr.followup_ids)
    assert G >= 3 and F >= 2  # at least two decode steps per turn
    if method != "full":
        assert len(set(tuple(np.flatnonzero(m)) for m in tr.kept_mask)) > 1 or tr.budgets.min() < T
    ids, f_start = _conversation(proc, res, int(model.generation_config.eos_token_id))
    ids = ids[:-1]  # the last follow-up token is never fed
    _MASKS.clear()
    _MASKS.update(_masks(tr, len(ids), protocol))
    prompt = hf_compat.render_prompt(proc, Q, 1)
    inputs = hf_compat.process_inputs(proc, [img], prompt, torch.device("cpu"), torch.float32)
    with attn(model, "gt_per_layer"), torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), pixel_values=inputs["pixel_values"],
                    position_ids=torch.arange(len(ids))[None])
    reference = out.logits[0]
    np.testing.assert_allclose(res.step_logits.numpy(), reference[T - 1 : T - 1 + G].numpy(), atol=1e-4)
    np.testing.assert_allclose(res.followup_step_logits.numpy(), reference[f_start - 1 : f_start - 1 + F].numpy(),
                               atol=1e-4)
    if method != "full" and _decode_options(method).get("decode"):
        assert len(tr.decode_evictions) > 0, "decode eviction never happened: the test would not see a decode bug"
        assert tr.decode_evictions[:, 0].max() >= G  # evictions in the follow-up turn too


def test_masks_would_catch_a_decode_eviction_applied_one_step_late(llava):
    """The reference is sharp: shifting every decode eviction by one step changes the logits beyond the tolerance."""
    model, proc, img = llava
    opts = RunOptions(max_new_tokens=8, followup=FOLLOWUP, followup_max_new_tokens=6)
    res = generate(model, proc, [img], Q, "tgv-kv", KEEP, options=opts,
                   capture=CaptureOptions(diagnostics=False, hidden_states=False))
    tr = res.trace
    ids, _ = _conversation(proc, res, int(model.generation_config.eos_token_id))
    late = dataclasses.replace(tr, decode_evictions=tr.decode_evictions + np.array([1, 0, 0]))
    _MASKS.clear()
    _MASKS.update(_masks(late, len(ids) - 1, "official"))
    prompt = hf_compat.render_prompt(proc, Q, 1)
    inputs = hf_compat.process_inputs(proc, [img], prompt, torch.device("cpu"), torch.float32)
    with attn(model, "gt_per_layer"), torch.inference_mode():
        out = model(input_ids=torch.tensor([ids[:-1]]), pixel_values=inputs["pixel_values"],
                    position_ids=torch.arange(len(ids) - 1)[None])
    T, G = tr.seq_len, len(res.token_ids)
    assert np.abs(res.step_logits.numpy() - out.logits[0, T - 1 : T - 1 + G].numpy()).max() > 1e-3
