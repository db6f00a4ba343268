"""The lmms-eval plugin (tgvkv/integrations/lmms_eval): request adapter, engine parity, and a real lmms-eval run.

The adapter tests need no lmms-eval. The end-to-end tests run lmms-eval's own command line (`python -m lmms_eval`)
on a local task written here (YAML + JSONL of demo scenes, no hub) with the plugin on the bundled demo model, and
compare with `python -m tgvkv.eval` on the same examples and with plain `model.generate`. They skip only when
lmms-eval is not installed (`pip install -r requirements-lmms.txt`; .ci/run installs it).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tgvkv.integrations.lmms_eval.adapter import (
    Decoding, EngineRunner, PluginConfig, RequestRef, TraceStore, clean_context, decoding_from_gen_kwargs,
    split_visuals, truncate_at_stops,
)

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "assets" / "demo-vlm"
PLUGIN = "tgvkv.integrations.lmms_eval"
HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
needs_lmms = pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (pip install -r requirements-lmms.txt)")
N_EXAMPLES = 14  # two of each of the demo task's 7 question types
MAX_NEW_TOKENS = 32
TASK = "tgvkv_demo_scenes"


# -- model arguments -----------------------------------------------------------------------------------------------
def test_model_args_are_typed_and_checked():
    cfg = PluginConfig.from_model_args({"pretrained": "assets/demo-vlm", "method": "snapkv", "keep": 0.1,
                                        "protocol": "strict", "max_new_tokens": 16, "batch_size": 1,
                                        "device": "", "policy_options": '{"window": 4}'})
    assert (cfg.method, cfg.keep, cfg.protocol, cfg.max_new_tokens, cfg.device) == ("snapkv", 0.1, "strict", 16, None)
    assert cfg.policy == "snapkv" and cfg.keep_ratio == 0.1 and cfg.policy_options == {"window": 4}
    full = PluginConfig.from_model_args({"pretrained": "x/y", "method": "full", "keep": 0.05})
    assert full.policy is None and full.keep_ratio == 1.0
    assert PluginConfig.from_model_args({"pretrained": 7}).pretrained == "7"  # lmms-eval turns "7" into 7


@pytest.mark.parametrize("args, message", [
    ({}, "model_args: pretrained=<hub id or local folder> is required"),
    ({"pretrained": "x/y", "keep": 0}, "model_args: keep: keep_ratio must be in (0, 1]"),
    ({"pretrained": "x/y", "keep": True}, "model_args: keep must be a number in (0, 1], got True"),
    ({"pretrained": "x/y", "method": "nope"}, "model_args: unknown method 'nope'; choose one of: "),
    ({"pretrained": "x/y", "protocol": "loose"}, "model_args: protocol must be one of official, strict, got 'loose'"),
    ({"pretrained": "x/y", "dtype": "fp8"}, "model_args: dtype must be one of auto, float32, bfloat16, float16"),
    ({"pretrained": "x/y", "max_new_tokens": 0}, "model_args: max_new_tokens must be an integer in [1, 1024], got 0"),
    ({"pretrained": "x/y", "kep": 0.1}, "model_args: unknown argument(s) ['kep']; accepted: "),
    ({"pretrained": "x/y", "policy_options": "{window: 4}"}, "model_args: policy_options is not valid JSON"),
    ({"pretrained": "x/y", "batch_size": 4}, "batch_size 4 is not supported: the engine answers one request at a time"),
    ({"pretrained": "x/y", "trace_images": "yes"}, "model_args: trace_images must be true or false, got 'yes'"),
])
def test_bad_model_args_say_what_to_fix(args, message):
    with pytest.raises(ValueError) as e:
        PluginConfig.from_model_args(args)
    assert str(e.value).startswith(message), str(e.value)


# -- one request ---------------------------------------------------------------------------------------------------
def test_generation_settings_follow_lmms_eval_conventions():
    d = decoding_from_gen_kwargs({"until": "ASSISTANT:", "max_new_tokens": 16, "temperature": 0, "top_p": None,
                                  "num_beams": 1, "do_sample": False, "image_aspect_ratio": "pad"}, 256)
    assert d == Decoding(max_new_tokens=16, do_sample=False, temperature=1.0, top_p=1.0, until=("ASSISTANT:",),
                         ignored=("image_aspect_ratio",))
    assert decoding_from_gen_kwargs({"max_new_tokens": 32768}, 64).max_new_tokens == 64  # the model_args cap
    assert decoding_from_gen_kwargs(None, 64) == Decoding(max_new_tokens=64)
    s = decoding_from_gen_kwargs({"temperature": 0.7, "top_p": 0.9, "until": ["\n\n", ""]}, 8)
    assert (s.do_sample, s.temperature, s.top_p, s.until) == (True, 0.7, 0.9, ("\n\n",))
    with pytest.raises(ValueError, match="num_beams=4 is not supported"):
        decoding_from_gen_kwargs({"num_beams": 4}, 8)
    with pytest.raises(ValueError, match=r"gen_kwargs\['until'\] must be a string or a list of strings"):
        decoding_from_gen_kwargs({"until": 3}, 8)
    assert truncate_at_stops("red .\n\nASSISTANT: more", ["\n\n", "ASSISTANT:"]) == "red ."
    assert truncate_at_stops("red", []) == "red"


def test_placeholders_are_removed_from_the_question():
    assert clean_context("<image>\nwhat colour is it ?") == "what colour is it ?"
    assert clean_context("<image 1> <image 2> which one is red ?") == "which one is red ?"
    assert clean_context("compare <image 1> and <image 2>") == "compare and "
    assert clean_context("<video>\ndescribe the clip .") == "describe the clip ."
    assert clean_context("what is <b>bold</b> here ?") == "what is <b>bold</b> here ?"
    with pytest.raises(ValueError, match="has no question text once the placeholders are removed"):
        clean_context("<image>\n")


def test_visuals_become_images_and_clips(tmp_path):
    red = Image.new("RGB", (8, 6), (255, 0, 0))
    red.save(tmp_path / "a.png")
    gray = Image.new("L", (4, 4), 7)
    clip = np.zeros((3, 5, 7, 3), dtype=np.uint8)
    images, videos = split_visuals([[red, str(tmp_path / "a.png")], gray, clip], max_frames=8)
    assert [im.size for im in images] == [(8, 6), (8, 6), (4, 4)]
    assert all(im.mode == "RGB" for im in images) and images[1].getpixel((0, 0)) == (255, 0, 0)
    assert len(videos) == 1 and videos[0].shape == (3, 5, 7, 3)
    assert split_visuals(None, 8) == ([], [])
    with pytest.raises(ValueError, match=r"unsupported visual: a dict with keys \['array', 'sampling_rate'\]"):
        split_visuals([{"array": [0.0], "sampling_rate": 16000}], 8)
    with pytest.raises(ValueError, match="video file not found: "):
        split_visuals([str(tmp_path / "missing.mp4")], 8)
    with pytest.raises(ValueError, match="is neither an image nor a video file"):
        split_visuals(["http://example.com/x"], 8)


def test_video_files_are_sampled_uniformly(tmp_path):
    av = pytest.importorskip("av", reason="PyAV is needed to read video files (installed with lmms-eval)")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(20):  # frame i is a flat gray of level 10 * i
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * i, dtype=np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    _, videos = split_visuals([str(path)], max_frames=5)
    levels = videos[0].reshape(5, -1).mean(axis=1) / 10  # frames 0, 5, 10, 14, 19 (linspace 0..19, rounded)
    assert videos[0].shape == (5, 32, 32, 3)
    np.testing.assert_allclose(levels, [0, 5, 10, 14, 19], atol=0.5)


# -- the engine behind the requests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    import torch

    from tgvkv import load_demo_model
    from tgvkv.demo import scenes

    torch.set_num_threads(1)
    model, processor = load_demo_model()
    return model, processor, scenes.dataset("test", N_EXAMPLES)


def _plain_generate(model, processor, images, question, max_new_tokens) -> str:
    """The model's own `generate` on the same chat-template prompt (no engine, no eviction)."""
    import torch

    from tgvkv import hf_compat

    prompt = hf_compat.render_prompt(processor, question, len(images))
    inputs = hf_compat.process_inputs(processor, images, prompt, model.device, model.dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_keep_1_answers_equal_plain_generate_and_traces_are_saved(demo, tmp_path):
    from tgvkv import Trace

    model, processor, qas = demo
    cfg = PluginConfig(pretrained=str(DEMO), keep=1.0, max_new_tokens=MAX_NEW_TOKENS, trace_dir=str(tmp_path))
    runner = EngineRunner(model, processor, cfg, traces=TraceStore(tmp_path, rank=0))
    for i, qa in enumerate(qas[:4]):
        img = qa.scene.render()
        ans = runner.answer("<image>\n" + qa.question, [img], {"until": ["\n\n"]}, RequestRef(TASK, "test", i))
        assert ans.text == _plain_generate(model, processor, [img], qa.question, MAX_NEW_TOKENS)
        assert ans.kv_bytes_kept == ans.kv_bytes_full > 0
    index = [json.loads(line) for line in (tmp_path / "index.rank0.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in index] == [0, 1, 2, 3]
    tr = Trace.load(tmp_path / index[2]["trace"])
    assert (tr.method, tr.keep_ratio, tr.question, tr.output_text) == ("tgv-kv", 1.0, qas[2].question,
                                                                       index[2]["prediction"])
    saved = Image.open(tmp_path / index[2]["images"][0])
    assert np.array_equal(np.asarray(saved), np.asarray(qas[2].scene.render()))


def test_evicted_answers_equal_the_engine_and_stops_cut_them(demo):
    from tgvkv.generation import CaptureOptions, RunOptions, generate

    model, processor, qas = demo
    runner = EngineRunner(model, processor, PluginConfig(pretrained=str(DEMO), keep=0.1, max_new_tokens=12))
    qa = qas[6]  # "describe the image ." (the longest answers)
    img = qa.scene.render()
    direct = generate(model, processor, [img], qa.question, "tgv-kv", 0.1, options=RunOptions(max_new_tokens=12),
                      capture=CaptureOptions(diagnostics=False, hidden_states=False))
    ans = runner.answer(qa.question, [img], {"max_new_tokens": 48}, RequestRef(TASK, "test", 6))
    assert ans.text == ans.raw_text == direct.text and ans.new_tokens == len(direct.token_ids) == 12
    assert ans.kv_bytes_kept == int(direct.trace.kv_bytes_kept.sum()) < ans.kv_bytes_full
    first_word = direct.text.split()[1]
    cut = runner.answer(qa.question, [img], {"until": [" " + first_word]}, RequestRef(TASK, "test", 6))
    assert cut.raw_text == direct.text and cut.text == direct.text.split(" " + first_word)[0]


def test_loglikelihood_at_keep_1_equals_a_plain_forward(demo):
    import torch

    from tgvkv import hf_compat

    model, processor, qas = demo
    runner = EngineRunner(model, processor, PluginConfig(pretrained=str(DEMO), keep=1.0))
    qa = qas[0]
    img = qa.scene.render()
    logp, greedy = runner.loglikelihood(qa.question, " " + qa.answer, [img], RequestRef(TASK, "test", 0))
    prompt = hf_compat.render_prompt(processor, qa.question, 1)
    inputs = hf_compat.process_inputs(processor, [img], prompt, model.device, model.dtype)
    cont = processor.tokenizer(" " + qa.answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([inputs["input_ids"], cont], dim=1)
    with torch.inference_mode():
        logits = model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits[0].float()
    n = inputs["input_ids"].shape[1]
    want = torch.log_softmax(logits[n - 1:-1], dim=-1).gather(1, cont[0][:, None]).sum()
    assert logp == pytest.approx(float(want), abs=1e-4)
    assert greedy == bool((logits[n - 1:-1].argmax(-1) == cont[0]).all())
    evicted = EngineRunner(model, processor, PluginConfig(pretrained=str(DEMO), keep=0.1))
    assert evicted.loglikelihood(qa.question, " " + qa.answer, [img], RequestRef(TASK, "test", 0))[0] < logp
    with pytest.raises(ValueError, match="loglikelihood needs a non-empty continuation"):
        runner.loglikelihood(qa.question, "", [img], RequestRef(TASK, "test", 0))
