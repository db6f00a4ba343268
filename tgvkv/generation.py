"""Generation with KV eviction: prefill with statistics capture, pure selection, cache eviction, decode.

Protocols. "official" (TGV-KV's): the prefill forward on the full cache produces the first answer token, then the
cache is evicted and decoding continues. "strict": the last prompt position is re-run on the evicted cache, so the
first answer token is affected by eviction too (single-token answers are otherwise immune).
Positions are never renumbered (see tgvkv.cache). Decoding uses plain `model.generate` on the evicting cache.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from . import hf_compat
from .cache import EvictingCache
from .capture import Recorder, recording
from .geometry import resolve_geometry
from .images import normalise_image, pixel_sha256
from .layout import TokenLayout, contiguous_runs
from .policies import Policy, Selection, check_keep_ratio, make_policy
from .policies.base import DecodeRule
from .stats import PrefillStats, StatRequest, column_positions
from .trace import MAX_THUMBNAIL_SIDE, TEXT, VISION, Trace, make_thumbnail
from .validation import validate_question

MAX_NEW_TOKENS_LIMIT = 1024


@dataclass
class CaptureOptions:
    """What the trace records beyond what the policy needs (diagnostics cost extra attention passes)."""

    diagnostics: bool = True  # rows of every text query + column sums over all keys -> block sums, accumulated attention
    max_map_tokens: int = 768  # store full (L, T, T) attention maps only for prompts up to this length
    hidden_states: bool = True  # store prefill hidden states (cosine-neighbour plots)
    max_hidden_bytes: int = 64 * 2**20
    thumbnail_side: int = 384  # px: store a copy of each image this small in the trace (overlay figures); 0: none

    def __post_init__(self) -> None:
        if not isinstance(self.thumbnail_side, int) or not 0 <= self.thumbnail_side <= MAX_THUMBNAIL_SIDE:
            raise ValueError(
                f"thumbnail_side must be an integer in [0, {MAX_THUMBNAIL_SIDE}], got {self.thumbnail_side!r}")


@dataclass
class RunOptions:
    max_new_tokens: int = 32
    protocol: Literal["official", "strict"] = "official"
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    followup: str | None = None  # a second user turn appended to the (evicted) cache
    followup_max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or not (1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT):
            raise ValueError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens!r}")
        if self.protocol not in ("official", "strict"):
            raise ValueError(f"protocol must be 'official' or 'strict', got {self.protocol!r}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError("sampling needs temperature > 0 and 0 < top_p <= 1")


@dataclass
class Result:
    text: str
    token_ids: np.ndarray  # (G,) generated ids
    trace: Trace
    step_logits: torch.Tensor | None = field(default=None, repr=False)  # (G, V) float32 logits that chose each token
    followup_text: str | None = None
    followup_step_logits: torch.Tensor | None = field(default=None, repr=False)  # (F, V) float32, follow-up turn


# -- layout ------------------------------------------------------------------------------------------------------
def build_layout(model_config: Any, processor: Any, input_ids: torch.Tensor, inputs: dict, images: Sequence[Image.Image],
                 videos: Sequence[Any] = ()) -> TokenLayout:
    """Vision spans from the config's image/video token ids, grid geometry from the family resolver.

    image_sizes lists the images' (width, height), then each video's frame size: a view's image_index indexes it."""
    facts = hf_compat.model_facts(model_config)
    ids = input_ids[0].cpu().numpy()
    spans = contiguous_runs(np.isin(ids, facts.vision_token_ids))
    if images and not spans:
        raise ValueError(
            f"the prompt contains no image token (id {facts.image_token_id}); the processor did not insert image tokens"
        )
    sizes = [im.size for im in images]
    views, token_map = resolve_geometry(model_config, processor, inputs, spans, sizes)
    sizes += [_frame_size(v) for v in videos]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist()) if hasattr(processor, "tokenizer") else []
    return TokenLayout(seq_len=len(ids), image_spans=spans, views=views, token_map=token_map, image_sizes=sizes, tokens=tokens)


def _frame_size(video: Any) -> tuple[int, int]:
    """(width, height) of a clip given as a (frames, H, W, 3) array or a list of PIL frames."""
    if isinstance(video, (list, tuple)) and video and hasattr(video[0], "size") and not hasattr(video[0], "shape"):
        return tuple(video[0].size)
    shape = np.asarray(video[0]).shape
    return (int(shape[1]), int(shape[0]))


def _stat_request(policy: Policy | None, layout: TokenLayout, capture: CaptureOptions) -> StatRequest:
    req = policy.request(layout) if policy is not None else StatRequest(np.zeros(0, dtype=np.int64))
    if capture.diagnostics:
        req = req.merge(StatRequest(layout.text_positions.astype(np.int64), "all"))
    return req


# -- summaries for the trace -------------------------------------------------------------------------------------
def block_sums(rows: np.ndarray, query_positions: np.ndarray, colsums: np.ndarray, layout: TokenLayout) -> np.ndarray | None:
    """(L, 2, 2) head-averaged attention totals [query modality, key modality] from text rows + column sums."""
    text = layout.text_positions
    if colsums is None or not np.all(np.isin(text, query_positions)) or np.isnan(colsums).any():
        return None
    vis = layout.is_vision
    text_rows = rows[:, np.searchsorted(query_positions, text)].astype(np.float64)  # (L, n_text, T)
    from_text = text_rows.sum(axis=1)  # (L, T) column sums over text queries
    from_vision = colsums.astype(np.float64) - from_text
    out = np.zeros((rows.shape[0], 2, 2))
    out[:, TEXT, TEXT], out[:, TEXT, VISION] = from_text[:, ~vis].sum(1), from_text[:, vis].sum(1)
    out[:, VISION, TEXT], out[:, VISION, VISION] = from_vision[:, ~vis].sum(1), from_vision[:, vis].sum(1)
    return out.astype(np.float32)


def _hidden_states(out: Any, capture: CaptureOptions) -> dict[str, np.ndarray]:
    hs = getattr(out, "hidden_states", None)
    if not capture.hidden_states or not hs:
        return {}
    hs = hs[0]  # generate output: per step; step 0 = the prefill, one (B, T, d) tensor per layer (+ embeddings)
    per_layer = hs[0][0].numel() * 2
    step = max(1, int(np.ceil(len(hs) * per_layer / capture.max_hidden_bytes)))
    return {f"layer_{k}": hs[k][0].detach().to(torch.float16).cpu().numpy() for k in range(0, len(hs), step)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"tgvkv": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _thumbnails(images: Sequence[Any], side: int) -> list[np.ndarray]:
    """Small copies of the prompt's images for the trace; none when disabled (side 0) or when an image is not a PIL
    image (arrays the processor accepts have no agreed layout), so indices always match the views' image_index."""
    if not side or not all(isinstance(im, Image.Image) for im in images):
        return []
    return [make_thumbnail(im, side) for im in images]


# -- the engine ----------------------------------------------------------------------------------------------------
def check_request(processor: Any, images: Sequence[Image.Image], question: str, policy: str | Policy | None,
                  keep_ratio: float, options: RunOptions, policy_options: dict[str, Any] | None = None
                  ) -> tuple[list[Image.Image], float, Policy | None]:
    """Everything about a request that can be checked without the model: (normalised images, keep ratio, policy).

    Images go through `tgvkv.images.normalise_image` (RGB, EXIF orientation, alpha on white, 16-bit scaled, size
    bounds), the same intake as the CLI and the app. Raises ValueError naming the problem.
    """
    validate_question(question, processor)
    if options.followup:
        validate_question(options.followup, processor, what="follow-up question")
    keep = check_keep_ratio(keep_ratio) if policy is not None else 1.0
    pol = make_policy(policy, **(policy_options or {})) if policy is not None else None
    return [normalise_image(im) for im in images], keep, pol


def generate(
    model: torch.nn.Module,
    processor: Any,
    images: Sequence[Image.Image],
    question: str,
    policy: str | Policy | None = "tgv-kv",
    keep_ratio: float = 0.05,
    max_new_tokens: int = 32,
    *,
    options: RunOptions | None = None,
    capture: CaptureOptions | None = None,
    policy_options: dict[str, Any] | None = None,
    teacher_tokens: Sequence[int] | None = None,
    model_name: str = "",
    videos: Sequence[Any] | None = None,
) -> Result:
    """Answer `question` about `images` with the KV cache evicted by `policy` (None: full KV, nothing evicted).

    videos: optional clips, each a (frames, H, W, 3) uint8 array (or a list of frames), placed after the images
    for processors that take videos (Qwen-VL, LLaVA-OneVision); their tokens count as vision.

    teacher_tokens: instead of decoding freely, feed these answer tokens and record the logits at each step
    (used to measure the divergence from the full-KV answer).
    """
    opts = options or RunOptions(max_new_tokens=max_new_tokens)
    capture = capture or CaptureOptions()
    images, keep_ratio, pol = check_request(processor, images, question, policy, keep_ratio, opts, policy_options)
    facts = hf_compat.model_facts(model.config)
    if not hf_compat.capture_enabled(model):
        hf_compat.enable_capture(model)
    device = hf_compat.language_device(model)

    videos = list(videos or [])
    prompt = hf_compat.render_prompt(processor, question, len(images), len(videos))
    inputs = hf_compat.process_inputs(processor, images, prompt, device, model.dtype, videos=videos)
    prompt_ids = inputs["input_ids"]
    layout = build_layout(model.config, processor, prompt_ids, inputs, images, videos)
    T, L = layout.seq_len, facts.num_layers
    request = _stat_request(pol, layout, capture)
    recorder = Recorder(
        query_positions=request.query_positions,
        column_positions=column_positions(request, layout.text_positions, T),
        full_maps=capture.diagnostics and T <= capture.max_map_tokens,
        stat_dtype=model.dtype if request.model_dtype else None,
    )
    cache = EvictingCache(config=model.config)
    timings: dict[str, float] = {}

    # 1. prefill on the full prompt, recording statistics
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), recording(recorder):
        # Prefill through `generate` (one token) so the first answer token gets the model's own generation settings
        # (repetition penalty, sampling, ...) exactly as in a plain `generate` call.
        if opts.do_sample:
            torch.manual_seed(opts.seed)
        out = model.generate(
            **inputs, past_key_values=cache, return_dict_in_generate=True, output_logits=True,
            output_hidden_states=capture.hidden_states, **_generation_kwargs(model, opts, 1),
        )
    first_token, first_logits = out.sequences[:, -1], out.logits[0]
    _sync(device)
    timings["prefill_s"] = time.perf_counter() - t0

    # 2. pure selection, 3. eviction
    t1 = time.perf_counter()
    stats = recorder.prefill_stats(L, T)
    evictable = np.array([cache.evictable(l) for l in range(L)])
    selection, layer_selection = _select(pol, stats, layout, keep_ratio, evictable) if pol is not None else (_keep_all(L, T), None)
    timings["select_s"] = time.perf_counter() - t1
    kv_full = cache.kv_bytes()
    cache.keep_positions(selection.kept)
    kv_kept = cache.kv_bytes()

    trace = Trace(
        model=model_name or getattr(model.config, "_name_or_path", "") or facts.model_type,
        method=pol.name if pol is not None else "full",
        keep_ratio=keep_ratio,
        protocol=opts.protocol,
        question=question,
        layout=layout,
        prompt_ids=prompt_ids[0].cpu().numpy().astype(np.int64),
        num_layers=L,
        policy=pol.describe() if pol is not None else {"method": "full"},
        seed=opts.seed,
        versions=_versions(),
        device=str(device),
        dtype=str(model.dtype).replace("torch.", ""),
        image_sha256=[pixel_sha256(im) for im in images],
        thumbnails=_thumbnails(images, capture.thumbnail_side),
        budgets=selection.budgets,
        kept_mask=selection.kept_mask(T),
        scores=selection.scores.astype(np.float32),
        selection_info={k: np.asarray(v) for k, v in selection.info.items()},
        query_positions=stats.query_positions,
        query_rows=stats.rows.astype(np.float32),
        column_sums=stats.column_sums.astype(np.float32) if stats.column_sums is not None else None,
        block_sums=block_sums(stats.rows, stats.query_positions, stats.column_sums, layout),
        attention_maps=recorder.full_maps_array(L),
        hidden_states=_hidden_states(out, capture),
        kv_bytes_full=kv_full,
        kv_bytes_kept=kv_kept,
    )
    del stats

    # 4. decode
    rule = _decode_rule(pol, layer_selection, layout, evictable) if pol is not None else None
    decode_rec = Recorder(decode=rule is not None, stat_dtype=recorder.stat_dtype)
    cache.decode_rule, cache.recorder = rule, decode_rec
    t2 = time.perf_counter()
    with torch.inference_mode(), recording(decode_rec):
        if teacher_tokens is not None:
            new_ids, step_logits = _teacher_forced(model, cache, first_logits, prompt_ids, teacher_tokens, opts)
        else:
            new_ids, step_logits = _decode(model, cache, first_token, first_logits, prompt_ids, opts)
        cache.flush_decode_evictions()
    _sync(device)
    timings["decode_s"] = time.perf_counter() - t2
    del out

    tokenizer = processor.tokenizer
    trace.output_ids = new_ids.astype(np.int64)
    trace.output_text = tokenizer.decode(new_ids.tolist(), skip_special_tokens=True).strip()
    trace.output_tokens = tokenizer.convert_ids_to_tokens(new_ids.tolist())
    log = cache.eviction_log()
    log[:, 0] -= T  # logical length -> decode step (1 = after the first decode forward)
    trace.decode_evictions = log

    # 5. optional follow-up turn on the same (evicted) cache
    if opts.followup:
        t3 = time.perf_counter()
        with torch.inference_mode(), recording(decode_rec):
            f_ids, f_logits = _followup(model, processor, cache, prompt_ids, new_ids, question, len(images),
                                        trace.output_text, opts, len(videos))
            cache.flush_decode_evictions()
        log = cache.eviction_log()  # now with the follow-up turn's evictions (steps past the answer)
        log[:, 0] -= T
        trace.decode_evictions = log
        timings["followup_s"] = time.perf_counter() - t3
        trace.followup_question = opts.followup
        trace.followup_ids = f_ids.astype(np.int64)
        trace.followup_text = tokenizer.decode(f_ids.tolist(), skip_special_tokens=True).strip()

    trace.kv_bytes_final = cache.kv_bytes()
    trace.cache_len_final = np.array(cache.physical_lengths(), dtype=np.int64)
    n_new = len(new_ids)
    timings["new_tokens"] = float(n_new)
    timings["total_s"] = timings["prefill_s"] + timings["select_s"] + timings["decode_s"]
    timings["tokens_per_s"] = n_new / timings["total_s"] if timings["total_s"] > 0 else 0.0
    timings["decode_tokens_per_s"] = (n_new - 1) / timings["decode_s"] if n_new > 1 and timings["decode_s"] > 0 else 0.0
    trace.timings = timings
    return Result(text=trace.output_text, token_ids=trace.output_ids, trace=trace, step_logits=step_logits,
                  followup_text=trace.followup_text, followup_step_logits=f_logits if opts.followup else None)


def _select(pol: Policy, stats: PrefillStats, layout: TokenLayout, keep_ratio: float, evictable: np.ndarray) -> tuple[Selection, Selection]:
    """The policy's selection over the evictable layers only (sliding-window layers of hybrid models such as Gemma 3
    keep their own window and are never evicted): budgets are shared among the full-attention layers, as if the
    model had only those. Returns (selection over all L layers, the policy's own selection over evictable layers);
    a non-evictable layer keeps every position, with NaN scores and NaN / -1 in per-layer info arrays."""
    if evictable.all():
        sel = pol.select(stats, layout, keep_ratio)
        return sel, sel
    idx = np.flatnonzero(evictable)
    if len(idx) == 0:
        raise ValueError("the model has no full-attention layer to evict")
    sub_stats = PrefillStats(
        rows=stats.rows[idx],
        query_positions=stats.query_positions,
        column_sums=None if stats.column_sums is None else stats.column_sums[idx],
        column_mask=stats.column_mask,
        dtype=stats.dtype,
    )
    sub = pol.select(sub_stats, layout, keep_ratio)
    L, T = len(evictable), layout.seq_len
    kept, budgets, scores = [np.arange(T)] * L, np.full(L, T, dtype=np.int64), np.full((L, T), np.nan)
    for j, l in enumerate(idx):
        kept[l], budgets[l], scores[l] = sub.kept[j], sub.budgets[j], sub.scores[j]
    info = {}
    for k, v in sub.info.items():
        v = np.asarray(v)
        if v.ndim >= 1 and v.shape[0] == len(idx):
            full = np.full((L, *v.shape[1:]), np.nan if v.dtype.kind == "f" else -1, dtype=v.dtype if v.dtype.kind in "fi" else float)
            full[idx] = v
            v = full
        info[k] = v
    info["evictable_layers"] = evictable.copy()
    return Selection(kept=kept, budgets=budgets, scores=scores, info=info), sub


@dataclass
class _LayerSubsetRule(DecodeRule):
    """A policy's decode rule made for the evictable layers only, addressed with the model's layer indices."""

    inner: DecodeRule
    index: dict[int, int]  # model layer -> index in the policy's selection

    def victim(self, layer, attn_row, cache_len, logical_len):
        j = self.index.get(layer)
        return None if j is None else self.inner.victim(j, attn_row, cache_len, logical_len)

    def evicted(self, layer, slot):
        self.inner.evicted(self.index[layer], slot)


def _decode_rule(pol: Policy, layer_selection: Selection, layout: TokenLayout, evictable: np.ndarray) -> DecodeRule | None:
    rule = pol.decode_rule(layer_selection, layout)
    if rule is None or evictable.all():
        return rule
    return _LayerSubsetRule(rule, {int(l): j for j, l in enumerate(np.flatnonzero(evictable))})


def _keep_all(L: int, T: int) -> Selection:
    return Selection(kept=[np.arange(T)] * L, budgets=np.full(L, T), scores=np.full((L, T), np.nan))


def _eos_ids(model: torch.nn.Module) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _generation_kwargs(model: torch.nn.Module, opts: RunOptions, n_tokens: int) -> dict[str, Any]:
    cfg = model.generation_config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else next(iter(_eos_ids(model)), 0)
    kw: dict[str, Any] = {"max_new_tokens": n_tokens, "do_sample": opts.do_sample, "pad_token_id": pad}
    if opts.do_sample:
        kw.update(temperature=opts.temperature, top_p=opts.top_p, top_k=0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


def _decode(model, cache, first, first_logits, prompt_ids, opts: RunOptions) -> tuple[np.ndarray, torch.Tensor]:
    """Generate the answer on the (evicted) cache with plain `model.generate`; returns ids and per-step raw logits."""
    eos = _eos_ids(model)
    if opts.protocol == "official":  # the first token came from the prefill on the full cache
        logits = [first_logits.float()]
        ids = torch.cat([prompt_ids, first[:, None]], dim=1)
        if int(first[0]) in eos or opts.max_new_tokens == 1:
            return first.cpu().numpy(), torch.cat(logits)
        remaining = opts.max_new_tokens - 1
    else:  # strict: re-run the last prompt position on the evicted cache
        cache.drop_last()
        ids, logits, remaining = prompt_ids, [], opts.max_new_tokens
    out = model.generate(  # sampling continues the RNG stream seeded before the prefill, as plain `generate` would
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=cache,
        return_dict_in_generate=True,
        output_logits=True,
        **_generation_kwargs(model, opts, remaining),
    )
    new = out.sequences[0, prompt_ids.shape[1] :]
    logits += [l.float() for l in out.logits]
    return new.cpu().numpy(), torch.cat(logits)


def _teacher_forced(model, cache, first_logits, prompt_ids, tokens: Sequence[int], opts: RunOptions) -> tuple[np.ndarray, torch.Tensor]:
    """Feed `tokens` one at a time on the evicted cache; logits[i] is the distribution that predicts tokens[i]."""
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise ValueError("teacher_tokens is empty")
    logits = []
    if opts.protocol == "official":
        logits.append(first_logits.float())
        feed = tokens[:-1]
    else:
        cache.drop_last()
        feed = [int(prompt_ids[0, -1])] + tokens[:-1]
    device = prompt_ids.device
    for tok in feed:
        out = model(input_ids=torch.tensor([[tok]], device=device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits.append(out.logits[:, -1].float())
    return np.asarray(tokens, dtype=np.int64), torch.cat(logits)


def _followup(model, processor, cache, prompt_ids, answer_ids, question, n_images, answer_text, opts: RunOptions,
              n_videos: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Append a second user turn after the answer (on the evicted cache) and generate its answer; returns its ids and
    the (F, V) float32 logits that chose them."""
    suffix = hf_compat.followup_suffix(processor, question, n_images, answer_text, opts.followup, n_videos)
    suffix_ids = processor.tokenizer(suffix, add_special_tokens=False, return_tensors="pt")["input_ids"].to(prompt_ids.device)
    answer = torch.as_tensor(answer_ids, device=prompt_ids.device)[None]
    eos = _eos_ids(model)
    if len(answer_ids) == 0 or int(answer_ids[-1]) not in eos:  # the template closes the assistant turn with EOS
        answer = torch.cat([answer, torch.tensor([[min(eos)]], device=answer.device)], dim=1) if eos else answer
    ids = torch.cat([prompt_ids, answer, suffix_ids], dim=1)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=cache,
        return_dict_in_generate=True,
        output_logits=True,
        **_generation_kwargs(model, opts, opts.followup_max_new_tokens or opts.max_new_tokens),
    )
    return out.sequences[0, ids.shape[1] :].cpu().numpy(), torch.cat([l.float() for l in out.logits])


# -- comparisons ---------------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    full: Result
    evicted: Result
    step_kl: np.ndarray  # (G_full,) KL(full || evicted) of next-token distributions with the full answer teacher-forced
    first_divergence: int | None  # index of the first generated token where the two answers differ (None: identical)


def compare(
    model: torch.nn.Module,
    processor: Any,
    images: Sequence[Image.Image],
    question: str,
    policy: str | Policy = "tgv-kv",
    keep_ratio: float = 0.05,
    max_new_tokens: int = 32,
    *,
    options: RunOptions | None = None,
    capture: CaptureOptions | None = None,
    policy_options: dict[str, Any] | None = None,
    model_name: str = "",
) -> Comparison:
    """Run full KV and `policy` on the same input; also the per-step divergence of the evicted model from the full one."""
    opts = options or RunOptions(max_new_tokens=max_new_tokens)
    images = check_request(processor, images, question, policy, keep_ratio, opts, policy_options)[0]  # before any run
    common = dict(options=opts, capture=capture, model_name=model_name)
    full = generate(model, processor, images, question, None, 1.0, **common)
    evicted = generate(model, processor, images, question, policy, keep_ratio, policy_options=policy_options, **common)
    forced = generate(
        model, processor, images, question, policy, keep_ratio, options=RunOptions(**{**vars(opts), "followup": None}),
        capture=CaptureOptions(diagnostics=False, hidden_states=False, thumbnail_side=0), policy_options=policy_options,
        teacher_tokens=full.token_ids.tolist(), model_name=model_name,
    )
    p = torch.log_softmax(full.step_logits, dim=-1)
    q = torch.log_softmax(forced.step_logits, dim=-1)
    kl = (p.exp() * (p - q)).sum(-1).clamp_min(0).cpu().numpy()
    a, b = full.token_ids.tolist(), evicted.token_ids.tolist()
    diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
    return Comparison(full=full, evicted=evicted, step_kl=kl, first_divergence=diverge)
