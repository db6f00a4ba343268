"""The engine on every supported family (tiny random-weight models built from configs, processors via AutoProcessor).

Per family: keep_ratio 1.0 reproduces plain `generate` token for token; the SDPA capture path and the eager
reference agree; decode positions (RoPE cos tables, and M-RoPE 3-D ids where the family has them) after eviction
equal the ones without eviction; the layout maps every vision token to a grid cell of the right view.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import tiny_families as tf
from tiny_models import attn, random_image

from tgvkv import hf_compat
from tgvkv.generation import RunOptions, build_layout, generate

Q = "what is the colour of the circle ?"
CPU = torch.device("cpu")

# family -> (builder, image sizes (width, height) for one prompt[, video clips (frames, height, width)])
FAMILIES = {
    "llava_next": (tf.tiny_llava_next, [(60, 30)]),
    "llava_onevision": (tf.tiny_onevision, [(50, 40)]),
    "llava_onevision_2img": (tf.tiny_onevision, [(50, 40), (30, 64)]),
    "llava_next_2img": (tf.tiny_llava_next, [(60, 30), (30, 44)]),
    "qwen2_vl": (tf.tiny_qwen2_vl, [(40, 24)]),
    "qwen2_5_vl": (tf.tiny_qwen2_5_vl, [(24, 40)]),
    "qwen2_vl_2img": (tf.tiny_qwen2_vl, [(40, 24), (16, 32)]),
    "qwen3_vl": (tf.tiny_qwen3_vl, [(40, 24)]),
    "idefics3": (tf.tiny_idefics3, [(48, 16)]),
    "smolvlm": (tf.tiny_smolvlm, [(20, 36)]),
    "smolvlm_video": (tf.tiny_smolvlm, [], [(3, 24, 40)]),
    "gemma3": (tf.tiny_gemma3, [(48, 20)]),
    "gemma3_2img": (tf.tiny_gemma3, [(48, 20), (20, 30)]),
    "onevision_video": (tf.tiny_onevision, [], [(4, 24, 40)]),
    "onevision_image_video": (tf.tiny_onevision, [(30, 20)], [(2, 24, 40)]),
    "qwen2_vl_video": (tf.tiny_qwen2_vl, [], [(4, 24, 40)]),
    "qwen2_5_vl_image_video": (tf.tiny_qwen2_5_vl, [(24, 40)], [(4, 16, 32)]),
    "qwen3_vl_video": (tf.tiny_qwen3_vl, [], [(4, 24, 40)]),
}
NEEDS = {"smolvlm": "num2words", "smolvlm_video": "num2words"}  # SmolVLMProcessor imports it, as for hub checkpoints


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    if request.param in NEEDS:
        pytest.importorskip(NEEDS[request.param])
    build, sizes, *clips = FAMILIES[request.param]
    model, proc = build()
    images = [random_image(10 + i, s) for i, s in enumerate(sizes)]
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 255, (*shape, 3), dtype=np.uint8) for shape in (clips[0] if clips else [])]
    return request.param, model, proc, images, videos


def plain_generate(model, proc, images, question: str, n: int, videos=()) -> list[int]:
    prompt = hf_compat.render_prompt(proc, question, len(images), len(videos))
    inputs = hf_compat.process_inputs(proc, images, prompt, CPU, torch.float32, videos=list(videos))
    with attn(model, "sdpa"), torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def decoder_layers(model):
    return model.get_decoder().layers


@pytest.mark.parametrize("protocol", ["official", "strict"])
def test_full_budget_reproduces_plain_generate(family, protocol):
    name, model, proc, images, videos = family
    expected = plain_generate(model, proc, images, Q, 8, videos)
    res = generate(model, proc, images, Q, "tgv-kv", 1.0, options=RunOptions(max_new_tokens=8, protocol=protocol), videos=videos)
    assert res.token_ids.tolist() == expected[: len(res.token_ids)]
    assert len(res.token_ids) >= 3
    assert res.trace.budgets.tolist() == [res.trace.seq_len] * res.trace.num_layers


def test_sdpa_and_eager_paths_agree(family):
    name, model, proc, images, videos = family
    opts = RunOptions(max_new_tokens=8)
    hf_compat.enable_capture(model)
    a = generate(model, proc, images, Q, "tgv-kv", 0.3, options=opts, videos=videos)
    hf_compat.enable_capture(model, eager_reference=True)
    try:
        b = generate(model, proc, images, Q, "tgv-kv", 0.3, options=opts, videos=videos)
    finally:
        hf_compat.enable_capture(model)
    assert a.token_ids.tolist() == b.token_ids.tolist()
    np.testing.assert_allclose(a.trace.query_rows, b.trace.query_rows, atol=1e-6)
    np.testing.assert_allclose(a.trace.column_sums, b.trace.column_sums, atol=1e-5)
    assert np.array_equal(a.trace.kept_mask, b.trace.kept_mask)
    assert a.trace.kept_mask.sum() < a.trace.kept_mask.size  # something was evicted


def _capture_decode(model):
    """Per decode forward: (position_ids given to the language model (3-D for M-RoPE; None when it derives them),
    position_ids given to decoder layer 0, RoPE cos given to decoder layer 0)."""
    seen: list[tuple] = []
    lm_ids: list = []

    def lm_hook(module, args, kwargs):
        pid = kwargs.get("position_ids")
        lm_ids.append(None if pid is None else pid.detach().clone())

    def hook(module, args, kwargs):
        cos = kwargs["position_embeddings"][0]
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if hs.shape[-2] == 1:
            pid = kwargs.get("position_ids")
            seen.append((lm_ids[-1], None if pid is None else pid.detach().clone(), cos.detach().clone()))

    handles = [model.get_decoder().register_forward_pre_hook(lm_hook, with_kwargs=True),
               decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)]
    return seen, handles


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("mode", ["generate", "teacher"])
@pytest.mark.parametrize("protocol", ["official", "strict"])
def test_decode_positions_unchanged_by_eviction(family, protocol, mode):
    """model.generate on the evicting cache (free decoding) and manual forwards without position ids (teacher):
    the positions (3-D M-RoPE ids included) and RoPE tables at keep 0.3 equal those at keep 1.0, and (official
    protocol) those of plain `model.generate` on the same prompt."""
    name, model, proc, images, videos = family
    runs = {}
    for keep in (1.0, 0.3):
        seen, handles = _capture_decode(model)
        try:
            res = generate(model, proc, images, Q, "tgv-kv", keep, options=RunOptions(max_new_tokens=6, protocol=protocol),
                           teacher_tokens=[5, 6, 7, 8, 9, 10] if mode == "teacher" else None, videos=videos)
        finally:
            [h.remove() for h in handles]
        runs[keep] = (seen, res)
    full, evicted = runs[1.0][0], runs[0.3][0]
    n = min(len(full), len(evicted))
    assert n >= 3 and (mode == "generate" or len(full) == len(evicted))
    for a, b in zip(full[:n], evicted[:n]):
        assert all(_same(x, y) for x, y in zip(a, b))
    T = runs[1.0][1].trace.seq_len
    assert runs[0.3][1].trace.cache_len_final.max() < T  # eviction really happened
    if protocol == "official":  # ground truth: plain generate's decode steps use the same RoPE tables
        seen, handles = _capture_decode(model)
        try:
            plain_generate(model, proc, images, Q, 6, videos)
        finally:
            [h.remove() for h in handles]
        for a, b in zip(seen[:n], full[:n]):
            assert torch.equal(a[2], b[2])


def test_every_vision_token_has_a_cell_or_is_a_layout_token(family):
    name, model, proc, images, videos = family
    prompt = hf_compat.render_prompt(proc, Q, len(images), len(videos))
    inputs = hf_compat.process_inputs(proc, images, prompt, CPU, torch.float32, videos=videos)
    layout = build_layout(model.config, proc, inputs["input_ids"], inputs, images, videos)
    assert layout.image_sizes == [im.size for im in images] + [(v.shape[2], v.shape[1]) for v in videos]
    m = layout.token_map
    assert m.positions.tolist() == layout.vision_positions.tolist()
    # images first, then videos (image_index = number of images + video index)
    assert sorted(set(m.image_index.tolist())) == list(range(len(images) + len(videos)))
    for v in range(len(videos)):
        frames = [view for view in layout.views if view.image_index == len(images) + v]
        assert frames and all(view.name.startswith(f"video {v + 1} frame") for view in frames)
    cells = set()
    for v, r, c in zip(m.view_index, m.row, m.col):
        if v >= 0:
            view = layout.views[v]
            assert 0 <= r < view.rows and 0 <= c < view.cols
            cells.add((int(v), int(r), int(c)))
    assert len(cells) == sum(v.rows * v.cols for v in layout.views)  # every cell exactly once


def test_unsupported_architectures_raise_naming_what_is_missing():
    from transformers import LlamaConfig, LlavaConfig, MllamaConfig, T5Config

    with pytest.raises(ValueError, match="no `image_token_id`"):
        hf_compat.model_facts(LlamaConfig(num_hidden_layers=2))  # a text-only LLM
    with pytest.raises(ValueError, match="cross-attention layers"):
        hf_compat.model_facts(MllamaConfig())
    t5 = T5Config()
    t5.image_token_id = 5
    with pytest.raises(ValueError, match="encoder-decoder"):
        hf_compat.model_facts(t5)
    hybrid = LlavaConfig(text_config=LlamaConfig(num_hidden_layers=2))
    hybrid.text_config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match=r"layers of type \['linear_attention'\]"):
        hf_compat.model_facts(hybrid)
    hybrid.text_config.layer_types = ["sliding_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="no full-attention language layer"):
        hf_compat.model_facts(hybrid)


def test_hub_models_cover_every_family_with_geometry():
    from tgvkv.families import FAMILY_NOTES, HUB_MODELS, supported_families

    assert set(HUB_MODELS) == set(FAMILY_NOTES) and set(HUB_MODELS) <= set(supported_families())
    assert all(ids and all("/" in i for i in ids) for ids in HUB_MODELS.values())
    assert "llava-hf/llava-1.5-7b-hf" in HUB_MODELS["llava"] and "google/gemma-3-4b-it" in HUB_MODELS["gemma3"]


FOLLOWUP = "where is the square ?"


def test_followup_at_full_budget_matches_plain_generate_of_the_conversation(family):
    """A second user turn appended to the cache (multi-token append; M-RoPE continues from rope_deltas) equals
    plain `generate` on the same conversation ids (prompt + answer + EOS + turn-2 suffix) with the images."""
    name, model, proc, images, videos = family
    facts = hf_compat.model_facts(model.config)
    vision_ids = ({facts.image_token_id} if images else set()) | ({facts.video_token_id} if videos else set())
    for q in (Q, "where is the square ?", "what is the shape ?", "describe this image ."):
        # random weights sometimes emit an image-pad id; re-encoding that answer would ask for more image features
        res = generate(model, proc, images, q, "tgv-kv", 1.0, options=RunOptions(max_new_tokens=4, followup=FOLLOWUP), videos=videos)
        if not vision_ids & set(res.token_ids.tolist()):
            break
    else:
        pytest.fail("every answer contained a vision token id")
    inputs = hf_compat.process_inputs(proc, images, hf_compat.render_prompt(proc, q, len(images), len(videos)), CPU,
                                      torch.float32, videos=videos)
    eos = model.generation_config.eos_token_id
    answer = res.token_ids.tolist() + ([] if res.token_ids[-1] == eos else [eos])
    suffix = hf_compat.followup_suffix(proc, q, len(images), res.text, FOLLOWUP, len(videos))
    extra = torch.tensor([answer + proc.tokenizer(suffix, add_special_tokens=False)["input_ids"]])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    for k in ("mm_token_type_ids", "token_type_ids"):  # new tokens are text
        if k in inputs:
            inputs[k] = torch.cat([inputs[k], torch.zeros_like(extra)], dim=1)
    with attn(model, "sdpa"), torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert res.trace.followup_ids.tolist() == expected[: len(res.trace.followup_ids)] and len(res.trace.followup_ids) >= 1


def test_followup_after_eviction_sdpa_equals_eager(family):
    name, model, proc, images, videos = family
    opts = RunOptions(max_new_tokens=4, followup=FOLLOWUP)
    hf_compat.enable_capture(model)
    a = generate(model, proc, images, Q, "tgv-kv", 0.3, options=opts, videos=videos)
    hf_compat.enable_capture(model, eager_reference=True)
    try:
        b = generate(model, proc, images, Q, "tgv-kv", 0.3, options=opts, videos=videos)
    finally:
        hf_compat.enable_capture(model)
    assert a.trace.followup_ids.tolist() == b.trace.followup_ids.tolist() and len(a.trace.followup_ids) >= 1


def test_trace_round_trips_json_and_npz(family, tmp_path):
    """Views with mosaic boxes, newline tokens, video frames, NaN/-1 info of non-evicted sliding layers."""
    import tgvkv

    name, model, proc, images, videos = family
    res = generate(model, proc, images, Q, "tgv-kv", 0.3, options=RunOptions(max_new_tokens=2), videos=videos)
    for suffix in (".npz", ".json"):
        back = tgvkv.Trace.load(res.trace.save(tmp_path / f"trace{suffix}"))
        a_meta, a_arr = res.trace.to_parts()
        b_meta, b_arr = back.to_parts()
        assert a_meta == b_meta and sorted(a_arr) == sorted(b_arr)
        for k in a_arr:
            assert a_arr[k].dtype == b_arr[k].dtype, k
            np.testing.assert_array_equal(a_arr[k], b_arr[k], err_msg=k)
        assert [vars(v) for v in back.layout.views] == [vars(v) for v in res.trace.layout.views]


@pytest.mark.parametrize("method", sorted(__import__("tgvkv.policies", fromlist=["POLICIES"]).POLICIES))
def test_every_method_runs_on_a_hybrid_model_and_evicts_full_layers_only(method):
    """Gemma 3 (sliding + full layers): every policy selects over the full-attention layers; the sliding ones keep
    their window; SDPA = eager tokens."""
    model, proc = _gemma()
    img = random_image(3, (48, 20))
    full = np.array([t == "full_attention" for t in model.config.text_config.layer_types])
    out = []
    for eager in (False, True):
        hf_compat.enable_capture(model, eager_reference=eager)
        try:
            out.append(generate(model, proc, [img], Q, method, 0.3, options=RunOptions(max_new_tokens=4)))
        finally:
            hf_compat.enable_capture(model)
    tr = out[0].trace
    assert out[0].token_ids.tolist() == out[1].token_ids.tolist()
    assert np.all(tr.budgets[~full] == tr.seq_len) and np.all(tr.kept_mask[~full])
    assert tr.cache_len_final[~full].tolist() == [model.config.text_config.sliding_window - 1] * int((~full).sum())
    if method != "full":
        assert np.all(tr.budgets[full] < tr.seq_len)


_GEMMA = []


def _gemma():
    if not _GEMMA:
        _GEMMA.append(tf.tiny_gemma3())
    return _GEMMA[0]


def test_followup_positions_unchanged_by_eviction(family):
    """The second turn's multi-token append (and its decode) uses the same RoPE tables (3-D M-RoPE included) at
    keep 0.3 as at keep 1.0."""
    name, model, proc, images, videos = family
    runs = []
    for keep in (1.0, 0.3):
        seen = []

        def hook(module, args, kwargs):
            seen.append(kwargs["position_embeddings"][0].detach().clone())

        h = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            res = generate(model, proc, images, Q, "tgv-kv", keep, options=RunOptions(max_new_tokens=3, followup=FOLLOWUP), videos=videos)
        finally:
            h.remove()
        runs.append((res, seen))
    (a, sa), (b, sb) = runs
    assert len(a.token_ids) == len(b.token_ids) == 3  # same answer length, so the second turn sits at the same positions
    assert len(sa) == len(sb) and any(t.shape[-2] > 1 for t in sa[1:])  # the follow-up is a multi-token append
    for x, y in zip(sa, sb):
        assert torch.equal(x, y)
    assert b.trace.cache_len_final.max() < a.trace.cache_len_final.max()  # eviction happened
