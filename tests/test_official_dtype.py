"""tgv-kv with precision="model": the official code's arithmetic in a bf16 / fp16 model's own dtype.

Checked three ways: the dtype rounding against torch itself; hand-computed cases (bf16 text scores that tie at
100.0 / 100.5, a budget moved by bf16 quantisation); and tiny bf16 / fp16 models, where the engine's kept positions
equal the official `_prefill` run by torch in that dtype on the model's own eager attention maps.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from official_reference import official_prefill
from tiny_models import attn, random_image, tiny_llava

import tgvkv
from tgvkv import hf_compat
from tgvkv.generation import CaptureOptions, RunOptions, generate
from tgvkv.policies.official_dtype import round_to

Q = "what is the colour of the circle ?"


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                                 ("float32", torch.float32)])
def test_rounding_equals_torch(dtype, torch_dtype):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 2000), rng.uniform(90, 110, 2000), rng.uniform(0, 1e-3, 1000)])
    ours = round_to(x, dtype)
    theirs = torch.tensor(x, dtype=torch.float64).float().to(torch_dtype).double().numpy()
    assert np.array_equal(ours, theirs)


def test_bf16_hand_values_around_the_text_offset():
    # bf16 has 8 significant bits: between 64 and 128 its values are 0.5 apart
    values = [100.2, 100.3, 100.6, 100.74, 100.75, 101.25]
    assert round_to(values, "bfloat16").tolist() == [100.0, 100.5, 100.5, 100.5, 101.0, 101.0]
    # fp16 (11 bits): 1/16 apart there
    assert round_to([100.3, 100.6], "float16").tolist() == [100.3125, 100.625]


def _example(text_cols: list[float]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """One layer, T = 12: positions 0-3 pre-text, 4-7 vision, 8-11 text. Text keys 8, 9, 10 receive the given column
    sums (each text key's attention comes from the last query, 11); vision keys get a little from every text query."""
    T = 12
    a = np.zeros((T, T))
    for q in range(T):
        a[q, 0] = 1.0  # pre-text / sink column
    for q in range(8, T):
        a[q, 0] = 0.6
        a[q, 4:8] = 0.05  # text -> vision, TI
        a[q, q] = 0.2
    a[11, 8:11] = text_cols
    a[11, 0] = 1.0 - a[11, 1:].sum()
    return a, [(4, 8)]


def test_bf16_text_scores_tie_at_100_5_and_change_which_text_token_is_evicted():
    """Text keys 8, 9, 10 get column sums 0.75, 0.5, 0.3 (0.2 from their own query each): +100 gives 100.75, 100.5,
    100.3 in float64, but 101.0, 100.5, 100.5 in bf16. With one text token to evict (forget 5 = 4 vision + 1), float64
    evicts key 10 (100.3); bf16 ties keys 9 and 10 and evicts the lower position, 9."""
    attn_map, spans = _example([0.55, 0.3, 0.1])
    f64 = tgvkv.run_selection("tgv-kv", [attn_map], spans, 1 - 5 / 12)
    bf16 = tgvkv.run_selection("tgv-kv", [attn_map], spans, 1 - 5 / 12, precision="bfloat16")
    assert f64.info["forget"].tolist() == bf16.info["forget"].tolist() == [5]
    assert bf16.scores[0, 8:11].tolist() == [101.0, 100.5, 100.5]
    assert f64.scores[0, 8:11].tolist() == pytest.approx([100.75, 100.5, 100.3])
    assert f64.kept[0].tolist() == [0, 1, 2, 3, 8, 9, 11]
    assert bf16.kept[0].tolist() == [0, 1, 2, 3, 8, 10, 11]
    # two text tokens to evict (forget 6): both rules evict 9 and 10, in a different order
    two = tgvkv.run_selection("tgv-kv", [attn_map], spans, 0.5, precision="bfloat16")
    assert two.kept[0].tolist() == [0, 1, 2, 3, 8, 11]


def test_bf16_budget_quantisation_hand_case():
    """One layer, T = 301, keep 0.1: official bf16 arithmetic 301 * 0.1 = 30.1 -> 30.125; 301 - 30.125 = 270.875 ->
    270 (bf16 steps of 2 there); 270 / 301 = 0.89701 -> 0.8984375 (steps of 2^-8): forget round(0.8984375 * 301) =
    round(270.43) = 270, one token fewer than float64's round(0.9 * 301) = round(270.9) = 271."""
    T = 301
    a = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    spans = [(4, 200)]
    bf16 = tgvkv.run_selection("tgv-kv", [a], spans, 0.1, precision="bfloat16")
    f64 = tgvkv.run_selection("tgv-kv", [a], spans, 0.1)
    assert bf16.info["layer_ratio"].tolist() == [0.8984375] and bf16.info["forget"].tolist() == [270]
    assert f64.info["layer_ratio"].tolist() == [np.float32(0.9)] and f64.info["forget"].tolist() == [271]
    assert bf16.budgets.tolist() == [31] and f64.budgets.tolist() == [30]


def test_model_precision_needs_dtype_statistics():
    attn_map, spans = _example([0.5, 0.3, 0.1])
    with pytest.raises(ValueError, match="precision='model' needs attention statistics captured in the model dtype"):
        tgvkv.run_selection("tgv-kv", [attn_map], spans, 0.5, precision="model")
    with pytest.raises(ValueError, match="precision must be one of"):
        tgvkv.make_policy("tgv-kv", precision="bf16")


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16])
def low_precision_llava(request):
    model, proc = tiny_llava(seed=4, layers=3)
    return model.to(request.param), proc, request.param


@pytest.mark.parametrize("keep", [0.1, 0.3, 0.5])
def test_engine_with_model_precision_equals_the_official_prefill_in_that_dtype(low_precision_llava, keep):
    model, proc, dtype = low_precision_llava
    img = random_image(5)
    inputs = hf_compat.process_inputs(proc, [img], hf_compat.render_prompt(proc, Q, 1), torch.device("cpu"), dtype)
    with attn(model, "eager"), torch.inference_mode():
        maps = model(**inputs, output_attentions=True).attentions
    assert maps[0].dtype == dtype
    ids = inputs["input_ids"][0].numpy()
    vision = np.flatnonzero(ids == model.config.image_token_id)
    forget, kept, score_sum = official_prefill(list(maps), int(vision[0]), len(vision), keep)
    for path in ("tgvkv", "tgvkv_eager"):
        with attn(model, path):
            res = generate(model, proc, [img], Q, "tgv-kv", keep, options=RunOptions(max_new_tokens=4),
                           policy_options={"precision": "model"},
                           capture=CaptureOptions(diagnostics=False, hidden_states=False))
        tr = res.trace
        assert tr.selection_info["forget"].tolist() == forget.tolist(), path
        assert [tr.kept_positions(l).tolist() for l in range(3)] == [k.tolist() for k in kept], path
        text = tr.layout.text_positions
        np.testing.assert_array_equal(tr.scores[:, text], score_sum[:, 0, text].float().numpy())
    if dtype == torch.bfloat16:  # text scores sit on bf16's grid of 0.5 around 100: ties
        assert np.all(np.isin(tr.scores[:, text] % 0.5, [0.0]))
