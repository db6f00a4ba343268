"""Tests of the bundled demo VLM: scene task determinism, checker, splits, and the shipped model.

They never train. The model test loads ``assets/demo-vlm`` offline exactly as a hub model.
"""

from __future__ import annotations

import hashlib
import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from tgvkv.demo import scenes

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo-vlm")


def _pixels_hash(scene: scenes.Scene) -> str:
    return hashlib.sha256(scene.render().tobytes()).hexdigest()


# --- scene generator ---------------------------------------------------------------------------------


def test_scene_generator_is_deterministic():
    for seed in (0, 1, 7, 12345, 20_000_003):
        a, b = scenes.make_scene(seed), scenes.make_scene(seed)
        assert a == b
        assert _pixels_hash(a) == _pixels_hash(b)
        img = a.render()
        assert img.mode == "RGB" and img.size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
    # fixed reference values, so a change of the generator is noticed
    s = scenes.make_scene(5)
    assert [(o.color, o.shape, o.row, o.col) for o in s.objects] == [
        ("green", "triangle", 0, 1),
        ("red", "square", 0, 2),
        ("blue", "circle", 2, 2),
    ]
    assert scenes.dataset("test", 14) == scenes.dataset("test", 14)
    qa1 = scenes.make_qa(s, "describe", 3)
    qa2 = scenes.make_qa(s, "describe", random.Random(3))
    assert qa1 == qa2


def test_scene_objects_are_drawn_where_they_are():
    for scene in scenes.dataset("val", 50):
        px = scene.scene.render().load()
        for r in range(scenes.GRID):
            for c in range(scenes.GRID):
                cx, cy = c * scenes.CELL + scenes.CELL // 2, r * scenes.CELL + scenes.CELL // 2
                obj = scene.scene.at(r, c)
                colour = px[cx, cy + 3]  # a point inside every shape
                assert colour == (scenes.COLORS[obj.color] if obj else (0, 0, 0))


def test_checker_agrees_with_every_generated_answer():
    qas = []
    for split in ("train", "val", "test"):
        qas += scenes.dataset(split, 700)
    rng = random.Random(0)
    for seed in range(1500):
        scene = scenes.make_scene(seed)
        qas.append(scenes.make_qa(scene, rng.choice(scenes.QUESTION_TYPES), rng))
    assert {qa.qtype for qa in qas} == set(scenes.QUESTION_TYPES)
    for qa in qas:
        assert scenes.check_answer(qa) == qa.answer, qa
        assert scenes.check_followup(qa) == qa.followup_answer, qa
        assert qa.target_cells and all(0 <= r < scenes.GRID and 0 <= c < scenes.GRID for r, c in qa.target_cells)
        # informative words come after the first answer token
        assert qa.answer.split()[0] in {"the", "there"}


def test_repeated_shape_training_scenes_need_the_colour():
    """Training-only scenes with a shared shape: deterministic, checker agrees, no "colour of the <shape>" asked."""
    from tgvkv.demo import train

    for seed in range(400):
        scene = scenes.make_scene(seed, repeat_shapes=True)
        assert scene == scenes.make_scene(seed, repeat_shapes=True)
        assert 2 <= len(scene.objects) <= scenes.MAX_OBJECTS
        assert len({o.shape for o in scene.objects}) < len(scene.objects)  # a shape repeats
        assert len({o.color for o in scene.objects}) == len(scene.objects)  # colours stay unique
        rng = random.Random(seed)
        for qtype in ("shape", "where", "exists", "position", "count", "describe"):
            qa = scenes.make_qa(scene, qtype, rng, followup_type=rng.choice(["shape", "where", "exists", "position"]))
            assert scenes.check_answer(qa) == qa.answer and scenes.check_followup(qa) == qa.followup_answer
    assert scenes.make_scene(5, repeat_shapes=False) == scenes.make_scene(5)  # val/test scenes unchanged
    with pytest.raises(ValueError, match="n_objects must be in 2..3, got 1"):
        scenes.make_scene(0, n_objects=1, repeat_shapes=True)
    cfg = train.TrainConfig(repeat_shapes_frac=1.0, images_per_step=6)
    for step in range(5):
        for _, convs in train.train_groups(cfg, step, [1000 * step]):
            for words, _, _ in convs:
                assert words[:2] != ["what", "color"] and "user : what color" not in " ".join(words)


def test_splits_share_no_scene():
    ranges = {s: scenes.split_seeds(s) for s in ("train", "val", "test")}
    names = list(ranges)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ra, rb = ranges[a], ranges[b]
            assert ra.stop <= rb.start or rb.stop <= ra.start
    layouts = {}
    for split, n in (("train", 2000), ("val", 500), ("test", 500)):
        layouts[split] = {qa.scene.layout_key() for qa in scenes.dataset(split, n)}
        assert all(scenes.layout_split(qa.scene) == split for qa in scenes.dataset(split, 50))
    assert not layouts["train"] & layouts["test"]
    assert not layouts["train"] & layouts["val"]
    assert not layouts["val"] & layouts["test"]


def test_cell_to_patch_box():
    assert scenes.cell_to_patch_box(0, 0) == (0, 0, 4, 4)
    assert scenes.cell_to_patch_box(2, 1) == (8, 4, 12, 8)
    assert scenes.cell_to_object_patch_box(1, 1) == (5, 5, 7, 7)
    with pytest.raises(ValueError):
        scenes.cell_to_patch_box(3, 0)


def test_normalise():
    assert scenes.normalise("The circle is red.</s>") == "the circle is red ."
    assert scenes.normalise("  there is one   object . ") == "there is one object ."


# --- tokenizer, processor and training format -----------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(ASSETS)


def test_tokenizer_round_trip(processor):
    tok = processor.tokenizer
    for qa in scenes.dataset("test", 70):
        for text in (qa.question, qa.answer, qa.followup_question, qa.followup_answer):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text
    assert tok.decode(tok("What color is the circle?")["input_ids"]) == "what color is the circle ?"
    assert tok.convert_tokens_to_ids("<image>") == tok.convert_tokens_to_ids(processor.image_token)


def test_chat_template_and_training_format_match(processor):
    from tgvkv.demo import train

    packer = train.Packer(processor)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "USER: <image>\nWhat color is the circle? ASSISTANT:"
    for qa in scenes.dataset("val", 14):
        for followup in (False, True):
            words, _ = train.conversation_tokens(qa, followup)
            text = processor.apply_chat_template(train.conversation_messages(qa, followup), tokenize=False)
            enc = processor(images=qa.scene.render(), text=text, return_tensors="pt")
            assert enc["input_ids"][0].tolist() == packer.prefix_ids + packer.ids(words)
            assert len(packer.prefix_ids) - 2 == 144


# --- the shipped model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(2)
    return AutoModelForImageTextToText.from_pretrained(ASSETS).eval()


def test_model_files_and_config(model):
    total = sum(os.path.getsize(os.path.join(ASSETS, f)) for f in os.listdir(ASSETS))
    assert total <= 40 * 2**20
    assert os.path.exists(os.path.join(ASSETS, "model.safetensors"))
    assert model.config.image_token_id is not None
    assert model.config.image_seq_length >= 144
    assert model.generation_config.eos_token_id == model.config.text_config.eos_token_id is not None


def test_packed_training_forward_matches_unpacked(model, processor):
    import torch

    from tgvkv.demo import train

    packer = train.Packer(processor)
    qa = scenes.dataset("test", 3)[2]
    convs = [(*train.conversation_tokens(qa, f), 0) for f in (True, False)]
    batch = packer.pack([(qa.scene.render(), convs)])
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            pixel_values=batch["pixel_values"],
        ).logits
        ids = torch.tensor([packer.prefix_ids + packer.ids(convs[1][0])])
        single = model(input_ids=ids, pixel_values=batch["pixel_values"]).logits
    n0, n1 = len(packer.prefix_ids), len(convs[0][0])
    assert torch.allclose(packed[0, n0 + n1 : n0 + n1 + len(convs[1][0])], single[0, n0:], atol=1e-4)


# The first test-split question of every type (scenes.dataset("test", 7, style=...)) with its follow-up: (seed,
# question, answer, follow-up question, follow-up answer) per answer style; the answers are the task's (ground truth)
FIXED_TEST_QUESTIONS = {
    "sentence": [
        (20000015, "what color is the triangle ?", "the triangle is white .",
         "is there a green triangle ?", "there is no green triangle ."),
        (20000021, "what shape is the blue object ?", "the blue object is a circle .",
         "what shape is the red object ?", "the red object is a triangle ."),
        (20000132, "where is the blue square ?", "the blue square is at the bottom left .",
         "where is the blue square ?", "the blue square is at the bottom left ."),
        (20000184, "what is at the top left ?", "there is a blue square at the top left .",
         "where is the red triangle ?", "the red triangle is at the top middle ."),
        (20000231, "is there a white triangle ?", "there is a white triangle at the bottom middle .",
         "what is at the top middle ?", "there is nothing at the top middle ."),
        (20000234, "how many objects are there ?", "there is one object .",
         "what shape is the purple object ?", "the purple object is a circle ."),
        (20000261, "describe the image .",
         "there is a green square at the top left , a white triangle at the middle right and a yellow circle at the "
         "bottom right .", "where is the yellow circle ?", "the yellow circle is at the bottom right ."),
    ],
    "short": [
        (20000015, "what color is the triangle ?", "white", "is there a green triangle ?", "no"),
        (20000021, "what shape is the blue object ?", "circle", "what shape is the red object ?", "triangle"),
        (20000132, "where is the blue square ?", "bottom left", "where is the blue square ?", "bottom left"),
        (20000184, "what is at the top left ?", "blue square", "where is the red triangle ?", "top middle"),
        (20000231, "is there a white triangle ?", "yes", "what is at the top middle ?", "nothing"),
        (20000234, "how many objects are there ?", "one", "what shape is the purple object ?", "circle"),
        (20000261, "describe the image .", "green square , white triangle and yellow circle",
         "where is the yellow circle ?", "bottom right"),
    ],
}


@pytest.mark.parametrize("style", ["sentence", "short"])
def test_model_answers_fixed_test_questions(model, processor, style):
    """Greedy answers of the shipped model on fixed test scenes, first question and follow-up, in both styles."""
    from tgvkv.demo import evaluate

    qas = scenes.dataset("test", 7, style=style)
    suffix = f" {scenes.SHORT_SUFFIX}" if style == "short" else ""
    assert [(qa.scene.seed, qa.question, qa.answer, qa.followup_question, qa.followup_answer) for qa in qas] == [
        (seed, q + suffix, a, fq + suffix, fa) for seed, q, a, fq, fa in FIXED_TEST_QUESTIONS[style]]
    answers = evaluate.run_answers_batched(model, processor, qas, followup=True, batch_size=len(qas))
    assert answers == [(a, fa) for _, _, a, _, fa in FIXED_TEST_QUESTIONS[style]]
    # the one-at-a-time path (what an app does) gives the same answers, token for token
    assert evaluate.run_answer(model, processor, qas[0], followup=True) == answers[0]


@pytest.mark.parametrize("style", ["sentence", "short"])
def test_model_accuracy_floor_on_test_split(model, processor, style):
    """Regression guard: the first 70 test questions (10 per type) in each answer style; the full tables (300 per
    type and style, test and fresh splits) are in the model card."""
    from tgvkv.demo import evaluate

    qas = scenes.dataset("test", 70, style=style)
    res = evaluate.evaluate(model, processor, qas, batch_size=70)
    # shipped v2: 0.986 in both styles on these 70 (describe 9/10, every other type 10/10)
    assert res["overall"] >= 0.95, res["per_type"]
    assert min(t["accuracy"] for t in res["per_type"].values()) >= 0.8, res["per_type"]
