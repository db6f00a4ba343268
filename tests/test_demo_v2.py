"""Demo model v2 plumbing: short answer style, the fresh split, bf16 training, exact resume, text-only probe.

No test trains more than a few steps of a tiny model; nothing is written into the repository.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

from tgvkv.demo import scenes


# --- short answer style --------------------------------------------------------------------------------


def test_short_answers_are_the_informative_words():
    s = scenes.make_scene(5)  # green triangle (0,1), red square (0,2), blue circle (2,2)
    for qtype in scenes.QUESTION_TYPES:
        for k in range(6):
            sent = scenes.make_qa(s, qtype, k)
            short = scenes.make_qa(s, qtype, k, style="short")
            assert short.question == sent.question + " " + scenes.SHORT_SUFFIX
            assert short.target_cells == sent.target_cells and short.followup_qtype == sent.followup_qtype
            words = sent.question.split()
            if qtype == "color":  # "what color is the triangle ?" -> the triangle's colour
                assert short.answer == s.find(shape=words[4])[0].color
            elif qtype == "shape":  # "what shape is the red object ?"
                assert short.answer == s.find(color=words[4])[0].shape
            elif qtype == "where":
                assert short.answer == s.find(words[3], words[4])[0].position
            elif qtype == "exists":
                assert short.answer == ("yes" if s.find(words[3], words[4]) else "no")
            elif qtype == "position":  # "what is at the top left ?"
                o = s.at(*scenes.POSITIONS[" ".join(words[4:-1])])
                assert short.answer == (f"{o.color} {o.shape}" if o else "nothing")
    assert scenes.make_qa(s, "count", 0, style="short").answer == "three"
    assert scenes.make_qa(s, "describe", 0, style="short").answer == "green triangle , red square and blue circle"
    assert {scenes.make_qa(s, "exists", k, style="short").answer for k in range(20)} == {"yes", "no"}


def test_checker_recomputes_short_answers_in_every_split():
    n = 0
    for split in ("val", "test", "fresh"):
        for qa in scenes.dataset(split, 350, style="short"):
            assert scenes.check_answer(qa) == scenes.normalise(qa.answer)
            assert scenes.check_followup(qa) == scenes.normalise(qa.followup_answer)
            n += 1
    assert n == 1050


def test_followup_style_can_differ_and_bad_style_is_refused():
    s = scenes.make_scene(5)
    qa = scenes.make_qa(s, "count", 3, style="sentence", followup_style="short")
    assert not qa.question.endswith(scenes.SHORT_SUFFIX) and qa.followup_question.endswith(scenes.SHORT_SUFFIX)
    assert scenes.check_followup(qa) == qa.followup_answer
    with pytest.raises(ValueError, match="unknown answer style 'terse'"):
        scenes.make_qa(s, "count", 3, style="terse")


def test_vocabulary_keeps_sentence_word_ids_and_adds_the_suffix():
    words = scenes.vocabulary()
    v1 = ["user", "assistant", ":", ".", ",", "?", "red", "green", "blue", "yellow", "purple", "white", "circle",
          "square", "triangle", "colour", "top", "middle", "bottom", "left", "right", "center", "zero", "one", "two",
          "three", "what", "color", "is", "the", "shape", "object", "where", "at", "there", "a", "no", "nothing",
          "how", "many", "objects", "are", "describe", "image", "and"]
    assert words[: len(v1)] == v1
    assert words[len(v1):] == ["answer", "with", "single", "word", "yes"]


def test_fresh_split_is_disjoint_and_uses_held_out_layouts():
    fresh = list(scenes.dataset("fresh", 70))
    test = list(scenes.dataset("test", 70))
    assert all(30_000_000 <= q.scene.seed < 31_000_000 for q in fresh)
    assert not {q.scene.seed for q in fresh} & {q.scene.seed for q in test}
    assert all(scenes.layout_split(q.scene) == "test" for q in fresh)


# --- evaluator task ----------------------------------------------------------------------------------------


def test_demo_short_task_asks_the_same_questions_with_the_suffix():
    from tgvkv.eval.tasks import load_task

    sent, short = load_task("demo", 14), load_task("demo-short", 14)
    assert short.name == "demo-short" and short.info["style"] == "short" and "style" not in sent.info
    for a, b in zip(sent.examples, short.examples):
        assert b.question == a.question + " " + scenes.SHORT_SUFFIX
        assert b.qtype == a.qtype and b.id == a.id
    assert [e.answers[0] for e in short.examples[:3]] == ["white", "circle", "bottom left"]


def test_format_style_table_puts_styles_side_by_side():
    from tgvkv.demo.evaluate import format_style_table

    def res(acc):
        return {"n": 2, "overall": acc, "per_type": {"color": {"n": 2, "accuracy": acc}},
                "followup_overall": 1.0, "followup_per_type": {"shape": {"n": 2, "accuracy": 1.0}}}

    text = format_style_table({"v2 sentence": res(1.0), "v2 short": res(0.5)})
    lines = text.splitlines()
    assert lines[0] == "| question type | n | v2 sentence | v2 short |"
    assert "| color | 2 | 100.0 | 50.0 |" in lines
    assert "| **overall** | 2 | **100.0** | **50.0** |" in lines
    assert "| **follow-up overall** | 2 | **100.0** | **100.0** |" in lines


# --- training: config checks, bf16, exact resume -------------------------------------------------------

TINY = dict(vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64, text_hidden=32,
            text_layers=2, text_heads=2, text_kv_heads=1, text_intermediate=64)


def test_train_config_refuses_bad_precision_and_short_frac():
    from tgvkv.demo.train import TrainConfig

    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match=r"short_frac must be in \[0, 1\], got 1.5"):
        TrainConfig(short_frac=1.5)


def _weights(folder):
    from safetensors.numpy import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_continues_exactly_where_the_run_stopped(tmp_path, precision):
    """3 steps in one go == 2 steps, stop, --resume to 3 (same weights bit for bit, same best checkpoint step)."""
    from tgvkv.demo.build import ModelSpec
    from tgvkv.demo.train import RESUME_FILE, TrainConfig, train

    spec = ModelSpec(**TINY)
    common = dict(images_per_step=2, pieces_per_image=2, val_every=1, save_every=1, val_n=7, threads=1,
                  precision=precision, short_frac=0.5, warmup=2)
    train(TrainConfig(out=str(tmp_path / "a"), steps=3, **common), spec)
    train(TrainConfig(out=str(tmp_path / "b"), steps=2, **common), spec)
    assert (tmp_path / "b" / RESUME_FILE).exists()
    train(TrainConfig(out=str(tmp_path / "b"), steps=3, resume=True, **common), spec)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    import json

    sa = json.loads((tmp_path / "a" / "training_state.json").read_text())
    sb = json.loads((tmp_path / "b" / "training_state.json").read_text())
    assert sa["step"] == sb["step"] == 3
    assert [r["step"] for r in sb["curve"]] == [1, 2, 3]
    assert sb["curve"][-1]["train_loss_ema"] == sa["curve"][-1]["train_loss_ema"]  # the loss EMA resumes too
    assert {"val_sentence_overall", "val_short_overall", "val_select"} <= set(sb["curve"][-1])
    assert (tmp_path / "b" / "best" / "model.safetensors").exists()


def test_data_parallel_training_equals_one_process(tmp_path):
    """2 CPU processes (each half of a step's images, gradients summed) train the same model as one process: 3 steps
    in one process == 2 data-parallel steps, stop, data-parallel --resume to 3 (up to float summation order)."""
    from tgvkv.demo.build import ModelSpec
    from tgvkv.demo.train import TrainConfig, train

    spec = ModelSpec(**TINY)
    common = dict(images_per_step=4, pieces_per_image=2, val_every=2, save_every=2, val_n=7, threads=1,
                  short_frac=0.5, warmup=2)
    one = train(TrainConfig(out=str(tmp_path / "one"), steps=3, **common), spec)
    train(TrainConfig(out=str(tmp_path / "dp"), steps=2, data_parallel=2, **common), spec)
    dp = train(TrainConfig(out=str(tmp_path / "dp"), steps=3, data_parallel=2, resume=True, **common), spec)
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "dp")
    assert w1.keys() == w2.keys()
    changed = 0
    for k in w1:
        np.testing.assert_allclose(w1[k], w2[k], atol=1e-5, rtol=0, err_msg=k)
        changed += int(not np.array_equal(w1[k], _weights_at_init(spec, tmp_path / "init")[k]))
    assert changed > len(w1) // 2  # the runs did train
    assert [r["step"] for r in dp["curve"]] == [r["step"] for r in one["curve"]] == [2, 3]
    assert dp["curve"][-1]["train_loss_ema"] == pytest.approx(one["curve"][-1]["train_loss_ema"], abs=1e-4)
    with pytest.raises(ValueError, match="data_parallel must be in \\[1, images_per_step=4\\], got 5"):
        TrainConfig(images_per_step=4, data_parallel=5)


def _weights_at_init(spec, folder, _cache={}):
    """The untrained weights of seed 0, as saved (the saved names differ from the in-memory state dict's)."""
    if "w" not in _cache:
        from tgvkv.demo.build import build_model, build_processor

        build_model(build_processor().tokenizer, spec, seed=0).save_pretrained(folder)
        _cache["w"] = _weights(folder)
    return _cache["w"]


def test_resume_without_state_is_refused(tmp_path):
    from tgvkv.demo.train import TrainConfig, train

    with pytest.raises(FileNotFoundError, match="resume_state.pt not found"):
        train(TrainConfig(out=str(tmp_path / "none"), steps=1, resume=True))


# --- text-only probe ----------------------------------------------------------------------------------


def test_text_only_probe_keeps_every_text_token_and_no_image_token():
    from tgvkv.layout import TokenLayout
    from tgvkv.policies import make_policy
    from tgvkv.stats import PrefillStats

    layout = TokenLayout.from_spans(20, [(3, 15)])
    pol = make_policy("text-only")
    req = pol.request(layout)
    assert len(req.query_positions) == 0
    stats = PrefillStats(rows=np.zeros((3, 0, 20)), query_positions=np.zeros(0, dtype=np.int64))
    sel = pol.select(stats, layout, keep_ratio=0.05)
    expected = [0, 1, 2, 15, 16, 17, 18, 19]
    assert [k.tolist() for k in sel.kept] == [expected] * 3
    assert sel.budgets.tolist() == [8, 8, 8]


def test_training_gives_the_process_back_as_it_found_it(tmp_path):
    """Denormal flushing and the thread count are training settings, not the caller's (hypothesis needs IEEE)."""
    import torch

    from tgvkv.demo.build import ModelSpec
    from tgvkv.demo.train import TrainConfig, train

    threads = torch.get_num_threads()
    train(TrainConfig(out=str(tmp_path / "t"), steps=1, images_per_step=1, pieces_per_image=1, val_every=1,
                      save_every=1, val_n=7, threads=max(1, threads - 1) if threads > 1 else 2), ModelSpec(**TINY))
    assert torch.get_num_threads() == threads
    tiny = torch.tensor([1e-40], dtype=torch.float32)  # a float32 subnormal survives only without flushing
    assert float(tiny * 1.0) != 0.0
