"""Train the demo VLM from scratch on the synthetic scene task (CPU friendly, reproducible from a seed).

    python -m tgvkv.demo.train --out assets/demo-vlm

Throughput comes from *packing*: one row holds one image and several independent conversations about it
("USER: <image> Q ASSISTANT: A</s>[USER: Q2 ASSISTANT: A2</s>]"). A 4-D attention mask lets each
conversation see only the image prefix and itself, and its position ids restart right after the image, so
every conversation is computed exactly as the unpacked sequence that the chat template and the processor
produce at inference. The loss is on answer tokens (and their ``</s>``) only.

On a machine with several cores, ``--data-parallel N`` trains with N processes (one thread each is what pays on
our 2-core CPUs: two processes made 50 steps/min of the v2 model where one process made 27 and one process with two
threads 30): each takes its share of a step's images, gradients are summed, every process applies the same update.

Validation is teacher-forced exact match on a fixed validation set: a greedy decode reproduces the
reference answer exactly iff the arg-max at every answer position (including ``</s>``) equals the
reference token, so this equals greedy exact-match accuracy at the cost of one forward pass.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass

from . import scenes
from .build import IMAGE_TOKEN, N_IMAGE_TOKENS, ModelSpec, build_model, build_processor

log = logging.getLogger("tgvkv.demo.train")


@dataclass
class TrainConfig:
    out: str = "assets/demo-vlm"
    seed: int = 0
    steps: int = 3200
    images_per_step: int = 8  # rows per batch (8 rather than 16: twice the updates per CPU second)
    pieces_per_image: int = 8  # conversations packed per row
    followup_prob: float = 0.5  # share of conversations with a second turn
    lr: float = 6e-4
    warmup: int = 200
    decay_frac: float = 0.25  # linear decay to 10% of lr over the last 25% of steps
    weight_decay: float = 0.05
    clip: float = 1.0
    one_object_frac: float = 0.0  # curriculum: share of 1-object scenes during the first `curriculum_steps`
    curriculum_steps: int = 0
    describe_weight: float = 2.0  # sampling weight of the describe type (others 1)
    repeat_shapes_frac: float = 0.0  # share of training scenes where two objects share a shape (colour binding)
    type_weights: str = ""  # overrides, e.g. "shape=3,exists=3" (sampling weights per question type)
    val_every: int = 200
    val_n: int = 700
    save_every: int = 200
    threads: int = 2
    max_minutes: float = 0.0  # stop (and save) after this wall-clock time; 0 = no limit
    schedule: str = "steps"  # "steps": decay over the last steps; "time": over the last share of max_minutes
    init_from: str = ""  # continue training from this checkpoint folder (fresh optimiser, new data from data_offset)
    data_offset: int = 0  # first training scene index (continuations use scenes the first run never saw)
    pos_init: str = "sincos"  # initial CLIP patch position embeddings: "sincos" (2-D, row/column) or "random"
    pos_scale: float = 0.1  # amplitude of the 2-D sin-cos initialisation
    short_frac: float = 0.0  # share of questions asked in the short answer style (suffix "answer with a single word .")
    precision: str = "fp32"  # "bf16": forward/backward under CPU autocast (AMX), float32 master weights and optimiser
    best_metric: str = "val_select"  # validation column that picks the checkpoint kept in <out>/best
    resume: bool = False  # continue an interrupted run of this config exactly (model, optimiser, step, data) from <out>
    data_parallel: int = 1  # training processes (one per core): each takes images[rank::N] of a step, gradients summed

    def __post_init__(self) -> None:  # checked here, not at the first decayed step of a long run
        if self.schedule not in ("steps", "time"):
            raise ValueError(f"unknown schedule {self.schedule!r}; expected 'steps' or 'time'")
        if self.schedule == "time" and self.max_minutes <= 0:
            raise ValueError("schedule='time' needs max_minutes > 0")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision {self.precision!r}; expected 'fp32' or 'bf16'")
        if not 0.0 <= self.short_frac <= 1.0:
            raise ValueError(f"short_frac must be in [0, 1], got {self.short_frac}")
        if not 1 <= self.data_parallel <= self.images_per_step:
            raise ValueError(f"data_parallel must be in [1, images_per_step={self.images_per_step}], "
                             f"got {self.data_parallel}")


# ---------------------------------------------------------------------------------------------------
# Token sequences (identical to what the chat template + processor produce; checked in tests)


def conversation_tokens(qa: scenes.QA, followup: bool) -> tuple[list[str], list[str]]:
    """Words after ``<image>`` for a one- or two-turn conversation, and the matching answer mask words."""
    words = qa.question.split() + ["assistant", ":"]
    is_ans = [False] * len(words)
    for ans, last in ((qa.answer, not followup), (qa.followup_answer, True)):
        a = ans.split() + ["</s>"]
        words += a
        is_ans += [True] * len(a)
        if last:
            break
        q = ["user", ":"] + qa.followup_question.split() + ["assistant", ":"]
        words += q
        is_ans += [False] * len(q)
    return words, is_ans


def conversation_messages(qa: scenes.QA, followup: bool) -> list[dict]:
    """The chat messages of :func:`conversation_tokens` (for the chat template)."""
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qa.question}]},
        {"role": "assistant", "content": [{"type": "text", "text": qa.answer}]},
    ]
    if followup:
        msgs += [
            {"role": "user", "content": [{"type": "text", "text": qa.followup_question}]},
            {"role": "assistant", "content": [{"type": "text", "text": qa.followup_answer}]},
        ]
    return msgs


PREFIX = ["user", ":"]  # words before <image>


class Packer:
    """Turns (image, conversations) groups into padded tensors with a 4-D block mask."""

    def __init__(self, processor):
        self.processor = processor
        self.tok = processor.tokenizer
        self.vocab = self.tok.get_vocab()
        self.image_id = self.vocab[IMAGE_TOKEN]
        self.pad_id = self.tok.pad_token_id
        self.prefix_ids = [self.vocab[w] for w in PREFIX] + [self.image_id] * N_IMAGE_TOKENS

    def ids(self, words: list[str]) -> list[int]:
        return [self.vocab[w] for w in words]

    def pack(self, groups):
        """``groups``: list of (PIL image, [(words, is_answer, tag), ...]). Returns a batch dict.

        ``tag`` marks which answer span a token belongs to (for per-question accuracy); -1 = no answer.
        """
        import torch

        n0 = len(self.prefix_ids)
        rows, segs, tags = [], [], []
        for _, convs in groups:
            ids, seg, tag = list(self.prefix_ids), [0] * n0, [-1] * n0
            for k, (words, is_ans, t) in enumerate(convs):
                ids += self.ids(words)
                seg += [k + 1] * len(words)
                tag += [t if a else -1 for a in is_ans]
            rows.append(ids)
            segs.append(seg)
            tags.append(tag)
        L = max(map(len, rows))
        B = len(rows)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        seg_t = torch.full((B, L), -1, dtype=torch.long)
        tag_t = torch.full((B, L), -1, dtype=torch.long)
        pos = torch.zeros((B, L), dtype=torch.long)
        for b, (ids, seg, tag) in enumerate(zip(rows, segs, tags)):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids)
            seg_t[b, :n] = torch.tensor(seg)
            tag_t[b, :n] = torch.tensor(tag)
            p, last = [], None
            for s in seg:
                if s == 0:
                    p.append(len(p))
                else:
                    p.append(n0 if s != last else p[-1] + 1)
                last = s
            pos[b, :n] = torch.tensor(p)
        # (B, 1, L, L): causal, and a conversation sees only the image prefix and itself
        i = torch.arange(L)
        causal = i[None, :] <= i[:, None]
        same = (seg_t[:, :, None] == seg_t[:, None, :]) | (seg_t[:, None, :] == 0)
        allowed = causal[None] & same & (seg_t[:, None, :] >= 0)
        allowed |= torch.eye(L, dtype=torch.bool)[None]  # pad rows attend to themselves (no NaN)
        mask = torch.zeros((B, 1, L, L), dtype=torch.float32)
        mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
        # labels: token t is predicted from position t-1
        labels = torch.full((B, L), -100, dtype=torch.long)
        ans = tag_t >= 0
        labels[ans] = input_ids[ans]
        pixel_values = self.processor.image_processor(images=[g[0] for g in groups], return_tensors="pt")[
            "pixel_values"
        ]
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": pos,
            "pixel_values": pixel_values,
            "labels": labels,
            "tags": tag_t,
        }


# ---------------------------------------------------------------------------------------------------
# Data


def sample_qtype(rng: random.Random, cfg: TrainConfig, exclude: tuple[str, ...] = ()) -> str:
    weights = [cfg.describe_weight if t == "describe" else 1.0 for t in scenes.QUESTION_TYPES]
    for item in filter(None, cfg.type_weights.split(",")):
        name, w = item.split("=")
        weights[scenes.QUESTION_TYPES.index(name.strip())] = float(w)
    weights = [0.0 if t in exclude else w for t, w in zip(scenes.QUESTION_TYPES, weights)]
    return rng.choices(scenes.QUESTION_TYPES, weights)[0]


def train_groups(cfg: TrainConfig, step: int, seed_cursor: list[int]):
    """The images and conversations of one training step (deterministic given the seed and the step)."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    train_range = scenes.split_seeds("train")
    groups = []
    while len(groups) < cfg.images_per_step:
        seed = train_range[seed_cursor[0] % len(train_range)]
        seed_cursor[0] += 1
        n_obj = 1 if (step < cfg.curriculum_steps and rng.random() < cfg.one_object_frac) else None
        repeat = n_obj is None and rng.random() < cfg.repeat_shapes_frac
        scene = scenes.make_scene(seed, n_objects=n_obj, repeat_shapes=repeat)
        if scenes.layout_split(scene) != "train":
            continue
        convs = []
        for _ in range(cfg.pieces_per_image):
            style, fstyle = (("short" if rng.random() < cfg.short_frac else "sentence") for _ in range(2))
            if repeat:  # "what color is the circle ?" is ambiguous when two circles are in the scene
                qtype = sample_qtype(rng, cfg, exclude=("color",))
                ftype = rng.choice([t for t in scenes.FOLLOWUP_TYPES if t != "color"])
                qa = scenes.make_qa(scene, qtype, rng, followup_type=ftype, style=style, followup_style=fstyle)
            else:
                qa = scenes.make_qa(scene, sample_qtype(rng, cfg), rng, style=style, followup_style=fstyle)
            words, is_ans = conversation_tokens(qa, rng.random() < cfg.followup_prob)
            convs.append((words, is_ans, 0))
        groups.append((scene.render(), convs))
    return groups


def val_groups(n: int, styles: tuple[str, ...] = ("sentence",)):
    """Fixed validation set: ``n`` QAs per answer style (types in rotation), each asked with its follow-up.

    Tags: ``2 * i`` for the first answer of QA ``i``, ``2 * i + 1`` for its follow-up answer.
    """
    qas = [qa for style in styles for qa in scenes.dataset("val", n, style=style)]
    groups = []
    for i, qa in enumerate(qas):
        words, is_ans = conversation_tokens(qa, followup=True)
        # split the tags of the two answers
        first_end = words.index("</s>")
        convs = [(words, is_ans, 2 * i)]
        groups.append((qa.scene.render(), convs, first_end))
    return qas, groups


def evaluate_teacher_forced(model, packer: Packer, qas, groups, batch: int = 32) -> dict:
    """Greedy exact-match accuracy per question type (first answer) and for follow-ups, in one pass each."""
    import torch

    correct: dict[int, bool] = {}
    model.eval()
    with torch.no_grad():
        for s in range(0, len(groups), batch):
            chunk = groups[s : s + batch]
            packed_groups = []
            for img, convs, first_end in chunk:
                words, is_ans, tag = convs[0]
                tags = [tag if j <= first_end else tag + 1 for j in range(len(words))]
                packed_groups.append((img, [(words, is_ans, 0)], tags))
            batch_t = packer.pack([(g[0], g[1]) for g in packed_groups])
            n0 = len(packer.prefix_ids)
            for b, g in enumerate(packed_groups):
                t = batch_t["tags"][b]
                t[n0 : n0 + len(g[2])] = torch.where(
                    t[n0 : n0 + len(g[2])] >= 0, torch.tensor(g[2]), t[n0 : n0 + len(g[2])]
                )
            out = model(
                input_ids=batch_t["input_ids"],
                attention_mask=batch_t["attention_mask"],
                position_ids=batch_t["position_ids"],
                pixel_values=batch_t["pixel_values"],
            )
            pred = out.logits[:, :-1].argmax(-1)
            gold = batch_t["input_ids"][:, 1:]
            tags = batch_t["tags"][:, 1:]
            ok = pred == gold
            for tag in tags.unique().tolist():
                if tag < 0:
                    continue
                correct[tag] = bool(ok[tags == tag].all())
    model.train()
    per_type: dict[str, list[bool]] = defaultdict(list)
    for i, qa in enumerate(qas):
        per_type[qa.qtype].append(correct[2 * i])
        per_type["followup"].append(correct[2 * i + 1])
        per_type[f"{qa.style}_overall"].append(correct[2 * i])
    res = {k: sum(v) / len(v) for k, v in per_type.items()}
    firsts = [correct[2 * i] for i in range(len(qas))]
    res["overall"] = sum(firsts) / len(firsts)
    # what picks the shipped checkpoint: full-KV first answers and follow-ups alike (never eviction results)
    res["select"] = (res["overall"] + res["followup"]) / 2
    return res


# ---------------------------------------------------------------------------------------------------
# Training loop


def init_2d_positions(model, scale: float) -> None:
    """Initialise CLIP's learned patch position embeddings with a 2-D sin-cos code (as in MAE).

    Half of the channels encode the patch row, half the column, so "top left" is a direction the language
    model can query from the start; the embeddings stay trainable. The CLS position is left as is.
    """
    import torch

    emb = model.model.vision_tower.embeddings.position_embedding.weight  # (1 + G*G, D)
    n, d = emb.shape[0] - 1, emb.shape[1]
    g = int(round(math.sqrt(n)))
    quarter = d // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))  # (D/4,)
    rows = torch.arange(g, dtype=torch.float32).repeat_interleave(g)  # raster order (G*G,)
    cols = torch.arange(g, dtype=torch.float32).repeat(g)
    code = []
    for coord in (rows, cols):
        ang = coord[:, None] * freqs[None, :]  # (G*G, D/4)
        code += [torch.sin(ang), torch.cos(ang)]
    code = torch.cat(code, dim=1)  # (G*G, 4 * D/4)
    with torch.no_grad():
        emb[1:, : code.shape[1]] = scale * code


def stages_of(state: dict) -> list[dict]:
    """All training stages of a checkpoint's ``training_state.json`` content: its earlier stages, then its own."""
    curve = state.get("curve", [])
    own = {"train_config": state.get("train_config", {}), "step": state.get("step"), "minutes": state.get("minutes"),
           "last_validation": curve[-1] if curve else {}, "curve": curve}
    return list(state.get("previous_stages", [])) + [own]


def _previous_stages(folder: str) -> list[dict]:
    """The training history of a checkpoint we continue from (its own earlier stages, then itself)."""
    path = os.path.join(folder, "training_state.json")
    if not os.path.exists(path):
        return [{"train_config": {"init_from": folder}, "note": "no training_state.json in the folder"}]
    with open(path) as f:
        stages = stages_of(json.load(f))
    config = os.path.join(folder, "config.json")
    if os.path.exists(config):  # the dtype the next stage found these weights in (a bf16 copy, say)
        with open(config) as f:
            stages[-1]["weights_dtype"] = json.load(f).get("dtype") or "float32"
    return stages


def full_curve(folder: str) -> list[dict]:
    """The validation curve over all training stages of a checkpoint, steps counted from the first stage."""
    with open(os.path.join(folder, "training_state.json")) as f:
        state = json.load(f)
    rows, offset = [], 0
    for stage in stages_of(state):
        for r in stage.get("curve", []):
            rows.append({**r, "step": r["step"] + offset})
        offset += stage.get("step") or 0
    return rows


def lr_at(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warm-up, constant, then linear decay to 10% over the last ``decay_frac`` of the run.

    With ``schedule="time"`` the run's progress is the larger of the step and wall-clock fractions, so a
    run cut by ``max_minutes`` still ends with its decay (at the cost of step-exact reproducibility).
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = step / max(1, cfg.steps)
    if cfg.schedule == "time":
        progress = max(progress, elapsed_s / (cfg.max_minutes * 60))
    decay_start = 1 - cfg.decay_frac
    if progress < decay_start:
        return cfg.lr
    frac = min(1.0, (progress - decay_start) / max(1e-9, cfg.decay_frac))
    return cfg.lr * (1 - 0.9 * frac)


def save(model, processor, out: str, cfg: TrainConfig, spec: ModelSpec, state: dict) -> None:
    """Write model + processor atomically-ish (temp folder, then move files into ``out``)."""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "training_state.json"), "w") as f:
        json.dump({"train_config": cfg.__dict__, "model_spec": spec.to_dict(), **state}, f, indent=1)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    shutil.rmtree(tmp, ignore_errors=True)


class _FlushDenormals:
    """Tiny gradients and Adam moments become float32 denormals, ~100x slower on x86 CPUs: flush them while
    training, and give the process back its IEEE behaviour afterwards (other code, e.g. hypothesis, needs it)."""

    def __enter__(self):
        import torch

        self.threads = torch.get_num_threads()  # the run sets its own thread count; restored on exit
        torch.set_flush_denormal(True)

    def __exit__(self, *exc):
        import torch

        torch.set_flush_denormal(False)
        torch.set_num_threads(self.threads)


def step_seconds(cfg: TrainConfig, spec: ModelSpec, steps: int = 6, warmup: int = 2) -> list[float]:
    with _FlushDenormals():
        return _step_seconds(cfg, spec, steps, warmup)


def _step_seconds(cfg: TrainConfig, spec: ModelSpec, steps: int, warmup: int) -> list[float]:
    """Wall-clock seconds of ``steps`` training steps (after ``warmup`` untimed ones), nothing saved.

    Used by ``python -m tgvkv.bench train`` to compare precisions and model sizes in one run.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(cfg.threads)
    processor = build_processor()
    model = build_model(processor.tokenizer, spec, seed=cfg.seed).train()
    model.config.text_config.use_cache = False
    packer = Packer(processor)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, foreach=True)
    times, cursor = [], [cfg.data_offset]
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        batch = packer.pack(train_groups(cfg, step, cursor))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], pixel_values=batch["pixel_values"])
        logits = out.logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return times


RESUME_FILE = "resume_state.pt"  # optimiser + loop state for --resume (not part of the shipped model)


def _save_resume(out: str, opt, step: int, seed_cursor: int, best: float, elapsed: float, ema: float) -> None:
    import torch

    tmp = os.path.join(out, RESUME_FILE + ".tmp")
    torch.save({"optimizer": opt.state_dict(), "step": step, "seed_cursor": seed_cursor, "best": best,
                "elapsed": elapsed, "loss_ema": ema}, tmp)
    os.replace(tmp, os.path.join(out, RESUME_FILE))


class Workers:
    """The processes of one training run: one alone, or ``world`` ranks on a gloo group (CPU data parallelism).

    Every rank builds the same step (same seed and data cursor) and trains on its share of the images; gradients
    are summed, so all ranks apply the same update and hold the same weights. Rank 0 validates, saves and logs;
    the schedule clock and the stop decision are rank 0's, sent to the others. With ``world == 1`` every
    operation is the identity and the loop is the single-process one, bit for bit.
    """

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, groups: list) -> list:
        return groups[self.rank :: self.world]

    def total(self, t):
        """Sum of ``t`` over the ranks (in place)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def from_main(self, value: float) -> float:
        """Rank 0's value of a float (lr, stop flag), so every rank follows one clock."""
        if self.world == 1:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, 0)
        return float(t.item())

    def sum_gradients(self, params: list) -> None:
        if self.world == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in params if p.grad is not None]
        flat = self.total(_flatten_dense_tensors(grads))
        for g, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(summed)

    def check_in_step(self, model) -> None:
        """Raise if the ranks' weights differ (they must, bit for bit, after identical updates)."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        s = sum(float(p.detach().double().sum()) for p in model.parameters())
        t = torch.tensor([s, -s], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if float(t[0]) != -float(t[1]):
            raise RuntimeError(f"data-parallel ranks diverged: weight sums {float(t[0])!r} vs {-float(t[1])!r}")

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def train(cfg: TrainConfig, spec: ModelSpec = ModelSpec()) -> dict:
    if cfg.data_parallel == 1:
        with _FlushDenormals():
            return _train(cfg, spec, Workers())
    import tempfile

    import torch.multiprocessing as mp

    rendezvous = os.path.join(tempfile.mkdtemp(prefix="tgvkv-train-"), "group")
    try:
        mp.spawn(_train_rank, args=(cfg, spec, rendezvous), nprocs=cfg.data_parallel, join=True)
    finally:  # also when a rank fails: the rendezvous folder is ours to remove
        shutil.rmtree(os.path.dirname(rendezvous), ignore_errors=True)
    with open(os.path.join(cfg.out, "training_state.json")) as f:
        state = json.load(f)
    return {"curve": state["curve"], "n_params": state["n_params"], "minutes": state["minutes"]}


def _train_rank(rank: int, cfg: TrainConfig, spec: ModelSpec, rendezvous: str) -> None:
    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=cfg.data_parallel)
    try:
        with _FlushDenormals():
            _train(cfg, spec, Workers(rank, cfg.data_parallel))
    finally:
        dist.destroy_process_group()


def _train(cfg: TrainConfig, spec: ModelSpec, workers: Workers) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    processor = build_processor()
    resume = None
    if cfg.resume:
        resume_path = os.path.join(cfg.out, RESUME_FILE)
        if not os.path.exists(resume_path):
            raise FileNotFoundError(f"--resume: {resume_path} not found (start the run without --resume)")
        resume = torch.load(resume_path, weights_only=False)
    if cfg.init_from or resume:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(cfg.out if resume else cfg.init_from,
                                                              dtype=torch.float32)
    else:
        model = build_model(processor.tokenizer, spec, seed=cfg.seed)
    model.config.text_config.use_cache = False
    if cfg.pos_init == "sincos" and not cfg.init_from and not resume:
        init_2d_positions(model, cfg.pos_scale)
    model.train()
    packer = Packer(processor)
    n_params = sum(p.numel() for p in model.parameters())
    previous_stages = _previous_stages(cfg.init_from) if cfg.init_from else []
    log.info("model: %d parameters; config %s", n_params, json.dumps(spec.to_dict()))

    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        foreach=True,
    )
    styles = ("sentence", "short") if cfg.short_frac > 0 else ("sentence",)
    val_qas, val_g = val_groups(cfg.val_n, styles)
    best = -1.0
    start, t_offset = 0, 0.0
    os.makedirs(cfg.out, exist_ok=True)
    curve_path = os.path.join(cfg.out, "training_curve.csv")
    curve = []
    seed_cursor = [cfg.data_offset]
    if resume:  # same optimiser moments, data position, schedule clock and best score as when it stopped
        opt.load_state_dict(resume["optimizer"])
        start, seed_cursor, best, t_offset = resume["step"], [resume["seed_cursor"]], resume["best"], resume["elapsed"]
        with open(os.path.join(cfg.out, "training_state.json")) as f:
            curve = json.load(f).get("curve", [])
        log.info("resumed at step %d (%.1f min)", start, t_offset / 60)
    t0 = time.time() - t_offset
    ema = resume.get("loss_ema") if resume else None  # the curve's loss column continues too (older states: restarts)
    params = list(model.parameters())
    for step in range(start, cfg.steps):
        lr = workers.from_main(lr_at(step, cfg, time.time() - t0))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = packer.pack(workers.shard(train_groups(cfg, step, seed_cursor)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                pixel_values=batch["pixel_values"],
            )
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        if workers.world == 1:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        else:  # this rank's share of the mean over every rank's answer tokens
            n_answer = workers.total((labels != -100).sum().double())
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum") / n_answer.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        workers.sum_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        step_loss = workers.total(loss.detach().clone()).item()
        ema = step_loss if ema is None else 0.98 * ema + 0.02 * step_loss
        elapsed = workers.from_main(time.time() - t0)
        last = step == cfg.steps - 1 or bool(cfg.max_minutes and elapsed > cfg.max_minutes * 60)
        if step % 50 == 0:
            log.info("step %d loss %.4f (ema %.4f) lr %.2e %.1f min", step, step_loss, ema, lr, elapsed / 60)
        validate = (step + 1) % cfg.val_every == 0 or last
        if validate:
            workers.check_in_step(model)
        if validate and workers.main:
            acc = evaluate_teacher_forced(model, packer, val_qas, val_g)
            row = {"step": step + 1, "minutes": round(elapsed / 60, 2), "train_loss_ema": round(ema, 5)}
            row.update({f"val_{k}": round(v, 4) for k, v in sorted(acc.items())})
            curve.append(row)
            log.info("VAL %s", json.dumps(row))
            with open(curve_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(curve[-1].keys()))
                w.writeheader()
                w.writerows(curve)
            if row[cfg.best_metric] > best:  # the best full-KV validation point so far, kept apart
                best = row[cfg.best_metric]
                save(model, processor, os.path.join(cfg.out, "best"), cfg, spec,
                     {"step": step + 1, "minutes": elapsed / 60, "n_params": n_params, "curve": curve,
                      "previous_stages": previous_stages, "best": {cfg.best_metric: best, "step": step + 1}})
                log.info("best %s %.4f at step %d", cfg.best_metric, best, step + 1)
        if ((step + 1) % cfg.save_every == 0 or last) and workers.main:
            save(model, processor, cfg.out, cfg, spec, {"step": step + 1, "minutes": elapsed / 60, "n_params": n_params, "curve": curve,
                 "previous_stages": previous_stages})
            _save_resume(cfg.out, opt, step + 1, seed_cursor[0], best, elapsed, ema)
            log.info("saved checkpoint at step %d to %s", step + 1, cfg.out)
        if validate or (step + 1) % cfg.save_every == 0:
            workers.barrier()  # the other ranks wait for rank 0's validation and files
        if last:
            break
    return {"curve": curve, "n_params": n_params, "minutes": (time.time() - t0) / 60}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k, v in TrainConfig().__dict__.items():
        if isinstance(v, bool):
            ap.add_argument("--" + k.replace("_", "-"), action="store_true", default=v)
        else:
            ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    for k, v in ModelSpec().to_dict().items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    ap.add_argument("--no-plot", action="store_true")
    args = vars(ap.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig(**{k: args[k] for k in TrainConfig().__dict__})
    spec = ModelSpec(**{k: args[k] for k in ModelSpec().to_dict()})
    train(cfg, spec)
    if not args["no_plot"]:
        from .card import plot_curve

        plot_curve(full_curve(cfg.out), os.path.join(cfg.out, "training_curve.png"))


if __name__ == "__main__":
    main()
