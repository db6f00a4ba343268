"""Words a closed-vocabulary (demo) model does not know are named before anything runs: Python API (ValueError from
generate / compare), CLI (exit 2), app (the handler's message, shown as gr.Error); other models are not checked."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tiny_models import random_image, tiny_llava

import gradio as gr
from tgvkv import compare, generate
from tgvkv.cli import main as cli_main
from tgvkv.demo import scenes
from tgvkv.demo.build import build_processor
from tgvkv.loading import DEMO_MODEL_DIR
from tgvkv.vocabulary import KNOWN_WORDS_KEY, check_known_words, closed_vocabulary
from analysis.webapp import handlers as H
from analysis.webapp import models as M
from analysis.webapp.examples import EXAMPLES_DIR, PHOTO_PANEL_LABEL, README_SCENE, load_examples

TINY_KNOWN = ["what", "is", "the", "colour", "of", "red", "circle", "square", "?"]
TINY_LISTING = "circle, colour, is, of, red, square, the, what, '?'"


@pytest.fixture(scope="module")
def tiny_closed():
    """The tiny test VLM with a recorded word list (as the demo build records it)."""
    model, proc = tiny_llava(seed=3)
    proc.tokenizer.init_kwargs[KNOWN_WORDS_KEY] = list(TINY_KNOWN)
    return model, proc


@pytest.fixture(scope="module")
def demo_processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(DEMO_MODEL_DIR)


def demo_listing(processor) -> str:
    words = processor.tokenizer.init_kwargs[KNOWN_WORDS_KEY]
    alnum = sorted(w for w in words if any(c.isalnum() for c in w))
    marks = sorted(repr(w) for w in words if not any(c.isalnum() for c in w))
    return ", ".join(alnum + marks)


def colour_message(processor) -> str:
    return (f"the demo model knows these words: {demo_listing(processor)}; 'colour' is not one of them; "
            "did you mean 'color'?")


# -- the rule -----------------------------------------------------------------------------------------------------
def test_messages_name_unknown_words_and_guess(tiny_closed):
    _, proc = tiny_closed
    with pytest.raises(ValueError) as e:
        check_known_words("what is the color of the circle ?", proc)
    assert str(e.value) == (f"the demo model knows these words: {TINY_LISTING}; 'color' is not one of them; "
                            "did you mean 'colour'?")
    with pytest.raises(ValueError) as e:
        check_known_words("what is the colr of the blue squar ?", proc)
    assert str(e.value) == (f"the demo model knows these words: {TINY_LISTING}; 'colr', 'blue' and 'squar' are not "
                            "among them; did you mean 'colour' for 'colr' and 'square' for 'squar'?")
    with pytest.raises(ValueError) as e:
        check_known_words("zebra ?", proc, what="follow-up question")
    assert str(e.value) == (f"the demo model knows these words: {TINY_LISTING}; 'zebra' is not one of them "
                            "(in the follow-up question).")


def test_known_words_pass_and_repeated_unknown_words_are_named_once(tiny_closed):
    _, proc = tiny_closed
    assert check_known_words("what is the colour of the red circle ?", proc) == "what is the colour of the red circle ?"
    with pytest.raises(ValueError, match="'What' is not one of them"):  # this tokenizer does not lower-case
        check_known_words("What is the colour ?", proc)
    vocab = closed_vocabulary(proc)
    assert vocab.unknown("blue blue circle blue ?") == ["blue"]


def test_models_without_a_recorded_word_list_are_not_checked():
    _, proc = tiny_llava(seed=3)  # word-level, but no known_words: a test model, not the demo
    assert closed_vocabulary(proc) is None
    assert check_known_words("zebra giraffe", proc) == "zebra giraffe"
    assert closed_vocabulary(object()) is None  # no tokenizer at all


def test_demo_build_records_the_task_words(tmp_path):
    """build_processor saves known_words in tokenizer_config.json; a reloaded processor is checked by it."""
    from transformers import AutoProcessor

    build_processor().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved[KNOWN_WORDS_KEY] == scenes.task_words()
    vocab = closed_vocabulary(AutoProcessor.from_pretrained(tmp_path))
    assert vocab is not None and vocab.words == frozenset(scenes.task_words())


def test_task_words_are_exactly_the_words_of_the_training_text():
    """scenes.UNUSED_WORDS holds exactly the vocabulary entries no prompt, question or answer uses."""
    seen = {"user", "assistant", ":"}  # the chat prompt around every question
    qas = scenes.dataset("train", 2100) + scenes.dataset("train", 2100, style="short")
    qas += [scenes.make_qa(scenes.make_scene(s, repeat_shapes=True), t, s) for s in range(200)
            for t in scenes.QUESTION_TYPES if t != "color"]
    for qa in qas:
        for text in (qa.question, qa.answer, qa.followup_question, qa.followup_answer):
            seen.update(scenes.normalise(text or "").split())
    assert seen == set(scenes.task_words())
    assert set(scenes.vocabulary()) - seen == scenes.UNUSED_WORDS


def test_the_shipped_demo_model_records_its_words(demo_processor):
    """The model folder and the code agree; 'colour' is in the tokenizer's vocabulary but not a known word."""
    recorded = demo_processor.tokenizer.init_kwargs.get(KNOWN_WORDS_KEY)
    # the words of the model's own vocabulary that the task uses (a v1 model was built before the short answer style
    # added its words, so its vocabulary lacks them)
    expected = [w for w in scenes.task_words() if w in demo_processor.tokenizer.get_vocab()]
    assert recorded == expected, f"{DEMO_MODEL_DIR}/tokenizer_config.json lacks or differs in known_words"
    assert "colour" in demo_processor.tokenizer.get_vocab() and "colour" not in recorded
    with pytest.raises(ValueError) as e:
        check_known_words("what colour is the circle ?", demo_processor)
    assert str(e.value) == colour_message(demo_processor)


# -- entry points -------------------------------------------------------------------------------------------------
def test_generate_and_compare_refuse_before_running(tiny_closed):
    model, proc = tiny_closed
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        img = random_image(1)
        expected = (f"the demo model knows these words: {TINY_LISTING}; 'color' is not one of them; "
                    "did you mean 'colour'?")
        with pytest.raises(ValueError) as e:
            generate(model, proc, [img], "what is the color of the circle ?", "tgv-kv", 0.5, 4)
        assert str(e.value) == expected
        with pytest.raises(ValueError) as e:
            compare(model, proc, [img], "what is the color of the circle ?", "tgv-kv", 0.5, 4)
        assert str(e.value) == expected
        assert calls == []  # not a single forward pass
        with torch.inference_mode():
            res = generate(model, proc, [img], "what is the colour of the circle ?", "tgv-kv", 0.5, 2)
        assert len(res.token_ids) >= 1 and calls  # known words run
    finally:
        hook.remove()


def test_cli_exits_2_with_the_message(capsys, demo_processor):
    rc = cli_main(["run", "--image", str(EXAMPLES_DIR / README_SCENE), "--question", "what colour is the circle ?"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines()[-1] == f"error: {colour_message(demo_processor)}"


def test_app_shows_the_message_not_a_traceback(demo_processor):
    image = Image.open(EXAMPLES_DIR / README_SCENE)
    with pytest.raises(ValueError) as e:
        H.run_comparison(image, "what colour is the circle ?", M.DEMO, "tgv-kv", 10, 8)
    assert str(e.value) == colour_message(demo_processor)
    h = H.make_ui_handlers(M.ModelPolicy())
    with pytest.raises(gr.Error) as e:
        h["run"](str(EXAMPLES_DIR / README_SCENE), "what colour is the circle ?", M.DEMO, "tgv-kv", 10, 8)
    assert e.value.message == colour_message(demo_processor)


def test_photo_examples_are_labelled_for_real_vlms(demo_processor):
    """The photo panel says it needs a real VLM; every photo question has words the demo model does not know, and
    every scene question only words it knows."""
    import app

    assert "needs a real VLM" in PHOTO_PANEL_LABEL
    demo = app.build_ui()
    labels = {getattr(b, "label", None) for b in demo.blocks.values()}
    assert PHOTO_PANEL_LABEL in labels
    vocab = closed_vocabulary(demo_processor)
    photos, scene_rows = load_examples("photo"), load_examples("scene")
    assert photos and scene_rows
    assert all(vocab.unknown(p.question) for p in photos)
    assert all(not vocab.unknown(s.question) for s in scene_rows)
