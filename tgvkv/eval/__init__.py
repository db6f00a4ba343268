"""Accuracy of KV-eviction methods x budgets on a VQA task: `python -m tgvkv.eval --help`.

Modules: tasks (demo task, JSONL folder task), metrics (exact / VQA / ANLS), runner (resumable, data-parallel
runs; rows -> summary), plot (accuracy vs budget).
"""
from .metrics import anls, exact_match, score, vqa_accuracy, vqa_accuracy_official
from .runner import EvalConfig, available_methods, run, summarise
from .tasks import Example, Task, load_task

__all__ = ["EvalConfig", "run", "summarise", "available_methods", "load_task", "Task", "Example", "score",
           "exact_match", "vqa_accuracy", "vqa_accuracy_official", "anls"]
