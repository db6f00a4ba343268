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
NOT_INSTALLED = "lmms-eval is not installed (pip install -r requirements-lmms.txt)"
needs_lmms = pytest.mark.skipif(not HAS_LMMS, reason=NOT_INSTALLED)
N_EXAMPLES = 14  # two of each of the demo task's 7 question types
MAX_NEW_TOKENS = 32
TASK = "tgvkv_demo_scenes"


# -- model arguments -----------------------------------------------------------------------------------------------
def test_model_args_are_typed_and_checked():
    cfg = PluginConfig.from_model_args({"pretrained": "assets/demo-vlm", "method": "snapkv", "keep": 0.1,
                                        "protocol": "strict", "max_new_tokens": 16, "batch_size": 1,
                                        "device": "", "policy_options": '{"window_size": 4}'})
    assert (cfg.method, cfg.keep, cfg.protocol, cfg.max_new_tokens, cfg.device) == ("snapkv", 0.1, "strict", 16, None)
    assert cfg.policy == "snapkv" and cfg.keep_ratio == 0.1 and cfg.policy_options == {"window_size": 4}
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

    import tiny_families as tf

    from tgvkv.generation import CaptureOptions, RunOptions, generate

    model, processor = tf.tiny_qwen2_vl()  # a video file path, as video tasks give it, through the engine
    runner = EngineRunner(model, processor, PluginConfig(pretrained="tiny-qwen2-vl", keep=0.3, max_new_tokens=5,
                                                         max_frames=4))
    ans = runner.answer("<video>\ndescribe the clip .", [str(path)], {}, RequestRef(TASK, "test", 0))
    frames = split_visuals([str(path)], max_frames=4)[1]
    direct = generate(model, processor, [], "describe the clip .", "tgv-kv", 0.3, options=RunOptions(max_new_tokens=5),
                      capture=CaptureOptions(diagnostics=False, hidden_states=False), videos=frames)
    assert (ans.text, ans.prompt_tokens, ans.new_tokens) == (direct.text, direct.trace.seq_len, len(direct.token_ids))


# -- the engine behind the requests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    import torch

    from tgvkv import load_demo_model
    from tgvkv.demo import scenes

    torch.set_num_threads(1)
    model, processor = load_demo_model()
    return model, processor, scenes.dataset("test", N_EXAMPLES)


def _plain_generate(model, processor, images, question, max_new_tokens, videos=()) -> str:
    """The model's own `generate` on the same chat-template prompt (no engine, no eviction)."""
    import torch

    from tgvkv import hf_compat

    prompt = hf_compat.render_prompt(processor, question, len(images), len(videos))
    inputs = hf_compat.process_inputs(processor, images, prompt, model.device, model.dtype, videos=list(videos))
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


def test_bad_requests_and_options_name_what_to_fix(demo, tmp_path):
    model, processor, qas = demo
    runner = EngineRunner(model, processor, PluginConfig(pretrained=str(DEMO), keep=0.1))
    ref = RequestRef(TASK, "test", 7)
    with pytest.raises(ValueError) as e:
        runner.answer(qas[0].question, [str(tmp_path / "gone.png")], {}, ref)
    assert str(e.value) == f"task 'tgvkv_demo_scenes' split 'test' doc 7: image file not found: {tmp_path / 'gone.png'}"
    with pytest.raises(ValueError, match=r"^task 'tgvkv_demo_scenes' split 'test' doc 7 round 2: num_beams=3 is not"):
        runner.answer(qas[0].question, [qas[0].scene.render()], {"num_beams": 3}, RequestRef(TASK, "test", 7, 2))
    with pytest.raises(ValueError, match=r"^model_args: policy_options: method 'tgv-kv' has no option\(s\) \['windw'"):
        EngineRunner(model, processor, PluginConfig(pretrained=str(DEMO), policy_options={"windw": 4}))
    with pytest.raises(ValueError, match="policy_options are given but method is 'full'"):
        EngineRunner(model, processor, PluginConfig(pretrained=str(DEMO), method="full", policy_options={"x": 1}))


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


@pytest.mark.parametrize("family, sizes, clips", [
    ("qwen2_vl", [(40, 24), (16, 32)], []),  # several images in one prompt
    ("llava_onevision", [(30, 20)], [(2, 24, 40)]),  # an image and a video
    ("qwen2_vl", [], [(4, 24, 40)]),  # a video alone
])
def test_several_images_and_videos_reach_the_engine(family, sizes, clips):
    """lmms-eval style requests (placeholders in the context, visuals as a list) on tiny models of the families
    that take several images / video: keep 1.0 equals plain `generate`, keep 0.3 equals the engine called directly."""
    import tiny_families as tf
    from tiny_models import random_image

    from tgvkv.generation import CaptureOptions, RunOptions, generate

    model, processor = {"qwen2_vl": tf.tiny_qwen2_vl, "llava_onevision": tf.tiny_onevision}[family]()
    images = [random_image(10 + i, s) for i, s in enumerate(sizes)]
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 255, (*shape, 3), dtype=np.uint8) for shape in clips]
    question = "what is the colour of the circle ?"
    context = "".join(f"<image {i + 1}> " for i in range(len(images))) + "<video>\n" * len(videos) + question
    visuals = [*images, *videos]
    full = EngineRunner(model, processor, PluginConfig(pretrained=family, keep=1.0, max_new_tokens=6))
    ans = full.answer(context, visuals, {}, RequestRef(TASK, "test", 0))
    assert ans.text == _plain_generate(model, processor, images, question, 6, videos) and ans.new_tokens == 6
    evicted = EngineRunner(model, processor, PluginConfig(pretrained=family, keep=0.3, max_new_tokens=6))
    ans = evicted.answer(context, visuals, {}, RequestRef(TASK, "test", 0))
    direct = generate(model, processor, images, question, "tgv-kv", 0.3, options=RunOptions(max_new_tokens=6),
                      capture=CaptureOptions(diagnostics=False, hidden_states=False), videos=videos)
    assert (ans.text, ans.prompt_tokens, ans.kv_bytes_kept) == (direct.text, direct.trace.seq_len,
                                                               int(direct.trace.kv_bytes_kept.sum()))
    assert ans.kv_bytes_kept < ans.kv_bytes_full


@needs_lmms
def test_the_lmms_class_answers_every_request_type(demo):
    """The registered class, built the way lmms-eval builds it, on hand-made Instances of the three request types."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from tgvkv import hf_compat
    from tgvkv.integrations.lmms_eval.models import AVAILABLE_MODELS, manifest

    model, processor, qas = demo
    registry = ModelRegistryV2()
    registry.register_manifest(manifest())
    cls = registry.get_model_class("tgvkv")  # checks: an `lmms` subclass, a simple model
    assert cls.__name__ == AVAILABLE_MODELS["tgvkv"] and cls.__module__ == f"{PLUGIN}.models.tgvkv"
    lm = cls.create_from_arg_string(f"pretrained={DEMO},keep=1.0,max_new_tokens={MAX_NEW_TOKENS}",
                                    {"batch_size": 1, "device": "cpu"})
    assert (lm.rank, lm.world_size, lm.batch_size, str(lm.device)) == (0, 1, 1, "cpu")
    docs = [{"q": qa.question, "image": qa.scene.render(), "a": qa.answer} for qa in qas[:3]]
    lm.task_dict = {TASK: {"test": docs}}

    def doc_to_visual(doc):
        return [doc["image"]]

    def request(kind, args, doc_id):
        return Instance(kind, args, 0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})

    gen = [request("generate_until", ("<image>\n" + d["q"], {"until": ["\n\n"]}, doc_to_visual, i, TASK, "test"), i)
           for i, d in enumerate(docs)]
    out = lm.generate_until(gen)
    want = [_plain_generate(model, processor, [d["image"]], d["q"], MAX_NEW_TOKENS) for d in docs]
    assert [r.text for r in out] == want
    prompt_lengths = [hf_compat.process_inputs(processor, [d["image"]], hf_compat.render_prompt(processor, d["q"], 1),
                                               model.device, model.dtype)["input_ids"].shape[1] for d in docs]
    assert [r.token_counts.input_tokens for r in out] == prompt_lengths
    assert all(r.token_counts.output_tokens >= len(processor.tokenizer(w, add_special_tokens=False)["input_ids"])
               for r, w in zip(out, want))

    calls = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        calls.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 1:  # the second round asks the next document's question about this image
            return [doc["image"]], docs[1]["q"], False, previous_output, {"asked": docs[1]["q"]}
        return None, None, True, previous_output, None

    multi = request("generate_until_multi_round", (docs[0]["q"], {}, doc_to_visual, doc_to_text, 0, TASK, "test"), 0)
    (rounds,) = lm.generate_until_multi_round([multi])
    assert rounds == [want[0], _plain_generate(model, processor, [docs[0]["image"]], docs[1]["q"], MAX_NEW_TOKENS)]
    assert calls == [(1, [want[0]], None), (2, rounds, {"asked": docs[1]["q"]})]

    ll = [request("loglikelihood", (d["q"], " " + w, doc_to_visual, i, TASK, "test"), i)
          for i, (d, w) in enumerate(zip(docs, want))]
    runner = EngineRunner(model, processor, PluginConfig(pretrained=str(DEMO), keep=1.0))
    assert lm.loglikelihood(ll) == [runner.loglikelihood(d["q"], " " + w, [d["image"]], RequestRef(TASK, "test", i))
                                    for i, (d, w) in enumerate(zip(docs, want))]
    assert all(greedy for _, greedy in lm.loglikelihood(ll))  # the model's own answers are its greedy ones
    lm.clean()
    assert lm.runner is None and not hasattr(lm, "_model")


# -- lmms-eval's own command line on a local task --------------------------------------------------------------------
TASK_UTILS = '''
"""Local test task: demo scenes from data.jsonl next to this file, scored with lmms-eval's own VQA normaliser."""
import os

from PIL import Image

from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

HERE = os.path.dirname(os.path.abspath(__file__))
_normalise = EvalAIAnswerProcessor()


def doc_to_visual(doc):
    with Image.open(os.path.join(HERE, doc["image"])) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    pred = _normalise(results[0])
    return {"exact_match": float(any(pred == _normalise(a) for a in doc["answers"]))}
'''

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answers
generation_kwargs:
  until: ["\\n\\n"]
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def write_task(folder: Path, n: int) -> Path:
    """The first `n` demo test-split questions as a folder task that both evaluators read: data.jsonl + images
    (`python -m tgvkv.eval --task folder`), and an lmms-eval task (YAML + utils.py) over the same data.jsonl."""
    from tgvkv.demo import scenes

    (folder / "images").mkdir(parents=True)
    lines = []
    for i, qa in enumerate(scenes.dataset("test", n)):
        qa.scene.render().save(folder / "images" / f"{i:03d}.png")
        lines.append(json.dumps({"id": f"demo-{i:03d}", "image": f"images/{i:03d}.png", "question": qa.question,
                                 "answers": [qa.answer], "qtype": qa.qtype, "metric": "exact"}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "utils.py").write_text(TASK_UTILS)
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=folder / "data.jsonl",
                                                          max_new_tokens=MAX_NEW_TOKENS))
    return folder


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp / "hf"), "GRADIO_ANALYTICS_ENABLED": "False",
            "LMMS_EVAL_PLUGINS": PLUGIN, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_lmms_eval(task_dir: Path, out: Path, model_args: str, launcher: list[str] | None = None,
                  extra: list[str] = ()) -> tuple[dict, dict[int, dict]]:
    """`python -m lmms_eval` (or accelerate launch -m lmms_eval) with the plugin; (results, samples by doc_id)."""
    cmd = [*(launcher or [sys.executable]), "-m", "lmms_eval", "--model", "tgvkv", "--model_args", model_args,
           "--tasks", TASK, "--include_path", str(task_dir), "--output_path", str(out), "--log_samples",
           "--batch_size", "1", *extra]
    res = subprocess.run(cmd, env=_env(out.parent), capture_output=True, text=True, cwd=out.parent, timeout=900)
    results = sorted(out.glob("*/*_results.json"))
    # lmms-eval prints an evaluation error and still exits 0: the results file is the proof of a complete run
    assert res.returncode == 0 and len(results) == 1, (res.stdout + res.stderr)[-4000:]
    samples = [json.loads(line) for p in out.glob(f"*/*_samples_{TASK}.jsonl") for line in p.read_text().splitlines()]
    return json.loads(results[0].read_text()), {s["doc_id"]: s for s in samples}


def run_tgvkv_eval(task_dir: Path, out: Path, keep: float) -> list[dict]:
    """`python -m tgvkv.eval` on the same folder task: the full-KV reference and tgv-kv at `keep`."""
    from tgvkv.eval.runner import read_rows

    cmd = [sys.executable, "-m", "tgvkv.eval", "--model", str(DEMO), "--task", str(task_dir), "--methods", "tgv-kv",
           "--keep", str(keep), "--no-followup", "--max-new-tokens", str(MAX_NEW_TOKENS), "--threads", "1",
           "--no-progress", "--out", str(out)]
    res = subprocess.run(cmd, env=_env(out.parent), capture_output=True, text=True, cwd=out.parent, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return read_rows(out / "rows.jsonl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One lmms-eval run at keep 1.0, one at 0.1 (with traces), and `python -m tgvkv.eval` on the same examples."""
    if not HAS_LMMS:
        pytest.skip(NOT_INSTALLED)
    root = tmp_path_factory.mktemp("lmms")
    task_dir = write_task(root / "task", N_EXAMPLES)
    common = f"pretrained={DEMO},method=tgv-kv,protocol=official,dtype=float32,max_new_tokens=64"
    lmms = {1.0: run_lmms_eval(task_dir, root / "lmms-keep1", common + ",keep=1.0"),
            0.1: run_lmms_eval(task_dir, root / "lmms-keep0.1", common + f",keep=0.1,trace_dir={root / 'traces'}")}
    rows = run_tgvkv_eval(task_dir, root / "tgvkv-eval", 0.1)
    return root, task_dir, lmms, rows


def _tgvkv_rows(rows: list[dict], method: str, keep: float) -> dict[int, dict]:
    return {r["example_index"]: r for r in rows if r["method"] == method and float(r["keep"]) == keep}


@needs_lmms
@pytest.mark.slow
def test_lmms_eval_scores_equal_tgvkv_eval(runs):
    _, _, lmms, rows = runs
    for keep, method in ((1.0, "full"), (0.1, "tgv-kv")):
        results, samples = lmms[keep]
        ours = _tgvkv_rows(rows, method, keep)
        assert sorted(samples) == sorted(ours) == list(range(N_EXAMPLES))
        assert results["n-samples"][TASK] == {"original": N_EXAMPLES, "effective": N_EXAMPLES}
        assert [samples[i]["input"] for i in range(N_EXAMPLES)] == [ours[i]["question"] for i in range(N_EXAMPLES)]
        assert [samples[i]["filtered_resps"] for i in range(N_EXAMPLES)] == [ours[i]["prediction"]
                                                                            for i in range(N_EXAMPLES)]
        assert [samples[i]["exact_match"] for i in range(N_EXAMPLES)] == [ours[i]["score"] for i in range(N_EXAMPLES)]
        accuracy = sum(r["score"] for r in ours.values()) / N_EXAMPLES
        assert results["results"][TASK]["exact_match,none"] == pytest.approx(accuracy, abs=1e-12)
        assert [samples[i]["token_counts"][0]["input_tokens"] for i in range(N_EXAMPLES)] == [
            ours[i]["prompt_tokens"] for i in range(N_EXAMPLES)]
    evicted = lmms[0.1][1]
    assert any(evicted[i]["filtered_resps"] != lmms[1.0][1][i]["filtered_resps"] for i in range(N_EXAMPLES))


@needs_lmms
@pytest.mark.slow
def test_lmms_eval_keep_1_equals_plain_generate(runs, demo):
    _, _, lmms, _ = runs
    model, processor, qas = demo
    samples = lmms[1.0][1]
    for i, qa in enumerate(qas):
        assert samples[i]["filtered_resps"] == _plain_generate(model, processor, [qa.scene.render()], qa.question,
                                                               MAX_NEW_TOKENS)


@needs_lmms
@pytest.mark.slow
def test_lmms_eval_run_saves_one_trace_per_answer(runs):
    from tgvkv import Trace

    root, task_dir, lmms, rows = runs
    index = [json.loads(line) for line in (root / "traces" / "index.rank0.jsonl").read_text().splitlines()]
    assert sorted(r["doc_id"] for r in index) == list(range(N_EXAMPLES))
    ours = _tgvkv_rows(rows, "tgv-kv", 0.1)
    for r in index:
        tr = Trace.load(root / "traces" / r["trace"])
        assert (tr.method, tr.keep_ratio, tr.protocol, tr.question) == ("tgv-kv", 0.1, "official",
                                                                        ours[r["doc_id"]]["question"])
        assert tr.output_text == r["prediction"] == lmms[0.1][1][r["doc_id"]]["filtered_resps"]
        assert r["kv_bytes_kept"] == ours[r["doc_id"]]["kv_bytes_kept"] == int(tr.kv_bytes_kept.sum())
        saved = np.asarray(Image.open(root / "traces" / r["images"][0]))
        assert np.array_equal(saved, np.asarray(Image.open(task_dir / "images" / f"{r['doc_id']:03d}.png")))


@needs_lmms
@pytest.mark.slow
def test_lmms_eval_data_parallel_equals_single_process(runs):
    """`accelerate launch --multi_gpu --num_processes 2 -m lmms_eval` (two CPU processes here): lmms-eval shards
    the documents by rank; answers and score equal the single-process run, each process writes its own index."""
    root, task_dir, lmms, _ = runs
    n = 6
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "29561"]
    args = f"pretrained={DEMO},keep=0.1,max_new_tokens=64,trace_dir={root / 'dp-traces'},trace_images=false"
    results, samples = run_lmms_eval(task_dir, root / "lmms-dp", args, launcher, ["--limit", str(n)])
    single = lmms[0.1][1]
    assert {i: s["filtered_resps"] for i, s in samples.items()} == {i: single[i]["filtered_resps"] for i in range(n)}
    assert results["results"][TASK]["exact_match,none"] == pytest.approx(
        sum(single[i]["exact_match"] for i in range(n)) / n, abs=1e-12)
    per_rank = {p.name: sorted(json.loads(line)["doc_id"] for line in p.read_text().splitlines())
                for p in (root / "dp-traces").glob("index.rank*.jsonl")}
    assert per_rank == {"index.rank0.jsonl": [0, 2, 4], "index.rank1.jsonl": [1, 3, 5]}
    assert not list((root / "dp-traces").rglob("*.png"))
