"""Bundled demo VLM: a tiny LLaVA trained on synthetic scenes, so the explorer works offline.

- :mod:`tgvkv.demo.scenes`: the seeded scene task (images, questions, answers, checker, splits).
- :mod:`tgvkv.demo.build`: tokenizer, processor (with chat template) and model config.
- :mod:`tgvkv.demo.train`: ``python -m tgvkv.demo.train --out assets/demo-vlm``.
- :mod:`tgvkv.demo.evaluate`: ``python -m tgvkv.demo.evaluate`` (exact match on the test split).

Importing this package is cheap: it imports neither torch nor transformers nor the tgvkv engine.
"""

from .scenes import QA, QUESTION_TYPES, Scene, SceneObject, cell_to_patch_box, check_answer, dataset, make_qa, make_scene

__all__ = [
    "QA",
    "QUESTION_TYPES",
    "Scene",
    "SceneObject",
    "cell_to_patch_box",
    "check_answer",
    "dataset",
    "make_qa",
    "make_scene",
]
