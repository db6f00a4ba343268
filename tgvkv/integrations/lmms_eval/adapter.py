"""lmms-eval requests -> the TGV-KV engine, without importing lmms-eval (testable and usable on its own).

An lmms-eval ``generate_until`` request is ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``: the
prompt text of one document, the task's generation settings (``until``, ``max_new_tokens``, ``temperature``, ...)
and a function giving the document's visuals (PIL images, or paths of video / image files). `EngineRunner`
turns one such request into one `tgvkv.generate` call, exactly as `python -m tgvkv.eval` calls it for a folder
task (same prompt rendering through the model's chat template, same capture options, same policy options), so
the two give the same answers on the same examples.
"""
from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FULL = "full"  # no eviction (the engine's policy=None), the reference of every method
PROTOCOLS = ("official", "strict")
DTYPES = ("auto", "float32", "bfloat16", "float16")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: lmms-eval's image / video placeholders in task prompts (``<image>``, interleaved ``<image 2>``, ``<video>``):
#: the engine places the visuals itself (all before the question) through the chat template, so they are removed
#: from the question with the spaces or the newline that follow them.
PLACEHOLDER = re.compile(r"(?:<image(?: \d+)?>|<video>)[ \t]*\n?")
#: generation settings of lmms-eval tasks that the engine honours; any other key is reported once and ignored
DECODING_KEYS = frozenset({"until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams"})


@dataclass(frozen=True)
class PluginConfig:
    """``--model_args`` of the ``tgvkv`` model, checked once when the model is built.

    pretrained: hub id or local folder (any supported VLM family, docs/families.md).
    method: a registered policy (``python -m tgvkv methods``) or ``full`` (nothing evicted).
    keep: fraction of the prompt KV kept, in (0, 1].
    protocol: ``official`` (first answer token from the full cache, as TGV-KV's code) or ``strict``.
    max_new_tokens: upper bound per answer; a task asking for fewer gets fewer.
    max_frames: frames sampled uniformly from a video file (families with video: LLaVA-OneVision, Qwen-VL).
    policy_options: JSON object of the method's options, e.g. ``{"decode": true}``.
    trace_dir: when set, every answer's trace (budgets, kept positions, scores, ...) is saved there, with the
        images (``trace_images``) and an index per process; ``trace_diagnostics`` adds the attention summaries the
        app and `analysis.figures` draw (extra attention passes, so slower).
    """

    pretrained: str
    method: str = "tgv-kv"
    keep: float = 0.05
    protocol: str = "official"
    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    max_new_tokens: int = 256
    max_frames: int = 8
    seed: int = 0
    policy_options: dict[str, Any] = field(default_factory=dict)
    trace_dir: str | None = None
    trace_images: bool = True
    trace_diagnostics: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        from ...options import MAX_NEW_TOKENS_LIMIT
        from ...policies import POLICIES, check_keep_ratio

        if not isinstance(self.pretrained, str) or not self.pretrained.strip():
            raise ValueError("model_args: pretrained=<hub id or local folder> is required")
        if self.method not in POLICIES:
            raise ValueError(f"model_args: unknown method {self.method!r}; "
                             f"choose one of: {', '.join(sorted(POLICIES))}")
        try:
            check_keep_ratio(self.keep)
        except ValueError as e:
            raise ValueError(f"model_args: keep: {e}") from None
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"model_args: protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model_args: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name, top in (("max_new_tokens", MAX_NEW_TOKENS_LIMIT), ("max_frames", 10_000)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
                raise ValueError(f"model_args: {name} must be an integer in [1, {top}], got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"model_args: seed must be an integer, got {self.seed!r}")
        if not isinstance(self.policy_options, dict):
            raise ValueError("model_args: policy_options must be a JSON object")
        for name in ("trace_images", "trace_diagnostics", "trust_remote_code"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model_args: {name} must be true or false, got {getattr(self, name)!r}")

    @property
    def policy(self) -> str | None:
        """The engine's `policy` argument (None: full KV)."""
        return None if self.method == FULL else self.method

    @property
    def keep_ratio(self) -> float:
        return 1.0 if self.method == FULL else float(self.keep)

    @classmethod
    def from_model_args(cls, args: Mapping[str, Any]) -> PluginConfig:
        """From the dict lmms-eval parses out of ``--model_args`` (it has already turned "1" into 1, "true" into
        True, "0.05" into 0.05) plus its ``batch_size`` / ``max_batch_size`` / ``device``."""
        args = dict(args)
        args.setdefault("pretrained", "")
        batch = args.pop("batch_size", 1)
        args.pop("max_batch_size", None)
        if str(batch) != "1":
            raise ValueError(f"batch_size {batch!r} is not supported: the engine answers one request at a time "
                             "(use data parallelism, `accelerate launch --num_processes N -m lmms_eval ...`)")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ValueError(f"model_args: unknown argument(s) {unknown}; accepted: {', '.join(sorted(names))}")
        for key in ("pretrained", "method", "protocol", "dtype", "trace_dir", "device", "device_map"):
            if key in args and args[key] is not None:
                args[key] = str(args[key])  # a folder named "7" or a device "0" arrive as numbers
        for key in ("device", "device_map", "trace_dir"):
            if args.get(key) in ("", "none", "None"):
                args[key] = None
        if isinstance(args.get("policy_options"), str):
            try:
                args["policy_options"] = json.loads(args["policy_options"])
            except json.JSONDecodeError as e:
                raise ValueError(f"model_args: policy_options is not valid JSON ({e.msg}): "
                                 f"{args['policy_options']!r}") from None
        if isinstance(args.get("keep"), bool):
            raise ValueError(f"model_args: keep must be a number in (0, 1], got {args['keep']!r}")
        return cls(**args)


# -- one request -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decoding:
    """The generation settings of one request, as the engine takes them."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    until: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()  # task settings the engine has no use for (reported, not applied)


def decoding_from_gen_kwargs(gen_kwargs: Mapping[str, Any] | None, max_new_tokens: int) -> Decoding:
    """lmms-eval convention: sampling when temperature > 0, else greedy; ``until`` stops are cut off afterwards."""
    kw = dict(gen_kwargs or {})
    until = kw.get("until") or ()
    if isinstance(until, str):
        until = (until,)
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
    beams = kw.get("num_beams") or 1
    if int(beams) != 1:
        raise ValueError(f"num_beams={beams} is not supported: the engine decodes greedily or by sampling")
    task_max = kw.get("max_new_tokens")
    n = max_new_tokens if task_max is None else min(int(task_max), max_new_tokens)
    if n < 1:
        raise ValueError(f"gen_kwargs['max_new_tokens'] must be >= 1, got {task_max!r}")
    temperature = float(kw.get("temperature") or 0.0)
    top_p = kw.get("top_p")
    top_p = 1.0 if top_p is None else float(top_p)
    sample = temperature > 0
    ignored = tuple(sorted(k for k in kw if k not in DECODING_KEYS))
    return Decoding(max_new_tokens=n, do_sample=sample, temperature=temperature if sample else 1.0,
                    top_p=top_p if sample else 1.0, until=tuple(u for u in until if u), ignored=ignored)


def truncate_at_stops(text: str, until: Iterable[str]) -> str:
    """Cut the answer at the first occurrence of any stop string (what ``until`` means in lmms-eval)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def clean_context(context: str) -> str:
    """The question without lmms-eval's image/video placeholders (with the space or newline that follows one)."""
    if not isinstance(context, str):
        raise ValueError(f"the request's context must be text, got {type(context).__name__}")
    question = PLACEHOLDER.sub("", context)
    if not question.strip():
        raise ValueError(f"the request's context has no question text once the placeholders are removed: {context!r}")
    return question


def split_visuals(visuals: Any, max_frames: int) -> tuple[list[Image.Image], list[np.ndarray]]:
    """(images, video clips) from what a task's ``doc_to_visual`` returns.

    Accepted: PIL images; paths of image files or of video files (``max_frames`` frames sampled uniformly);
    numpy arrays (H, W, 3) as images, (frames, H, W, 3) as clips; nested lists of those. Anything else (audio
    dicts, URLs that are not files) raises ValueError naming it."""
    images: list[Image.Image] = []
    videos: list[np.ndarray] = []
    for v in _flatten(visuals):
        if isinstance(v, Image.Image):
            images.append(v.convert("RGB"))
        elif isinstance(v, (str, Path)):
            path = Path(v)
            suffix = path.suffix.lower()
            if suffix in VIDEO_SUFFIXES:
                videos.append(load_video_frames(path, max_frames))
            elif suffix in IMAGE_SUFFIXES:
                if not path.is_file():
                    raise ValueError(f"image file not found: {path}")
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            else:
                raise ValueError(f"visual {str(v)[:200]!r} is neither an image nor a video file")
        elif isinstance(v, np.ndarray) and v.ndim == 3:
            images.append(Image.fromarray(np.asarray(v, dtype=np.uint8)).convert("RGB"))
        elif isinstance(v, np.ndarray) and v.ndim == 4:
            videos.append(np.asarray(v, dtype=np.uint8))
        else:
            what = f"a dict with keys {sorted(v)}" if isinstance(v, dict) else type(v).__name__
            raise ValueError(f"unsupported visual: {what} (the engine takes images and videos; audio is not supported)")
    return images, videos


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [x for v in visuals for x in _flatten(v)]
    return [visuals]


def load_video_frames(path: Path, max_frames: int) -> np.ndarray:
    """(frames, H, W, 3) uint8: `max_frames` frames sampled uniformly (all frames of a shorter clip), via PyAV."""
    if not path.is_file():
        raise ValueError(f"video file not found: {path}")
    from transformers.video_utils import load_video

    def uniform(metadata, **_):
        total = int(metadata.total_num_frames)
        return np.unique(np.linspace(0, total - 1, min(max_frames, total)).round().astype(int))

    frames, _ = load_video(str(path), backend="pyav", sample_indices_fn=uniform)
    return np.asarray(frames, dtype=np.uint8)


@dataclass(frozen=True)
class RequestRef:
    """Where a request comes from (file names of traces, error messages)."""

    task: str
    split: str
    doc_id: Any
    round: int | None = None

    def __str__(self) -> str:
        r = "" if self.round is None else f" round {self.round}"
        return f"task {self.task!r} split {self.split!r} doc {self.doc_id}{r}"


@dataclass(frozen=True)
class Answer:
    text: str
    raw_text: str  # before cutting at the stop strings
    prompt_tokens: int
    new_tokens: int
    kv_bytes_kept: int
    kv_bytes_full: int
    ignored_settings: tuple[str, ...] = ()  # the task's generation settings that the engine does not apply


# -- traces ------------------------------------------------------------------------------------------------------
class TraceStore:
    """``trace_dir/<task>/<split>/<doc_id>[.r<round>].npz`` (+ ``.image<k>.png``) and ``index.rank<r>.jsonl``,
    one line per answer (task, split, doc_id, round, question, prediction, trace, images, method, keep, KV bytes).
    Each process writes its own index, so data-parallel runs never share a file."""

    def __init__(self, root: str | Path, rank: int = 0, save_images: bool = True) -> None:
        self.root = Path(root)
        self.rank = rank
        self.save_images = save_images
        self._lock = threading.Lock()

    @property
    def index_path(self) -> Path:
        return self.root / f"index.rank{self.rank}.jsonl"

    def save(self, ref: RequestRef, result: Any, images: Sequence[Image.Image], answer: Answer) -> Path:
        folder = self.root / _safe(ref.task) / _safe(ref.split)
        folder.mkdir(parents=True, exist_ok=True)
        stem = _safe(str(ref.doc_id)) + ("" if ref.round is None else f".r{ref.round}")
        path = result.trace.save(folder / f"{stem}.npz")
        image_files = []
        if self.save_images:
            for k, im in enumerate(images):
                image_files.append(folder / f"{stem}.image{k}.png")
                im.save(image_files[-1])
        tr = result.trace
        line = {
            "task": ref.task, "split": ref.split, "doc_id": ref.doc_id, "round": ref.round,
            "question": tr.question, "prediction": answer.text, "raw_prediction": answer.raw_text,
            "trace": str(path.relative_to(self.root)), "images": [str(p.relative_to(self.root)) for p in image_files],
            "method": tr.method, "keep": tr.keep_ratio, "protocol": tr.protocol,
            "prompt_tokens": answer.prompt_tokens, "new_tokens": answer.new_tokens,
            "kv_bytes_kept": answer.kv_bytes_kept, "kv_bytes_full": answer.kv_bytes_full,
        }
        with self._lock, open(self.index_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
            f.flush()
        return path


def _safe(name: str) -> str:
    """A file-name-safe form of a task / split / doc id (no separators, no leading dots)."""
    s = re.sub(r"[^A-Za-z0-9._=-]+", "_", name).lstrip(".")
    return s[:120] or "_"


# -- the engine side ---------------------------------------------------------------------------------------------
class EngineRunner:
    """Answers requests with `tgvkv.generate` on one loaded model (the lmms class holds one of these)."""

    def __init__(self, model: Any, processor: Any, config: PluginConfig, model_name: str = "",
                 traces: TraceStore | None = None) -> None:
        from ...eval.runner import policy_options

        self.model, self.processor, self.config = model, processor, config
        self.model_name = model_name or config.pretrained
        self.traces = traces
        base = policy_options(config.method, config.seed, "") if config.policy is not None else {}
        self.policy_options = {**base, **config.policy_options}  # checked here; each request gets its own seed
        if config.policy is None and config.policy_options:
            raise ValueError("model_args: policy_options are given but method is 'full' (nothing is evicted)")
        if config.policy is not None:  # unknown or bad options: say so now, not at the first request
            from ...policies import make_policy

            try:
                make_policy(config.policy, **self.policy_options)
            except (TypeError, ValueError) as e:
                raise ValueError(f"model_args: policy_options: {e}") from None
        self._warned: set[str] = set()

    def _capture(self):
        from ...generation import CaptureOptions

        if self.traces is not None and self.config.trace_diagnostics:
            return CaptureOptions()
        return CaptureOptions(diagnostics=False, hidden_states=False)  # what `python -m tgvkv.eval` uses

    def warn_ignored(self, keys: Iterable[str]) -> list[str]:
        """Task generation settings that do not apply, each reported once (returned for the caller to log)."""
        new = [k for k in keys if k not in self._warned]
        self._warned.update(new)
        return new

    def options_for(self, ref: RequestRef) -> dict[str, Any]:
        """The policy's options for one document: a seeded method (``random``) draws per document, as
        ``python -m tgvkv.eval`` draws per example; explicit ``policy_options`` win."""
        from ...eval.runner import policy_options

        if self.config.policy is None:
            return {}
        return {**policy_options(self.config.method, self.config.seed, f"{ref.task}:{ref.doc_id}"),
                **self.config.policy_options}

    def answer(self, context: str, visuals: Any, gen_kwargs: Mapping[str, Any] | None, ref: RequestRef) -> Answer:
        from ...generation import RunOptions, generate

        try:
            decoding = decoding_from_gen_kwargs(gen_kwargs, self.config.max_new_tokens)
            question = clean_context(context)
            images, videos = split_visuals(visuals, self.config.max_frames)
            opts = RunOptions(max_new_tokens=decoding.max_new_tokens, protocol=self.config.protocol,
                              do_sample=decoding.do_sample, temperature=decoding.temperature, top_p=decoding.top_p,
                              seed=self.config.seed)
            res = generate(self.model, self.processor, images, question, self.config.policy, self.config.keep_ratio,
                           options=opts, capture=self._capture(), policy_options=self.options_for(ref),
                           model_name=self.model_name, videos=videos)
        except ValueError as e:
            raise ValueError(f"{ref}: {e}") from e
        tr = res.trace
        answer = Answer(text=truncate_at_stops(res.text, decoding.until), raw_text=res.text,
                        prompt_tokens=int(tr.seq_len), new_tokens=len(res.token_ids),
                        kv_bytes_kept=int(tr.kv_bytes_kept.sum()), kv_bytes_full=int(tr.kv_bytes_full.sum()),
                        ignored_settings=decoding.ignored)
        if self.traces is not None:
            self.traces.save(ref, res, images, answer)
        return answer

    def loglikelihood(self, context: str, continuation: str, visuals: Any, ref: RequestRef) -> tuple[float, bool]:
        """log p(continuation | prompt) with the continuation teacher-forced on the evicted cache, and whether
        greedy decoding would produce it (official protocol: its first token comes from the full cache)."""
        import torch

        from ...generation import RunOptions, generate
        from ...options import MAX_NEW_TOKENS_LIMIT

        if not isinstance(continuation, str) or not continuation:
            raise ValueError(f"{ref}: loglikelihood needs a non-empty continuation, got {continuation!r}")
        ids = self.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not ids or len(ids) > MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"{ref}: the continuation has {len(ids)} tokens; "
                             f"1 to {MAX_NEW_TOKENS_LIMIT} are supported")
        try:
            question = clean_context(context)
            images, videos = split_visuals(visuals, self.config.max_frames)
            opts = RunOptions(max_new_tokens=len(ids), protocol=self.config.protocol, seed=self.config.seed)
            res = generate(self.model, self.processor, images, question, self.config.policy, self.config.keep_ratio,
                           options=opts, capture=self._capture(), policy_options=self.options_for(ref),
                           teacher_tokens=ids, model_name=self.model_name, videos=videos)
        except ValueError as e:
            raise ValueError(f"{ref}: {e}") from e
        logp = torch.log_softmax(res.step_logits.float(), dim=-1)
        target = torch.as_tensor(ids, device=logp.device)
        total = float(logp.gather(1, target[:, None]).sum())
        greedy = bool((logp.argmax(dim=-1) == target).all())
        if not math.isfinite(total):
            raise ValueError(f"{ref}: the log-likelihood is not finite ({total})")
        return total, greedy


__all__ = ["PluginConfig", "Decoding", "decoding_from_gen_kwargs", "truncate_at_stops", "clean_context",
           "split_visuals", "load_video_frames", "RequestRef", "Answer", "TraceStore", "EngineRunner", "FULL"]
