"""Example inputs shipped in assets/examples/: synthetic scenes for the demo model and a few freely licensed photos.

The files are precomputed (``python -m analysis.webapp.examples`` rebuilds them), so the app needs neither the scene
generator nor the network at run time. ``examples.json`` lists each example's image, question and, for scenes,
the reference answer.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tgvkv.loading import ASSETS_DIR

log = logging.getLogger(__name__)

EXAMPLES_DIR = ASSETS_DIR / "examples"
INDEX = EXAMPLES_DIR / "examples.json"
#: the app's titles of the two example panels: photos ask about things the demo model has no words for
SCENE_PANEL_LABEL = "Synthetic scenes (demo model)"
PHOTO_PANEL_LABEL = "Photos: needs a real VLM (choose a hub model; the demo model only knows the scenes' words)"
#: test-split scenes (disjoint from training) covering every question type
SCENE_SEEDS_PER_TYPE = 1
PHOTO_MAX_SIDE = 384


@dataclass(frozen=True)
class Example:
    kind: str  # "scene" | "photo"
    image: str  # path relative to EXAMPLES_DIR
    question: str
    answer: str | None = None  # reference answer (scenes only)
    label: str = ""

    @property
    def path(self) -> Path:
        return EXAMPLES_DIR / self.image


def load_examples(kind: str | None = None) -> list[Example]:
    """Examples from assets/examples/examples.json (empty list, with a log line, if the index is missing)."""
    if not INDEX.is_file():
        log.warning("no example index at %s (build it: python -m analysis.webapp.examples)", INDEX)
        return []
    rows = [Example(**r) for r in json.loads(INDEX.read_text())]
    return [r for r in rows if kind is None or r.kind == kind]


def build_scene_examples(n: int = 7, n_short: int = 4) -> list[Example]:
    """Render `n` test-split scenes (one per question type, in rotation) into assets/examples/scenes/; the first
    `n_short` of them are listed a second time in the short answer style (the benchmark suffix "answer with a single
    word ."), which the demo model v2 answers as benchmarks expect."""
    from tgvkv.demo import scenes

    out_dir = EXAMPLES_DIR / "scenes"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for qa in scenes.dataset("test", n):
        name = f"scenes/scene_{qa.scene.seed}.png"
        qa.scene.render().save(EXAMPLES_DIR / name, optimize=True)
        rows.append(Example("scene", name, qa.question, qa.answer, f"{qa.qtype}: {qa.question}"))
    for qa in scenes.dataset("test", n_short, style="short"):  # same scenes and questions, short answers
        name = f"scenes/scene_{qa.scene.seed}.png"
        rows.append(Example("scene", name, qa.question, qa.answer, f"{qa.qtype} (short answer): {qa.question}"))
    return rows


#: the scene README.md's snippets use: the first test-split scene with three objects, one of them a circle
README_SCENE = "demo_scene.png"
README_QUESTION = "what color is the circle ?"


def build_readme_scene() -> Path:
    """Render README.md's example scene into assets/examples/ (the model never saw it: test split)."""
    from tgvkv.demo import scenes

    scene = next(s for s in scenes.scenes("test") if len(s.objects) == 3 and s.find(shape="circle"))
    path = EXAMPLES_DIR / README_SCENE
    scene.render().save(path, optimize=True)
    return path


#: (output name, source finder, question, licence line for README)
PHOTOS = (
    ("photos/flower.jpg", "sklearn:flower.jpg", "What colour is the flower?"),
    ("photos/china.jpg", "sklearn:china.jpg", "What kind of building is in the picture?"),
    ("photos/grace_hopper.jpg", "matplotlib:grace_hopper.jpg", "What is the person wearing?"),
)


def _photo_source(spec: str) -> Path:
    package, name = spec.split(":")
    if package == "sklearn":
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images" / name
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data(name, asfileobj=False))


def build_photo_examples() -> list[Example]:
    """Downscaled copies of the freely licensed photos that ship with scikit-learn and matplotlib (see README.md)."""
    rows = []
    (EXAMPLES_DIR / "photos").mkdir(parents=True, exist_ok=True)
    for name, spec, question in PHOTOS:
        with Image.open(_photo_source(spec)) as im:
            im = im.convert("RGB")
            im.thumbnail((PHOTO_MAX_SIDE, PHOTO_MAX_SIDE), Image.Resampling.LANCZOS)
            im.save(EXAMPLES_DIR / name, quality=85, optimize=True)
        rows.append(Example("photo", name, question, None, f"photo: {question}"))
    return rows


def build_all() -> list[Example]:
    rows = build_scene_examples() + build_photo_examples()
    INDEX.write_text(json.dumps([vars(r) for r in rows], indent=1) + "\n")
    build_readme_scene()
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    for r in build_all():
        print(r.kind, r.image, r.question)
