"""Exact-match evaluation of the demo VLM on the synthetic scene task (full KV, greedy ``generate``).

    python -m tgvkv.demo.evaluate [--model assets/demo-vlm] [--split test] [--n 300] [--followup]

``--n`` is the number of questions *per question type*. The follow-up (second turn) is asked after the
model's own first answer, as an app would append it to the conversation. Results are printed and
written as JSON (``--json``, default ``<model>/eval_<split>.json``).

The answering function is a parameter: :func:`run_answer` answers one QA with plain ``model.generate``;
another function with the same signature (for example one that evicts KV through the ``tgvkv`` engine)
can be passed to :func:`evaluate`. :func:`run_answers_batched` is the fast path used for plain full-KV
evaluation (left-padded batches; same answers as :func:`run_answer`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import defaultdict
from typing import Callable

from ..loading import DEMO_MODEL_DIR
from . import scenes

log = logging.getLogger("tgvkv.demo.evaluate")

DEFAULT_MODEL = str(DEMO_MODEL_DIR)  # the bundled model, also after a non-editable install (tgvkv.loading)


def load(model_path: str = DEFAULT_MODEL, attn_implementation: str | None = None):
    """Processor and model from a folder, as from the hub (set ``HF_HUB_OFFLINE=1`` to forbid downloads)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs).eval()
    return model, processor


def messages_for(question: str, history: tuple[tuple[str, str], ...] = ()) -> list[dict]:
    """Chat messages: the image comes with the first user turn; ``history`` holds earlier (Q, A) turns."""
    turns = list(history) + [(question, None)]
    msgs: list[dict] = []
    for k, (q, a) in enumerate(turns):
        content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": q}]
        msgs.append({"role": "user", "content": content})
        if a is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return msgs


def prompt_for(processor, question: str, history: tuple[tuple[str, str], ...] = ()) -> str:
    return processor.apply_chat_template(messages_for(question, history), add_generation_prompt=True, tokenize=False)


def _generate(model, processor, images, prompts: list[str], max_new_tokens: int) -> list[str]:
    import torch

    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
    new = out[:, enc["input_ids"].shape[1] :]
    return [scenes.normalise(t) for t in processor.batch_decode(new, skip_special_tokens=True)]


def run_answer(model, processor, qa: scenes.QA, followup: bool = False, max_new_tokens: int = 48):
    """Answer ``qa.question`` (and, if asked, its follow-up after the model's own first answer).

    Returns ``(answer, followup_answer_or_None)``, both normalised.
    """
    image = qa.scene.render()
    first = _generate(model, processor, [image], [prompt_for(processor, qa.question)], max_new_tokens)[0]
    second = None
    if followup and qa.followup_question:
        prompt = prompt_for(processor, qa.followup_question, ((qa.question, first),))
        second = _generate(model, processor, [image], [prompt], max_new_tokens)[0]
    return first, second


def run_answers_batched(model, processor, qas, followup: bool = False, batch_size: int = 32, max_new_tokens: int = 48):
    """:func:`run_answer` for many QAs at once (left padding). Returns a list of (answer, followup)."""
    processor.tokenizer.padding_side = "left"
    firsts: list[str] = []
    for s in range(0, len(qas), batch_size):
        chunk = qas[s : s + batch_size]
        firsts += _generate(model, processor, [q.scene.render() for q in chunk], [prompt_for(processor, q.question) for q in chunk], max_new_tokens)
    seconds: list[str | None] = [None] * len(qas)
    if followup:
        for s in range(0, len(qas), batch_size):
            chunk = qas[s : s + batch_size]
            prompts = [prompt_for(processor, q.followup_question, ((q.question, a),)) for q, a in zip(chunk, firsts[s : s + batch_size])]
            seconds[s : s + batch_size] = _generate(model, processor, [q.scene.render() for q in chunk], prompts, max_new_tokens)
    return list(zip(firsts, seconds))


def balanced_dataset(split: str, n_per_type: int, style: str = "sentence") -> list[scenes.QA]:
    """``n_per_type`` questions of every type (types in rotation over the split's scenes), in one answer style."""
    return scenes.dataset(split, n_per_type * len(scenes.QUESTION_TYPES), style=style)


def evaluate_styles(model, processor, split: str, n_per_type: int, styles=scenes.ANSWER_STYLES, followup: bool = True,
                    batch_size: int = 32) -> dict:
    """:func:`evaluate` once per answer style on the same scenes and questions: ``{"styles": {style: result}}``."""
    out = {"split": split, "n_per_type": n_per_type, "styles": {}}
    for style in styles:
        qas = balanced_dataset(split, n_per_type, style)
        out["styles"][style] = evaluate(model, processor, qas, followup=followup, batch_size=batch_size)
        log.info("%s: overall %.4f", style, out["styles"][style]["overall"])
    out["seconds"] = round(sum(r["seconds"] for r in out["styles"].values()), 1)
    return out


def format_style_table(results: dict[str, dict], columns: dict[str, str] | None = None) -> str:
    """One markdown table, a column per (label -> style result); rows: question types, overall, follow-ups.

    ``results`` maps a column label (e.g. "v2 sentence") to one :func:`evaluate` result.
    """
    labels = list(results)
    first = results[labels[0]]
    lines = ["| question type | n | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]

    def cell(r: dict, key: str, t: str | None) -> str:
        if t is None:
            return f"**{100 * r[key]:.1f}**" if key in r else "n/a"
        block = r.get(key, {}).get(t)
        return f"{100 * block['accuracy']:.1f}" if block else "n/a"

    for t, blk in first["per_type"].items():
        lines.append(f"| {t} | {blk['n']} | " + " | ".join(cell(results[x], "per_type", t) for x in labels) + " |")
    lines.append(f"| **overall** | {first['n']} | " + " | ".join(cell(results[x], "overall", None) for x in labels) + " |")
    if "followup_per_type" in first:
        for t, blk in first["followup_per_type"].items():
            lines.append(f"| follow-up: {t} | {blk['n']} | "
                         + " | ".join(cell(results[x], "followup_per_type", t) for x in labels) + " |")
        n = sum(b["n"] for b in first["followup_per_type"].values())
        lines.append(f"| **follow-up overall** | {n} | "
                     + " | ".join(cell(results[x], "followup_overall", None) for x in labels) + " |")
    return "\n".join(lines)


def evaluate(model, processor, qas, followup: bool = False, answer_fn: Callable | None = None, batch_size: int = 32) -> dict:
    """Exact-match accuracy overall and per question type (and for follow-ups if asked).

    ``answer_fn(model, processor, qa, followup=...) -> (answer, followup_answer)`` defaults to the batched
    plain-``generate`` path.
    """
    t0 = time.time()
    if answer_fn is None:
        answers = run_answers_batched(model, processor, qas, followup=followup, batch_size=batch_size)
    else:
        answers = [answer_fn(model, processor, qa, followup=followup) for qa in qas]
    per_type: dict[str, list[bool]] = defaultdict(list)
    fu_type: dict[str, list[bool]] = defaultdict(list)
    errors = []
    for qa, (a, fa) in zip(qas, answers):
        ok = a == scenes.normalise(qa.answer)
        per_type[qa.qtype].append(ok)
        if not ok and len(errors) < 50:
            errors.append({"seed": qa.scene.seed, "question": qa.question, "expected": qa.answer, "got": a})
        if followup and qa.followup_question:
            fu_type[qa.followup_qtype].append(fa == scenes.normalise(qa.followup_answer))
    firsts = [x for v in per_type.values() for x in v]
    res = {
        "n": len(qas),
        "overall": sum(firsts) / len(firsts),
        "per_type": {t: {"n": len(per_type[t]), "accuracy": sum(per_type[t]) / len(per_type[t])} for t in scenes.QUESTION_TYPES if per_type[t]},
        "seconds": round(time.time() - t0, 1),
        "errors": errors,
    }
    if followup:
        fus = [x for v in fu_type.values() for x in v]
        res["followup_overall"] = sum(fus) / len(fus)
        res["followup_per_type"] = {t: {"n": len(v), "accuracy": sum(v) / len(v)} for t, v in sorted(fu_type.items())}
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--split", default="test", choices=["train", "val", "test", "fresh"],
                    help="'fresh': a seed range no split draws from (test-split layouts)")
    ap.add_argument("--styles", default=",".join(scenes.ANSWER_STYLES),
                    help="answer styles to evaluate, comma-separated (sentence, short)")
    ap.add_argument("--n", type=int, default=300, help="questions per question type")
    ap.add_argument("--followup", action="store_true", help="also ask each QA's follow-up as a second turn")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="output JSON path (default <model>/eval_<split>.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    styles = [x.strip() for x in args.styles.split(",") if x.strip()]
    unknown = [x for x in styles if x not in scenes.ANSWER_STYLES]
    if unknown or not styles:
        ap.error(f"--styles: unknown style(s) {unknown}; choose from {', '.join(scenes.ANSWER_STYLES)}")
    model, processor = load(args.model)
    res = evaluate_styles(model, processor, args.split, args.n, styles, followup=args.followup,
                          batch_size=args.batch_size)
    res.update({"model": os.path.abspath(args.model), "method": "full KV, greedy"})
    print(format_style_table(res["styles"]))
    path = args.json or os.path.join(args.model, f"eval_{args.split}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path} (the model card is written from it by python -m tgvkv.demo.card)")


if __name__ == "__main__":
    main()
