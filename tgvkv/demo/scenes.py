"""Synthetic scene task for the bundled demo VLM.

A scene is a 96x96 RGB image with a 3x3 grid of 32-px cells. Each cell holds at most one object: a
16-px shape (circle, square or triangle) of one of six colours, centred in its cell, so an object covers
exactly 2x2 ViT patches of 8 px. A scene has 1 to 3 objects with distinct shapes and distinct colours, so
"the circle" and "the red object" always name one object.

Questions need evidence from a small region of the image and are answered with a short sentence whose
informative words come after the first token ("the circle is red ."), as real VLMs answer. Every
:class:`QA` also carries a follow-up question about a different region of the same image (a second
turn on the same cache) and the grid cells holding the evidence for each answer.

Everything is deterministic for a seed. Splits come from disjoint seed ranges *and* a disjoint partition
of object layouts (a hash of the layout picks its split), so no test scene appears in training.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 96  # pixels per side
GRID = 3  # cells per side
CELL = IMAGE_SIZE // GRID  # 32 px
PATCH = 8  # ViT patch size; the image is 12 x 12 = 144 patches
OBJECT = 16  # object side in pixels: exactly 2 x 2 patches, centred in its cell
MAX_OBJECTS = 3

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 255),
    "yellow": (240, 230, 40),
    "purple": (170, 60, 220),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "middle", "right")
NUMBER_WORDS = ("zero", "one", "two", "three")

# "color": colour of a named shape; "shape": shape of a named colour; "where" (spatial): position of a
# named object; "position" (spatial): what is in a named cell; "exists": is there a {colour} {shape};
# "count": how many objects; "describe": every object with its position, in reading order.
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "where", "position", "exists", "count", "describe")
FOLLOWUP_TYPES: tuple[str, ...] = ("color", "shape", "where", "position", "exists")

# Answer styles. "sentence": "the circle is red ." (informative words after the first token). "short": the
# question ends with the benchmark suffix below and the answer is the informative part alone, as LLaVA-style
# models answer VQA benchmarks: a word ("red", "circle", "yes", "two"), or the shortest phrase that can
# answer (a position "top left", an object "red circle", an object list for "describe").
ANSWER_STYLES: tuple[str, ...] = ("sentence", "short")
SHORT_SUFFIX = "answer with a single word ."

_SPLIT_SEEDS = {
    "train": range(0, 10_000_000),
    "val": range(10_000_000, 11_000_000),
    "test": range(20_000_000, 21_000_000),
    # a second held-out range no other split draws from; its layouts are the test split's (hash bucket 0)
    "fresh": range(30_000_000, 31_000_000),
}
_HELD_OUT_BUCKETS = 20  # layout hash mod 20: 0 -> test, 1 -> val, others -> train


def position_name(row: int, col: int) -> str:
    """Words for a grid cell: "top left", "center", "bottom middle", ..."""
    if (row, col) == (1, 1):
        return "center"
    return f"{ROW_NAMES[row]} {COL_NAMES[col]}"


POSITIONS: dict[str, tuple[int, int]] = {position_name(r, c): (r, c) for r in range(GRID) for c in range(GRID)}


def cell_to_patch_box(row: int, col: int) -> tuple[int, int, int, int]:
    """ViT patch range ``(r0, c0, r1, c1)`` (end exclusive) covered by a grid cell (4 x 4 patches)."""
    if not (0 <= row < GRID and 0 <= col < GRID):
        raise ValueError(f"cell ({row}, {col}) outside the {GRID}x{GRID} grid")
    k = CELL // PATCH
    return row * k, col * k, (row + 1) * k, (col + 1) * k


def cell_to_object_patch_box(row: int, col: int) -> tuple[int, int, int, int]:
    """ViT patch range ``(r0, c0, r1, c1)`` (end exclusive) covered by the object drawn in a cell (2 x 2)."""
    r0, c0, _, _ = cell_to_patch_box(row, col)
    off = (CELL - OBJECT) // 2 // PATCH
    n = OBJECT // PATCH
    return r0 + off, c0 + off, r0 + off + n, c0 + off + n


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)


@dataclass(frozen=True)
class Scene:
    seed: int
    objects: tuple[SceneObject, ...]  # sorted in reading order (row, then column)

    def render(self) -> Image.Image:
        """Draw the scene: black background, each object a 16-px shape centred in its cell."""
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
        draw = ImageDraw.Draw(img)
        pad = (CELL - OBJECT) // 2
        for o in self.objects:
            x0, y0 = o.col * CELL + pad, o.row * CELL + pad
            x1, y1 = x0 + OBJECT - 1, y0 + OBJECT - 1
            fill = COLORS[o.color]
            if o.shape == "circle":
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            elif o.shape == "square":
                draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=fill)
            elif o.shape == "triangle":
                draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
            else:
                raise ValueError(f"unknown shape {o.shape!r}")
        return img

    def layout_key(self) -> str:
        """Canonical description of the object layout (what makes two scenes the same)."""
        return ";".join(f"{o.color},{o.shape},{o.row},{o.col}" for o in self.objects)

    def find(self, color: str | None = None, shape: str | None = None) -> list[SceneObject]:
        return [o for o in self.objects if (color is None or o.color == color) and (shape is None or o.shape == shape)]

    def at(self, row: int, col: int) -> SceneObject | None:
        for o in self.objects:
            if (o.row, o.col) == (row, col):
                return o
        return None


@dataclass(frozen=True)
class QA:
    scene: Scene
    qtype: str
    question: str
    answer: str
    followup_question: str | None
    followup_answer: str | None
    target_cells: tuple[tuple[int, int], ...]
    followup_qtype: str | None = None
    followup_target_cells: tuple[tuple[int, int], ...] = ()
    style: str = "sentence"  # answer style of the first question (see ANSWER_STYLES)
    followup_style: str = "sentence"


def layout_split(scene: Scene) -> str:
    """Which split a layout belongs to (a hash of :meth:`Scene.layout_key`)."""
    h = int.from_bytes(hashlib.sha256(scene.layout_key().encode()).digest()[:8], "big") % _HELD_OUT_BUCKETS
    return "test" if h == 0 else "val" if h == 1 else "train"


def _layout_ok(scene: Scene, split: str) -> bool:
    return layout_split(scene) == ("test" if split == "fresh" else split)


def make_scene(seed: int, n_objects: int | None = None, repeat_shapes: bool = False) -> Scene:
    """Deterministic scene for a seed: 1-3 objects, distinct shapes, colours and cells.

    ``repeat_shapes`` (training only; never used for val/test): scenes of 2-3 objects where at least two objects
    share a shape, so that finding "the red object" or "the red circle" needs the colour, not the shape alone.
    Colours stay distinct, so questions keyed by colour stay unambiguous.
    """
    rng = random.Random(seed)
    n = n_objects if n_objects is not None else rng.randint(2 if repeat_shapes else 1, MAX_OBJECTS)
    if not (2 if repeat_shapes else 1) <= n <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in {2 if repeat_shapes else 1}..{MAX_OBJECTS}, got {n}")
    if repeat_shapes:
        shared = rng.choice(SHAPES)
        shapes = [shared, shared] + [rng.choice(SHAPES) for _ in range(n - 2)]
        rng.shuffle(shapes)
    else:
        shapes = rng.sample(SHAPES, n)
    colors = rng.sample(sorted(COLORS), n)
    cells = rng.sample(range(GRID * GRID), n)
    objs = [SceneObject(c, s, cell // GRID, cell % GRID) for c, s, cell in zip(colors, shapes, cells)]
    objs.sort(key=lambda o: (o.row, o.col))
    return Scene(seed=seed, objects=tuple(objs))


def split_seeds(split: str) -> range:
    """Seed range of a split; ranges are disjoint (layouts are further partitioned by :func:`layout_split`)."""
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_SEEDS)}")
    return _SPLIT_SEEDS[split]


def scenes(split: str, start: int = 0):
    """Iterate over the scenes of a split, in seed order, from the ``start``-th seed of its range."""
    for seed in split_seeds(split)[start:]:
        scene = make_scene(seed)
        if _layout_ok(scene, split):
            yield scene


# ---------------------------------------------------------------------------------------------------
# Questions and answers


def _a(obj: SceneObject) -> str:
    return f"a {obj.color} {obj.shape}"


def _describe(scene: Scene) -> str:
    parts = [f"{_a(o)} at the {o.position}" for o in scene.objects]
    if len(parts) == 1:
        body = parts[0]
    else:
        body = " , ".join(parts[:-1]) + " and " + parts[-1]
    return f"there is {body} ."


def _count(scene: Scene) -> str:
    n = len(scene.objects)
    return "there is one object ." if n == 1 else f"there are {NUMBER_WORDS[n]} objects ."


def _short_describe(scene: Scene) -> str:
    parts = [f"{o.color} {o.shape}" for o in scene.objects]
    return parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]


def short_answer(scene: Scene, qtype: str, question: str, answer: str) -> str:
    """The short-style answer of a question whose sentence answer is ``answer``."""
    q = normalise(question)
    if qtype == "color":
        return answer.split()[-2]  # "the circle is red ." -> "red"
    if qtype == "shape":
        return answer.split()[-2]  # "the red object is a circle ." -> "circle"
    if qtype == "where":
        return answer.split(" is at the ")[1].rstrip(" .")  # "... is at the top left ." -> "top left"
    if qtype == "position":
        return "nothing" if answer.startswith("there is nothing") else " ".join(answer.split()[3:5])
    if qtype == "exists":
        return "no" if answer.startswith("there is no ") else "yes"
    if qtype == "count":
        return NUMBER_WORDS[len(scene.objects)]
    if qtype == "describe":
        return _short_describe(scene)
    raise ValueError(f"unknown question type {qtype!r} for question {q!r}")


def styled(question: str, style: str) -> str:
    """A question in an answer style: the short style appends :data:`SHORT_SUFFIX`."""
    if style not in ANSWER_STYLES:
        raise ValueError(f"unknown answer style {style!r}; expected one of {ANSWER_STYLES}")
    return f"{question} {SHORT_SUFFIX}" if style == "short" else question


def _ask(scene: Scene, qtype: str, rng: random.Random, avoid: frozenset[tuple[int, int]] = frozenset()):
    """One (question, answer, target cells) of a type; prefers evidence outside the cells in ``avoid``."""
    objs = [o for o in scene.objects if o.cell not in avoid] or list(scene.objects)
    if qtype == "color":
        o = rng.choice(objs)
        return f"what color is the {o.shape} ?", f"the {o.shape} is {o.color} .", (o.cell,)
    if qtype == "shape":
        o = rng.choice(objs)
        return f"what shape is the {o.color} object ?", f"the {o.color} object is a {o.shape} .", (o.cell,)
    if qtype == "where":
        o = rng.choice(objs)
        return f"where is the {o.color} {o.shape} ?", f"the {o.color} {o.shape} is at the {o.position} .", (o.cell,)
    if qtype == "position":
        cells = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in avoid]
        empty = [c for c in cells if scene.at(*c) is None]
        full = [c for c in cells if scene.at(*c) is not None]
        # about two thirds of the questions point at an object, the rest at an empty cell
        cell = rng.choice(full) if full and (not empty or rng.random() < 0.67) else rng.choice(empty)
        o, pos = scene.at(*cell), position_name(*cell)
        ans = f"there is {_a(o)} at the {pos} ." if o else f"there is nothing at the {pos} ."
        return f"what is at the {pos} ?", ans, (cell,)
    if qtype == "exists":
        if rng.random() < 0.5:
            o = rng.choice(objs)
            return f"is there a {o.color} {o.shape} ?", f"there is {_a(o)} at the {o.position} .", (o.cell,)
        # a hard negative: the colour or the shape is in the scene, but not the pair
        o = rng.choice(objs)
        while True:
            if rng.random() < 0.5:
                color, shape = o.color, rng.choice([s for s in SHAPES if s != o.shape])
            else:
                color, shape = rng.choice([c for c in sorted(COLORS) if c != o.color]), o.shape
            if not scene.find(color, shape):
                break
        cells = tuple(x.cell for x in scene.objects if x.color == color or x.shape == shape)
        return f"is there a {color} {shape} ?", f"there is no {color} {shape} .", cells
    if qtype == "count":
        return "how many objects are there ?", _count(scene), tuple(o.cell for o in scene.objects)
    if qtype == "describe":
        return "describe the image .", _describe(scene), tuple(o.cell for o in scene.objects)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def make_qa(
    scene: Scene,
    qtype: str,
    rng_or_seed: random.Random | int,
    followup_type: str | None = None,
    style: str = "sentence",
    followup_style: str | None = None,
) -> QA:
    """A question of type ``qtype`` about ``scene`` plus a follow-up about a different region.

    The follow-up type is drawn from :data:`FOLLOWUP_TYPES` unless given; its evidence avoids the first
    question's target cells whenever the scene allows it. ``style`` is the first question's answer style,
    ``followup_style`` the follow-up's (default: the same). The random draws do not depend on the styles, so
    the two styles of a seed ask about the same objects.
    """
    rng = rng_or_seed if isinstance(rng_or_seed, random.Random) else random.Random(rng_or_seed)
    followup_style = followup_style or style
    question, answer, cells = _ask(scene, qtype, rng)
    ftype = followup_type or rng.choice(FOLLOWUP_TYPES)
    fq, fa, fcells = _ask(scene, ftype, rng, avoid=frozenset(cells))
    if style == "short":
        answer = short_answer(scene, qtype, question, answer)
    if followup_style == "short":
        fa = short_answer(scene, ftype, fq, fa)
    return QA(scene, qtype, styled(question, style), answer, styled(fq, followup_style), fa, cells, ftype, fcells,
              style, followup_style)


def dataset(split: str, n: int, start: int = 0, style: str = "sentence") -> list[QA]:
    """``n`` deterministic QAs of a split, question types in rotation (balanced), in one answer style."""
    out: list[QA] = []
    for scene in scenes(split, start):
        if len(out) >= n:
            break
        qtype = QUESTION_TYPES[len(out) % len(QUESTION_TYPES)]
        out.append(make_qa(scene, qtype, scene.seed, style=style))
    return out


# ---------------------------------------------------------------------------------------------------
# Checker: recomputes answers from the question text and the scene's objects only

_Q_PATTERNS = [
    (re.compile(r"^what colou?r is the (\w+) \?$"), "color"),
    (re.compile(r"^what shape is the (\w+) object \?$"), "shape"),
    (re.compile(r"^where is the (\w+) (\w+) \?$"), "where"),
    (re.compile(r"^what is at the (.+) \?$"), "position"),
    (re.compile(r"^is there a (\w+) (\w+) \?$"), "exists"),
    (re.compile(r"^how many objects are there \?$"), "count"),
    (re.compile(r"^describe the image \.$"), "describe"),
]


def normalise(answer: str) -> str:
    """Canonical form for exact match: lower case, punctuation split off, single spaces, no special tokens."""
    s = re.sub(r"<[^>]*>", " ", answer.lower())
    s = re.sub(r"([.,?!:;])", r" \1 ", s)
    return " ".join(s.split())


def answer_question(scene: Scene, question: str) -> str:
    """The correct answer to any question of the task, computed from ``scene.objects`` alone.

    A question ending with :data:`SHORT_SUFFIX` gets the short answer (recomputed here, not via
    :func:`short_answer`).
    """
    q = normalise(question)
    if q.endswith(" " + SHORT_SUFFIX):
        return _short_from_sentence(scene, q[: -len(SHORT_SUFFIX) - 1])
    for pattern, kind in _Q_PATTERNS:
        m = pattern.match(q)
        if not m:
            continue
        if kind == "color":
            (o,) = scene.find(shape=m[1])
            return f"the {o.shape} is {o.color} ."
        if kind == "shape":
            (o,) = scene.find(color=m[1])
            return f"the {o.color} object is a {o.shape} ."
        if kind == "where":
            (o,) = scene.find(m[1], m[2])
            return f"the {o.color} {o.shape} is at the {position_name(o.row, o.col)} ."
        if kind == "position":
            o = scene.at(*POSITIONS[m[1]])
            return f"there is a {o.color} {o.shape} at the {m[1]} ." if o else f"there is nothing at the {m[1]} ."
        if kind == "exists":
            found = scene.find(m[1], m[2])
            if found:
                return f"there is a {m[1]} {m[2]} at the {position_name(found[0].row, found[0].col)} ."
            return f"there is no {m[1]} {m[2]} ."
        if kind == "count":
            n = len(scene.objects)
            return "there is one object ." if n == 1 else f"there are {NUMBER_WORDS[n]} objects ."
        parts = [f"a {o.color} {o.shape} at the {position_name(o.row, o.col)}" for o in scene.objects]
        return "there is " + (" , ".join(parts[:-1]) + " and " if len(parts) > 1 else "") + parts[-1] + " ."
    raise ValueError(f"not a question of this task: {question!r}")


def _short_from_sentence(scene: Scene, q: str) -> str:
    for pattern, kind in _Q_PATTERNS:
        m = pattern.match(q)
        if not m:
            continue
        if kind == "color":
            return scene.find(shape=m[1])[0].color
        if kind == "shape":
            return scene.find(color=m[1])[0].shape
        if kind == "where":
            (o,) = scene.find(m[1], m[2])
            return position_name(o.row, o.col)
        if kind == "position":
            o = scene.at(*POSITIONS[m[1]])
            return f"{o.color} {o.shape}" if o else "nothing"
        if kind == "exists":
            return "yes" if scene.find(m[1], m[2]) else "no"
        if kind == "count":
            return NUMBER_WORDS[len(scene.objects)]
        objs = [f"{o.color} {o.shape}" for o in scene.objects]
        return (" , ".join(objs[:-1]) + " and " if len(objs) > 1 else "") + objs[-1]
    raise ValueError(f"not a question of this task: {q!r}")


def check_answer(qa: QA) -> str:
    """Recompute the answer of ``qa.question`` from the scene's objects (independent of :func:`make_qa`)."""
    return answer_question(qa.scene, qa.question)


def check_followup(qa: QA) -> str | None:
    return None if qa.followup_question is None else answer_question(qa.scene, qa.followup_question)


def vocabulary() -> list[str]:
    """Every word the task can produce, in a fixed order (the tokenizer's vocabulary)."""
    words = ["user", "assistant", ":", ".", ",", "?"]
    words += list(COLORS) + list(SHAPES) + ["colour"] + list(ROW_NAMES) + list(COL_NAMES) + ["center"] + list(NUMBER_WORDS)
    words += "what color is the shape object where at is there a no nothing how many objects are describe image and".split()
    words += SHORT_SUFFIX.split() + ["yes"]  # appended last: the ids of the sentence-style words stay as they were
    seen: list[str] = []
    for w in words:
        if w not in seen:
            seen.append(w)
    return seen


#: vocabulary entries that no prompt, question or answer of the task uses: a model trained on the task never saw them
#: ("colour": the British spelling, never asked; "zero": every scene has at least one object)
UNUSED_WORDS = frozenset({"colour", "zero"})


def task_words() -> list[str]:
    """The words a model trained on this task knows: :func:`vocabulary` without :data:`UNUSED_WORDS`."""
    return [w for w in vocabulary() if w not in UNUSED_WORDS]
