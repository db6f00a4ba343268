"""Evaluation tasks: the bundled demo model's scene task, or a folder with a JSONL file of image questions.

Folder task: ``--task FOLDER`` (or a ``.jsonl`` file). The folder holds one JSONL file (``data.jsonl`` is preferred
when there are several) with one example per line; image paths are relative to the JSONL file::

    {"image": "images/0001.png", "question": "what is written on the sign?", "answers": ["stop", "stop", ...],
     "id"?: "0001", "qtype"?: "ocr", "metric"?: "exact" | "vqa" | "vqa10" | "anls",
     "followup_question"?: "...", "followup_answers"?: ["..."]}

``image`` may also be a list of paths (several images in one turn). ``answers`` may be a single string.
The metric of a line defaults to the task's ``--metric``; ``auto`` means ``vqa`` when the line has at least
3 reference answers (VizWiz/TextVQA style, 10 answers from annotators) and ``exact`` otherwise.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from .metrics import METRICS, normalise_basic

DEMO_DEFAULT_LIMIT = 350  # 50 questions per question type


@dataclass(frozen=True)
class Example:
    id: str
    index: int  # position in the task (deterministic order, the sort key of result rows)
    question: str
    answers: tuple[str, ...]
    metric: str
    qtype: str = ""
    followup_question: str | None = None
    followup_answers: tuple[str, ...] = ()
    followup_qtype: str = ""
    load_images: Callable[[], list[Image.Image]] = field(default=lambda: [], compare=False, repr=False)


@dataclass
class Task:
    name: str
    examples: list[Example]
    normalise: Callable[[str], str] | None = None  # None: each metric's own normaliser
    info: dict = field(default_factory=dict)  # what identifies the task (stored with the results)


DEMO_TASKS = {"demo": "sentence", "demo-short": "short"}  # task name -> answer style of the demo scene task


def load_task(spec: str, limit: int | None = None, split: str = "test", metric: str = "auto") -> Task:
    """`demo` / `demo-short` (the bundled model's scene task, sentence or short answers) or a folder / JSONL file."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if spec in DEMO_TASKS:
        return demo_task(split, limit if limit is not None else DEMO_DEFAULT_LIMIT, style=DEMO_TASKS[spec])
    return folder_task(spec, limit, metric)


def demo_task(split: str = "test", n: int = DEMO_DEFAULT_LIMIT, style: str = "sentence") -> Task:
    """`n` questions of the demo scene task's split (question types in rotation, so balanced); exact match after
    the task's `normalise`, as the model card reports. `style="short"` asks the same questions with the benchmark
    suffix ("answer with a single word .") and expects the short answers."""
    from ..demo import scenes

    qas = scenes.dataset(split, n, style=style)
    examples = []
    for i, qa in enumerate(qas):
        examples.append(
            Example(
                id=f"{split}-{i:05d}-s{qa.scene.seed}",
                index=i,
                question=qa.question,
                answers=(qa.answer,),
                metric="exact",
                qtype=qa.qtype,
                followup_question=qa.followup_question,
                followup_answers=(qa.followup_answer,) if qa.followup_answer is not None else (),
                followup_qtype=qa.followup_qtype or "",
                load_images=(lambda scene=qa.scene: [scene.render()]),
            )
        )
    name = next(k for k, v in DEMO_TASKS.items() if v == style)
    info = {"task": "demo", "split": split, "n": len(examples)}
    if style != "sentence":  # sentence-style runs keep the identity they had before styles existed
        info["style"] = style
    return Task(name=name, examples=examples, normalise=scenes.normalise, info=info)


def _jsonl_path(spec: str) -> Path:
    p = Path(spec)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ValueError(f"task {spec!r} is neither 'demo', 'demo-short' nor an existing folder or .jsonl file")
    files = sorted(p.glob("*.jsonl"))
    if not files:
        raise ValueError(f"task folder {spec!r} holds no .jsonl file")
    for preferred in ("data.jsonl", "questions.jsonl"):
        if p / preferred in files:
            return p / preferred
    if len(files) > 1:
        raise ValueError(f"task folder {spec!r} holds several .jsonl files ({', '.join(f.name for f in files)}); "
                         "name one data.jsonl or pass the file")
    return files[0]


def _strings(value, what: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, (str, int, float)) for v in value):
        raise ValueError(f"{where}: {what} must be a non-empty string or list of strings")
    return tuple(str(v) for v in value)


def _open_images(paths: Sequence[Path]) -> list[Image.Image]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def folder_task(spec: str, limit: int | None = None, metric: str = "auto") -> Task:
    if metric != "auto" and metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose auto or one of {', '.join(METRICS)}")
    path = _jsonl_path(spec)
    root = path.parent
    examples: list[Example] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    for n, line in lines:
        if limit is not None and len(examples) >= limit:
            break
        where = f"{path.name} line {n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object")
        q = d.get("question")
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        answers = _strings(d.get("answers", d.get("answer")), "'answers'", where)
        imgs = d.get("image", d.get("images"))
        imgs = [imgs] if isinstance(imgs, str) else imgs
        if not isinstance(imgs, list) or not imgs or not all(isinstance(i, str) for i in imgs):
            raise ValueError(f"{where}: 'image' must be a relative path or a list of paths")
        paths = [root / i for i in imgs]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"{where}: image file not found: {missing[0]}")
        m = d.get("metric", metric)
        if m == "auto":
            m = "vqa" if len(answers) >= 3 else "exact"
        if m not in METRICS:
            raise ValueError(f"{where}: unknown metric {m!r}; choose one of {', '.join(METRICS)}")
        fq = d.get("followup_question")
        if fq is not None and (not isinstance(fq, str) or not fq.strip()):
            raise ValueError(f"{where}: 'followup_question' must be a non-empty string")
        fa = _strings(d.get("followup_answers"), "'followup_answers'", where) if fq is not None else ()
        ex_id = str(d.get("id", f"{len(examples):06d}"))
        if ex_id in seen:
            raise ValueError(f"{where}: duplicate id {ex_id!r}")
        seen.add(ex_id)
        examples.append(
            Example(
                id=ex_id, index=len(examples), question=q, answers=answers, metric=m, qtype=str(d.get("qtype", "")),
                followup_question=fq, followup_answers=fa, followup_qtype=str(d.get("followup_qtype", d.get("qtype", ""))),
                load_images=(lambda paths=tuple(paths): _open_images(paths)),
            )
        )
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return Task(name=str(spec), examples=examples, normalise=None,
                info={"task": "folder", "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                      "n": len(examples), "metric": metric})


__all__ = ["Example", "Task", "load_task", "demo_task", "folder_task", "normalise_basic"]
