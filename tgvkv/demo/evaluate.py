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


def format_table(res: dict) -> str:
    lines = ["| question type | n | exact match |", "|---|---|---|"]
    for t, r in res["per_type"].items():
        lines.append(f"| {t} | {r['n']} | {100 * r['accuracy']:.1f}% |")
    lines.append(f"| **overall** | {res['n']} | **{100 * res['overall']:.1f}%** |")
    if "followup_per_type" in res:
        for t, r in res["followup_per_type"].items():
            lines.append(f"| follow-up: {t} | {r['n']} | {100 * r['accuracy']:.1f}% |")
        n = sum(r["n"] for r in res["followup_per_type"].values())
        lines.append(f"| **follow-up overall** | {n} | **{100 * res['followup_overall']:.1f}%** |")
    return "\n".join(lines)


def plot_curve(curve: list[dict], path: str) -> None:
    """Training loss and validation exact match against steps (matplotlib object API, no pyplot)."""
    if not curve:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    steps = [r["step"] for r in curve]
    ax1.plot(steps, [r["train_loss_ema"] for r in curve])
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_title("training loss (answer tokens, EMA)")
    for key in [k for k in curve[-1] if k.startswith("val_")]:
        lw = 2.5 if key == "val_overall" else 1
        ax2.plot(steps, [r.get(key, float("nan")) for r in curve], label=key[4:], lw=lw)
    ax2.set_xlabel("step")
    ax2.set_ylim(0, 1.01)
    ax2.set_title("validation exact match (teacher forced = greedy)")
    ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


CARD_TEMPLATE = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [llava, synthetic, tgv-kv, demo]
---
# TGV-KV Explorer demo VLM (`assets/demo-vlm`)

A tiny LLaVA-architecture model trained from scratch on a synthetic scene task, so that the TGV-KV Explorer works
offline with meaningful answers. It loads exactly like a hub model:

```python
import os; os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import AutoProcessor, AutoModelForImageTextToText
processor = AutoProcessor.from_pretrained("assets/demo-vlm")
model = AutoModelForImageTextToText.from_pretrained("assets/demo-vlm")
```

## Task (`tgvkv/demo/scenes.py`)
- 96x96 RGB image, black background, 3x3 grid of 32-px cells; 1-3 objects, each a 16-px {shapes} centred in its
  cell (exactly 2x2 ViT patches), colours {colors}; shapes and colours are distinct within a scene.
- Question types (answers are sentences whose informative words come after the first token):
{qtypes}
- Two answer styles, as real VLMs are prompted: the sentences above, and short answers when the question ends with
  the benchmark suffix "{suffix}" (`what color is the circle ? {suffix}` → `red`; positions, objects and
  the describe list stay phrases: `top left`, `red circle`, `red circle , blue square and green triangle`;
  `exists` → `yes` / `no`).
- Every QA also has a follow-up question about a different region of the same image (second turn).
- Splits: disjoint seed ranges, and object layouts partitioned by a hash (no test layout is seen in training).
  `check_answer` recomputes every answer from the scene's objects.

## Architecture
`LlavaForConditionalGeneration`: CLIP vision tower (hidden {vision_hidden}, {vision_layers} layers, {vision_heads} heads,
patch 8 → 12x12 = **144 image tokens**, CLS dropped), 2-layer GELU projector, Llama language model (hidden
{text_hidden}, {text_layers} layers, {text_heads} query / {text_kv_heads} KV heads, MLP {text_intermediate}, tied embeddings).
{n_params:,} parameters, {size_mb:.1f} MB of safetensors (fp32). Word-level tokenizer ({vocab} tokens, lower case,
punctuation split off). LLaVA-1.5 style chat template: `USER: <image>\\n{{question}} ASSISTANT: {{answer}}</s>USER: ...`.
The model stops with `</s>` (eos_token_id={eos}).

## Accuracy (full KV, greedy `generate`, exact match after `normalise`, {split} split, {n_per_type} questions per type)
{table}

Evaluation took {eval_seconds:.0f} s on the CPU. Follow-ups are asked after the model's own first answer.

## Training
{train_summary}

![training curve](training_curve.png) (`training_curve.csv`: loss and teacher-forced validation exact match,
which equals greedy exact match.)

## Reproduce
```bash
{train_args}
python -m tgvkv.demo.evaluate --model assets/demo-vlm --split fresh --n {n_per_type} --followup --json /tmp/eval_fresh.json
python -m tgvkv.demo.evaluate --model assets/demo-vlm --split test --n {n_per_type} --followup --write-card --card-notes docs/demo-model-card-notes.md --eviction-results results/demo   # this file
```
Training is deterministic for a seed (data from the seed and the step; `torch.manual_seed`); wall-clock time and
floating-point summation order on other machines can change the last digits.
"""

QTYPE_DOC = {
    "color": "`color`: what color is the circle ? → the circle is red .",
    "shape": "`shape`: what shape is the red object ? → the red object is a circle .",
    "where": "`where` (spatial): where is the red circle ? → the red circle is at the top left .",
    "position": "`position` (spatial): what is at the center ? → there is a blue square at the center . / there is nothing at the center .",
    "exists": "`exists`: is there a red square ? → there is a red square at the top left . / there is no red square .",
    "count": "`count`: how many objects are there ? → there are two objects .",
    "describe": "`describe` (captioning): describe the image . → there is a red circle at the top left , a blue square at the center and a green triangle at the bottom right . (reading order)",
}


CARD_EVICTION_METHODS = {  # the four columns: method name -> what it stands for
    "tgv-kv": "text-guided selection (TGV-KV)",
    "random": "random",
    "streamingllm": "sinks + recent (StreamingLLM)",
    "tgv-evict-text-first": "evict text first",
}


def eviction_table(results_dir: str, methods: dict[str, str] = CARD_EVICTION_METHODS) -> str:
    """Markdown tables (first question and follow-up) from a ``python -m tgvkv.eval`` output folder.

    Reads its ``summary.csv``; raises if the folder lacks a method of ``methods`` or any budget.
    """
    import csv

    # the evaluator's documented output file (docs/eval.md), read as a file: the demo package stays below tgvkv.eval
    path = os.path.join(results_dir, "summary.csv")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run python -m tgvkv.eval --out {results_dir} first")
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["qtype"] == "all" and r["protocol"] == "official"]
    keeps = sorted({float(r["keep"]) for r in rows if r["method"] != "full"})
    cell = {(r["method"], float(r["keep"]), r["turn"]): r for r in rows}
    out = []
    for turn, title in (("first", "first question"), ("followup", "follow-up question (second turn on the evicted cache)")):
        full = next((r for r in rows if r["method"] == "full" and r["turn"] == turn), None)
        if full is None:
            raise ValueError(f"{path}: no full-KV row for turn {turn!r}")
        out += [f"**{title}**, official protocol, exact match % (n={full['n']}; full KV {100 * float(full['accuracy']):.1f}%)",
                "", "| method | " + " | ".join(f"{100 * k:g}% kept" for k in keeps) + " |",
                "|---|" + "---|" * len(keeps)]
        for m, label in methods.items():
            vals = []
            for k in keeps:
                r = cell.get((m, k, turn))
                if r is None:
                    raise ValueError(f"{path}: no row for {m} at keep {k} ({turn})")
                vals.append(f"{100 * float(r['accuracy']):.1f}")
            out.append(f"| {label} | " + " | ".join(vals) + " |")
        out.append("")
    kv = [r for r in rows if r["method"] == "tgv-kv" and r["turn"] == "first"]
    out.append("KV kept (bytes, mean over the questions): " + ", ".join(
        f"{100 * float(r['keep']):g}% -> {float(r['kv_bytes_kept']) / 1024:.0f} KiB of {float(r['kv_bytes_full']) / 1024:.0f} KiB"
        for r in sorted(kv, key=lambda r: float(r["keep"]))) + ".")
    return "\n".join(out)


def _shell(v) -> str:
    v = str(v)
    return v if v and all(c.isalnum() or c in "._-/=" for c in v) else "'" + v.replace("'", "'\\''") + "'"


def _stage_summary(stage: dict) -> str:
    from .train import TrainConfig

    cfg = {**TrainConfig().__dict__, **stage.get("train_config", {})}  # keys added later take their defaults
    start = f"continued from `{cfg['init_from']}` on unseen scenes (from scene {cfg.get('data_offset', 0)})" \
        if cfg.get("init_from") else "from scratch"
    sched = "of the wall-clock budget" if cfg.get("schedule") == "time" else "of steps"
    weights = f"; question-type sampling weights {cfg['type_weights']}" if cfg.get("type_weights") else ""
    return (
        f"{start.capitalize()}, seed {cfg.get('seed')}: {stage.get('step')} steps of {cfg.get('images_per_step')} images x "
        f"{cfg.get('pieces_per_image')} packed conversations ({cfg.get('followup_prob')} of them two-turn) in "
        f"{(stage.get('minutes') or 0):.0f} minutes on {cfg.get('threads', 2)} CPU threads; lr {cfg.get('lr')}, "
        f"{cfg.get('warmup')} warm-up steps, linear decay to 10% over the last {cfg.get('decay_frac')} {sched}"
        f"{weights}. Last validation point: {json.dumps(stage.get('last_validation', {}))}."
    )


def write_model_card(model_dir: str, res: dict, notes: str = "", eviction_results: str | None = None) -> str:
    """README.md of the model folder from an evaluation result and ``training_state.json``."""
    from .build import ModelSpec

    with open(os.path.join(model_dir, "training_state.json")) as f:
        state = json.load(f)
    spec = {**ModelSpec().to_dict(), **state.get("model_spec", {})}
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    size = os.path.getsize(os.path.join(model_dir, "model.safetensors"))
    with open(os.path.join(model_dir, "tokenizer.json")) as f:
        vocab = len(json.load(f)["model"]["vocab"])
    from .train import TrainConfig, stages_of

    defaults = TrainConfig().__dict__
    stages = stages_of(state)
    summary = "\n".join(
        f"{k + 1}. " + _stage_summary(st) for k, st in enumerate(stages)
    ) + (
        "\n\nAll stages: AdamW (0.9, 0.98), weight decay on matrices only, gradient clipping, loss on answer tokens "
        "(and `</s>`) only. Packing: one row = one image + several conversations; a 4-D mask lets each see only the "
        "image prefix and itself, with position ids restarting after the image (identical to unpacked inference)."
    )
    train_args = "\n".join(
        ("python -m tgvkv.demo.train --out assets/demo-vlm " + " ".join(f"--{k.replace('_', '-')} {_shell(v)}" for k, v in st["train_config"].items()
                   if k != "out" and k in defaults and defaults[k] != v)).strip()
        for st in stages
    )
    text = CARD_TEMPLATE.format(
        shapes="/".join(scenes.SHAPES),
        suffix=scenes.SHORT_SUFFIX,
        colors=", ".join(scenes.COLORS),
        qtypes="\n".join(f"  - {QTYPE_DOC[t]}" for t in scenes.QUESTION_TYPES),
        n_params=state.get("n_params", 0),
        size_mb=size / 2**20,
        vocab=vocab,
        eos=config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id")),
        split=res.get("split", "test"),
        n_per_type=res.get("n_per_type", 0),
        table=format_style_table(res["styles"]) if "styles" in res else format_table(res),
        eval_seconds=res.get("seconds", 0),
        train_summary=summary,
        train_args=train_args,
        **spec,
    )
    if eviction_results:
        text += (
            "\n## Under KV eviction (`python -m tgvkv.eval`, results in `" + eviction_results + "`)\n"
            "The KV budget is a share of *all* prompt KV per layer (image and text), as in the paper; the first answer "
            "token is computed before eviction (official protocol), every later token and the follow-up turn on the "
            "evicted cache.\n\n" + eviction_table(eviction_results) + "\n"
        )
    path = os.path.join(model_dir, "README.md")
    with open(path, "w") as f:
        f.write(text + (("\n" + notes.strip() + "\n") if notes else ""))
    return path


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
    ap.add_argument("--write-card", action="store_true", help="write <model>/README.md from the result")
    ap.add_argument("--card-notes", default=None, help="markdown file appended to the model card")
    ap.add_argument("--eviction-results", default=None,
                    help="a python -m tgvkv.eval output folder; its tgv-kv/random/streamingllm/evict-text-first rows "
                         "become the card's eviction table")
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
    print(f"wrote {path}")
    if args.write_card:
        notes = open(args.card_notes).read() if args.card_notes else ""
        print(f"wrote {write_model_card(args.model, res, notes, args.eviction_results)}")


if __name__ == "__main__":
    main()
