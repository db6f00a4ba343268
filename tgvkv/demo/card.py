"""The demo model's card (``assets/demo-vlm/README.md``), written from measured results only.

    python -m tgvkv.demo.card --model assets/demo-vlm --test assets/demo-vlm/eval_test.json \\
        --fresh assets/demo-vlm/eval_fresh.json --reference "v1=assets/demo-vlm-v1/eval_test.json" \\
        --eviction "v1=results/demo-v1" --eviction "v2=results/demo" --eviction "v2 short=results/demo-short" \\
        --train-speed results/bench/train_speed.json --notes docs/demo-model-card-notes.md

Inputs are the files other commands write: ``python -m tgvkv.demo.evaluate --json`` (full-KV accuracy per type and
answer style), ``python -m tgvkv.eval`` output folders (their ``summary.csv``: accuracy under eviction),
``python -m tgvkv.bench train`` (training steps/min, float32 against bf16) and the model folder's
``training_state.json`` (every training stage's configuration and validation curve).

This module reads the evaluator's documented CSV itself instead of importing :mod:`tgvkv.eval`, which imports the demo
task: the demo package stays below the evaluator.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from dataclasses import dataclass

from ..loading import DEMO_MODEL_DIR
from . import scenes

PLAIN_SHELL = frozenset("._-/=,:")
CHECKPOINTS_DIR = str(DEMO_MODEL_DIR.parent / "checkpoints")  # committed training-stage checkpoints


def plot_curve(curve: list[dict], path: str, stage_starts: tuple[int, ...] = ()) -> None:
    """Training loss and validation exact match against steps (matplotlib object API, no pyplot).

    ``stage_starts``: steps where a new training stage (fresh optimiser) began, drawn as dotted lines.
    """
    if not curve:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    steps = [r["step"] for r in curve]
    ax1.plot(steps, [r["train_loss_ema"] for r in curve])
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_title("training loss (answer tokens, EMA)")
    keys = [k for k in curve[-1] if k.startswith("val_") and k != "val_select"]
    for key in keys:
        lw = 2.5 if key == "val_overall" else 1
        ax2.plot(steps, [r.get(key, float("nan")) for r in curve], label=key[4:], lw=lw)
    for ax in (ax1, ax2):
        for s in stage_starts:
            ax.axvline(s, color="0.6", ls=":", lw=1)
    ax2.set_xlabel("step (dotted: a new training stage)" if stage_starts else "step")
    ax2.set_ylim(0, 1.01)
    ax2.set_title("validation exact match (teacher forced = greedy)")
    ax2.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------------------------
# accuracy under eviction, read from python -m tgvkv.eval output folders


@dataclass(frozen=True)
class EvictionColumn:
    """One evaluated model/task in the eviction tables: a label ("v1", "v2 short") and its evaluator folder."""

    label: str
    folder: str


CARD_EVICTION_METHODS = {  # method name -> what it stands for, in the card's row order
    "tgv-kv": "TGV-KV (text-guided)",
    "snapkv": "SnapKV",
    "pyramidkv": "PyramidKV",
    "h2o": "H2O",
    "streamingllm": "StreamingLLM (sinks + recent)",
    "prefixkv": "PrefixKV",
    "random": "random (mean of its draws)",
    "tgv-evict-text-first": "evict text first (ablation)",
}
TEXT_ONLY = "text-only"
TURN_TITLES = {"first": "first question", "followup": "follow-up question (second turn on the evicted cache)"}


def read_summary(folder: str) -> list[dict]:
    """The pooled (``qtype == all``) rows of an evaluator folder's ``summary.csv``, numbers parsed."""
    path = os.path.join(folder, "summary.csv")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run python -m tgvkv.eval --out {folder} first")
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["qtype"] == "all"]
    for r in rows:
        for k in ("keep", "accuracy", "accuracy_sd", "kv_bytes_kept", "kv_bytes_full"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else None
        r["n"] = int(float(r["n"]))
    return rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def eviction_table(columns: list[EvictionColumn], protocol: str, turn: str,
                   methods: dict[str, str] = CARD_EVICTION_METHODS) -> str:
    """One markdown table: a row per method, a column per budget x labelled folder (e.g. "10% v1 | 10% v2").

    Cells are accuracy %; bold marks the best method of a column (ties all bold; full KV is the reference and not
    ranked). A folder without a method or budget of another folder raises: the table would silently compare unlike
    things otherwise.
    """
    data = {c.label: [r for r in read_summary(c.folder) if r["protocol"] == protocol and r["turn"] == turn]
            for c in columns}
    keeps = sorted({r["keep"] for rows in data.values() for r in rows if r["method"] in methods})
    if not keeps:
        raise ValueError(f"no {protocol}/{turn} rows of {sorted(methods)} in {[c.folder for c in columns]}")
    cell = {(c.label, r["method"], r["keep"]): r for c in columns for r in data[c.label]}
    head = [f"{100 * k:g}% {c.label}" for k in keeps for c in columns]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    full = []
    for c in columns:
        r = next((r for r in data[c.label] if r["method"] == "full"), None)
        if r is None:
            raise ValueError(f"{c.folder}: no full-KV row for {protocol}/{turn}")
        full.append(r)
    lines.append("| full KV | " + " | ".join(_pct(full[j]["accuracy"]) for _ in keeps for j in range(len(columns))) + " |")
    present = [m for m in methods if any((c.label, m, k) in cell for c in columns for k in keeps)]
    best = {(c.label, k): max(cell[(c.label, m, k)]["accuracy"] for m in present if (c.label, m, k) in cell)
            for c in columns for k in keeps if any((c.label, m, k) in cell for m in present)}
    for m in present:
        cells = []
        for k in keeps:
            for c in columns:
                r = cell.get((c.label, m, k))
                if r is None:
                    raise ValueError(f"{c.folder}: no {protocol}/{turn} row for {m} at keep {k:g}")
                txt = _pct(r["accuracy"])
                if r.get("accuracy_sd") is not None and int(float(r.get("draws") or 1)) > 1:
                    txt += f" ± {100 * r['accuracy_sd']:.1f}"
                cells.append(f"**{txt}**" if round(r["accuracy"], 6) == round(best[(c.label, k)], 6) else txt)
        lines.append(f"| {methods[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_only_table(columns: list[EvictionColumn]) -> str:
    """How much the question carries: full KV against every image token's KV evicted after prefill (text kept)."""
    lines = ["| model | turn | full KV | all image KV evicted, official | all image KV evicted, strict |",
             "|---|---|---|---|---|"]
    for c in columns:
        rows = read_summary(c.folder)
        for turn in TURN_TITLES:
            get = {(r["method"], r["protocol"]): r for r in rows if r["turn"] == turn}
            probe = [get.get((TEXT_ONLY, p)) for p in ("official", "strict")]
            if all(p is None for p in probe):
                continue
            full = get.get(("full", "official")) or get.get(("full", "strict"))
            lines.append(f"| {c.label} | {'first' if turn == 'first' else 'follow-up'} | {_pct(full['accuracy'])} | "
                         + " | ".join(_pct(p["accuracy"]) if p else "n/a" for p in probe) + " |")
    return "\n".join(lines)


def kv_bytes_line(column: EvictionColumn) -> str:
    rows = sorted((r for r in read_summary(column.folder) if r["method"] == "tgv-kv" and r["turn"] == "first"
                   and r["protocol"] == "official"), key=lambda r: r["keep"])
    return f"KV kept by TGV-KV after prefill ({column.label}, mean over the questions): " + ", ".join(
        f"{100 * r['keep']:g}% -> {r['kv_bytes_kept'] / 1024:.0f} KiB of {r['kv_bytes_full'] / 1024:.0f} KiB" for r in rows) + "."


def eviction_section(columns: list[EvictionColumn], protocols=("official", "strict")) -> str:
    """The card's eviction tables: each protocol x turn, then the all-image-evicted probe."""
    parts = []
    available = {r["protocol"] for c in columns for r in read_summary(c.folder)}
    for protocol in [p for p in protocols if p in available]:
        for turn, title in TURN_TITLES.items():
            parts += [f"**{title}, {protocol} protocol** (exact match %; bold: best method of the column)", "",
                      eviction_table(columns, protocol, turn), ""]
    probe = text_only_table(columns)
    if probe.count("\n") > 1:
        parts += ["**How much the question carries**: every image token's KV evicted after prefill, every text token "
                  "kept (`text-only`):", "", probe, ""]
    parts.append(kv_bytes_line(columns[-1]))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# training stages and their commands


def _shell(v) -> str:
    v = str(v)
    return v if v and all(c.isalnum() or c in PLAIN_SHELL for c in v) else "'" + v.replace("'", "'\\''") + "'"


def stage_summary(stage: dict) -> str:
    from .train import TrainConfig

    cfg = {**TrainConfig().__dict__, **stage.get("train_config", {})}  # keys added later take their defaults
    start = f"continued from the previous stage on unseen scenes (from scene {cfg.get('data_offset', 0)})" \
        if cfg.get("init_from") else "from scratch"
    sched = "of the wall-clock budget" if cfg.get("schedule") == "time" else "of steps"
    weights = f"; question-type sampling weights {cfg['type_weights']}" if cfg.get("type_weights") else ""
    short = f"; {cfg['short_frac']:g} of the questions in the short-answer style" if cfg.get("short_frac") else ""
    precision = f", {cfg['precision']}" if cfg.get("precision") else ""
    return (
        f"{start.capitalize()}, seed {cfg.get('seed')}: {stage.get('step')} steps of {cfg.get('images_per_step')} "
        f"images x {cfg.get('pieces_per_image')} packed conversations ({cfg.get('followup_prob')} of them two-turn) in "
        f"{(stage.get('minutes') or 0):.0f} minutes on {_workers(cfg)}{precision}; lr "
        f"{cfg.get('lr')}, {cfg.get('warmup')} warm-up steps, linear decay to 10% over the last {cfg.get('decay_frac')} "
        f"{sched}{weights}{short}. Last validation point: {json.dumps(stage.get('last_validation', {}))}."
    )


def _workers(cfg: dict) -> str:
    threads = cfg.get("threads", 2)
    per = f"{threads} CPU thread{'s' if threads != 1 else ''}"
    n = cfg.get("data_parallel", 1)
    return f"{n} data-parallel processes x {per}" if n > 1 else per


def handed_on_dtype(previous: dict, stage: dict) -> str:
    """The dtype of the weights ``stage`` started from: ``previous``'s record, else the config of the folder ``stage``
    names (as given, or by its name under ``assets/checkpoints/``, where stage checkpoints are committed in bf16),
    else float32."""
    if previous.get("weights_dtype"):
        return previous["weights_dtype"]
    init = stage.get("train_config", {}).get("init_from") or ""
    for folder in (init, os.path.join(CHECKPOINTS_DIR, os.path.basename(init.rstrip("/")))):
        path = os.path.join(folder, "config.json")
        if init and os.path.exists(path):
            with open(path) as f:
                return json.load(f).get("dtype") or "float32"
    return "float32"


def stage_commands(stages: list[dict], shipped_from_best: bool, out: str = "assets/demo-vlm") -> str:
    """Shell commands that rerun every stage in order, each continuing from the previous one's output."""
    from .train import TrainConfig

    defaults = TrainConfig().__dict__
    lines = []
    for k, st in enumerate(stages, 1):
        folder = f"/tmp/demo-vlm-stage{k}"
        cfg = dict(st["train_config"])
        if k > 1:
            init = f"/tmp/demo-vlm-stage{k - 1}"
            dtype = handed_on_dtype(stages[k - 2], st)
            if dtype != "float32":  # the stage started from a copy stored in another dtype: make the same copy
                lines.append(f"python -m tgvkv.demo.export {init} {init}-{dtype} --dtype {dtype}")
                init = f"{init}-{dtype}"
            cfg["init_from"] = init
        args = " ".join(f"--{key.replace('_', '-')} {_shell(v)}" for key, v in cfg.items()
                        if key not in ("out", "resume") and key in defaults and defaults[key] != v)
        lines.append(f"python -m tgvkv.demo.train --out {folder} {args}".strip())
    last = f"/tmp/demo-vlm-stage{len(stages)}" + ("/best" if shipped_from_best else "")
    lines.append(f"python -m tgvkv.demo.export {last} {out} --dtype float32")
    return "\n".join(lines)


def speed_table(path: str) -> str:
    """``python -m tgvkv.bench train`` rows (one per size x precision): s/step and steps/min, float32 against bf16."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    by_size: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_size.setdefault(r["size"], {})[r["precision"]] = r
    lines = ["| model | parameters | threads | float32 s/step (steps/min) | bf16 s/step (steps/min) | bf16 speed-up |",
             "|---|---|---|---|---|---|"]
    for size, p in by_size.items():
        fp32, bf16 = p["fp32"], p["bf16"]
        lines.append(f"| {size} | {fp32['params'] / 1e6:.1f}M | {fp32['threads']} | {fp32['seconds_per_step']:.2f} "
                     f"({fp32['steps_per_min']}) | {bf16['seconds_per_step']:.2f} ({bf16['steps_per_min']}) "
                     f"| x{bf16['speedup_vs_fp32']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# the card


CARD_TEMPLATE = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [llava, synthetic, tgv-kv, demo]
---
# TGV-KV Explorer demo VLM (`assets/demo-vlm`)

A small LLaVA-architecture model trained from scratch on a synthetic scene task, so that the TGV-KV Explorer works
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
- Question types (sentence answers; their informative words come after the first token):
{qtypes}
- Two answer styles, as real VLMs are prompted: the sentences above, and short answers when the question ends with
  the benchmark suffix "{suffix}" (`what color is the circle ? {suffix}` → `red`; positions, objects and
  the describe list stay phrases: `top left`, `red circle`, `red circle , blue square and green triangle`;
  `exists` → `yes` / `no`).
- Every QA also has a follow-up question about a different region of the same image (second turn, same style).
- Splits: disjoint seed ranges, and object layouts partitioned by a hash (no test layout is seen in training); the
  `fresh` split is a further seed range no other split draws from. `check_answer` recomputes every answer from the
  scene's objects.

## Architecture
`LlavaForConditionalGeneration`: CLIP vision tower (hidden {vision_hidden}, {vision_layers} layers, {vision_heads} heads,
patch 8 → 12x12 = **144 image tokens**, CLS dropped), 2-layer GELU projector, Llama language model (hidden
{text_hidden}, **{text_layers} layers**, {text_heads} query / {text_kv_heads} KV heads, MLP {text_intermediate}, tied embeddings).
{n_params:,} parameters, {size_mb:.1f} MB of safetensors ({dtype}). Word-level tokenizer ({vocab} tokens, lower case,
punctuation split off). LLaVA-1.5 style chat template: `USER: <image>\\n{{question}} ASSISTANT: {{answer}}</s>USER: ...`.
The model stops with `</s>` (eos_token_id={eos}).

## Accuracy (full KV, greedy `generate`, exact match after `normalise`)
{accuracy_what}

{table}

Follow-ups are asked after the model's own first answer. The shipped weights were chosen by full-KV validation
accuracy only (the training run's best `val_select`: mean of first-answer and follow-up validation accuracy), never by
results under eviction.

## Training
{train_summary}

All stages: AdamW (0.9, 0.98), weight decay on matrices only, gradient clipping, loss on answer tokens (and `</s>`)
only. Packing: one row = one image + several conversations; a 4-D mask lets each see only the image prefix and
itself, with position ids restarting after the image (identical to unpacked inference).

![training curve](training_curve.png) (`training_curve.csv`: loss and teacher-forced validation exact match of all
stages, steps counted from the first; teacher-forced exact match equals greedy exact match.)
{speed}
## Reproduce
```bash
{train_args}
{eval_args}
```
Training is deterministic for a seed (data from the seed and the step; `torch.manual_seed`). A stage run with
`--schedule time` decays its learning rate over the last part of its *minutes*, so a rerun on a faster or slower
machine takes a different number of steps; `--schedule steps --steps N` with the stage's step count above is the
step-count equivalent. Floating-point summation order on other machines can change the last digits.
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


@dataclass(frozen=True)
class CardInputs:
    """What the card is written from: files other commands wrote (paths), and how to name them in the card."""

    model_dir: str
    test: str  # python -m tgvkv.demo.evaluate --json (full KV, test split, per style)
    fresh: str | None = None  # the same on the fresh split
    references: tuple[tuple[str, str], ...] = ()  # (label, evaluate JSON) of other models, e.g. ("v1", ...)
    eviction: tuple[EvictionColumn, ...] = ()
    train_speed: str | None = None  # python -m tgvkv.bench train --out ... JSON
    notes: str | None = None  # markdown appended at the end
    shipped_from_best: bool = True  # the weights are the last stage's best-validation checkpoint


def _load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _style_columns(res: dict, split_label: str) -> dict[str, dict]:
    if "styles" in res:
        return {f"{style} ({split_label})": r for style, r in res["styles"].items()}
    return {f"sentence ({split_label})": res}


def accuracy_columns(inputs: CardInputs) -> tuple[dict[str, dict], str]:
    """Columns of the accuracy table (label -> one evaluate result) and a line saying what they are."""
    test = _load_json(inputs.test)
    cols = _style_columns(test, "test")
    what = [f"test split, {test.get('n_per_type')} questions per type"]
    if inputs.fresh:
        fresh = _load_json(inputs.fresh)
        cols.update(_style_columns(fresh, "fresh"))
        what.append(f"fresh split, {fresh.get('n_per_type')} per type")
    for label, path in inputs.references:
        ref = _load_json(path)
        cols.update({f"{label} {k}": v for k, v in _style_columns(ref, ref.get("split", "test")).items()})
        what.append(f"{label}: {ref.get('split', 'test')} split, {ref.get('n_per_type')} per type")
    return cols, "; ".join(what) + "."


def render_card(inputs: CardInputs) -> str:
    """The whole card as markdown (pure: reads the input files, writes nothing)."""
    from .build import ModelSpec
    from .evaluate import format_style_table
    from .train import stages_of

    d = inputs.model_dir
    state = _load_json(os.path.join(d, "training_state.json"))
    spec = {**ModelSpec().to_dict(), **state.get("model_spec", {})}
    config = _load_json(os.path.join(d, "config.json"))
    vocab = len(_load_json(os.path.join(d, "tokenizer.json"))["model"]["vocab"])
    stages = stages_of(state)
    cols, what = accuracy_columns(inputs)
    speed = ""
    if inputs.train_speed:
        speed = ("\nTraining throughput (`python -m tgvkv.bench train`: the real training step, float32 against bf16 "
                 "autocast on the CPU's AMX units, interleaved in one run, median step):\n\n"
                 + speed_table(inputs.train_speed) + "\n")
    eval_args = [
        "python -m tgvkv.demo.evaluate --model assets/demo-vlm --split test --n "
        f"{_load_json(inputs.test).get('n_per_type')} --followup --json assets/demo-vlm/eval_test.json"]
    if inputs.fresh:
        eval_args.append("python -m tgvkv.demo.evaluate --model assets/demo-vlm --split fresh --n "
                         f"{_load_json(inputs.fresh).get('n_per_type')} --followup --json assets/demo-vlm/eval_fresh.json")
    text = CARD_TEMPLATE.format(
        shapes="/".join(scenes.SHAPES), suffix=scenes.SHORT_SUFFIX, colors=", ".join(scenes.COLORS),
        qtypes="\n".join(f"  - {QTYPE_DOC[t]}" for t in scenes.QUESTION_TYPES),
        n_params=state.get("n_params", 0), size_mb=os.path.getsize(os.path.join(d, "model.safetensors")) / 2**20,
        dtype=config.get("dtype", "float32"), vocab=vocab,
        eos=config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id")),
        accuracy_what=what, table=format_style_table(cols),
        train_summary="\n".join(f"{k}. " + stage_summary(st) for k, st in enumerate(stages, 1)),
        speed=speed, train_args=stage_commands(stages, inputs.shipped_from_best), eval_args="\n".join(eval_args),
        **spec,
    )
    if inputs.eviction:
        labels = ", ".join(f"{c.label}: `{c.folder}`" for c in inputs.eviction)
        text += (
            f"\n## Under KV eviction (`python -m tgvkv.eval`; {labels})\n"
            "The KV budget is a share of *all* prompt KV per layer (image and text), as in the paper. Official protocol: "
            "the first answer token is computed before eviction, as in TGV-KV's code; strict: it comes from the evicted "
            "cache too. Every later token and the follow-up turn use the evicted cache.\n\n"
            + eviction_section(list(inputs.eviction)) + "\n"
        )
    if inputs.notes:
        with open(inputs.notes) as f:
            text += "\n" + f.read().strip() + "\n"
    return text


def write_model_card(inputs: CardInputs) -> str:
    """Write ``<model_dir>/README.md`` and the all-stage training curve next to it; returns the card's path."""
    from .train import full_curve, stages_of

    text = render_card(inputs)
    stages = stages_of(_load_json(os.path.join(inputs.model_dir, "training_state.json")))
    starts, total = [], 0
    for st in stages[:-1]:
        total += st.get("step") or 0
        starts.append(total)
    curve = full_curve(inputs.model_dir)
    plot_curve(curve, os.path.join(inputs.model_dir, "training_curve.png"), tuple(starts))
    if curve:
        with open(os.path.join(inputs.model_dir, "training_curve.csv"), "w", newline="") as f:
            keys = list(dict.fromkeys(k for r in curve for k in r))
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(curve)
    path = os.path.join(inputs.model_dir, "README.md")
    with open(path, "w") as f:
        f.write(text)
    return path


def _labelled(value: str, flag: str) -> tuple[str, str]:
    label, sep, path = value.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{flag} expects LABEL=PATH, got {value!r}")
    return label, path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="assets/demo-vlm")
    ap.add_argument("--test", required=True, help="python -m tgvkv.demo.evaluate --split test --json output")
    ap.add_argument("--fresh", help="the same on --split fresh")
    ap.add_argument("--reference", action="append", default=[], metavar="LABEL=JSON",
                    help="another model's evaluate JSON, as extra columns (repeatable)")
    ap.add_argument("--eviction", action="append", default=[], metavar="LABEL=FOLDER",
                    help="a python -m tgvkv.eval output folder, as columns of the eviction tables (repeatable)")
    ap.add_argument("--train-speed", help="python -m tgvkv.bench train JSON")
    ap.add_argument("--notes", help="markdown appended to the card")
    ap.add_argument("--shipped-from-last", action="store_true",
                    help="the weights are the last stage's final checkpoint, not its best-validation one")
    args = ap.parse_args(argv)
    try:
        refs = tuple(_labelled(v, "--reference") for v in args.reference)
        ev = tuple(EvictionColumn(*_labelled(v, "--eviction")) for v in args.eviction)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    inputs = CardInputs(model_dir=args.model, test=args.test, fresh=args.fresh, references=refs, eviction=ev,
                        train_speed=args.train_speed, notes=args.notes, shipped_from_best=not args.shipped_from_last)
    print(f"wrote {write_model_card(inputs)}")


if __name__ == "__main__":
    main()
