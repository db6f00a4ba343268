"""Generation with KV eviction as steps: check, prompt, prefill, evict, decode, follow-up, trace.

Each step is a short public function over small records, so a run can be read (and re-assembled) one step at a
time: `tgvkv.generation.generate` runs them in order inside `capturing(model)`; `tgvkv.batch` runs the first four
per sample before packing the caches.

Protocols. "official" (TGV-KV's): the prefill forward on the full cache produces the first answer token, then the
cache is evicted and decoding continues. "strict": the last prompt position is re-run on the evicted cache, so the
first answer token is affected by eviction too (single-token answers are otherwise immune).
Positions are never renumbered (see tgvkv.cache). Decoding uses plain `model.generate` on the evicting cache; the
decode-time rule of a policy runs after every forward through a logits processor that returns the scores unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from . import hf_compat
from .cache import EvictingCache
from .capture import Recorder, recording
from .geometry import resolve_geometry
from .images import normalise_image, pixel_sha256
from .layout import TokenLayout, contiguous_runs
from .options import CaptureOptions, RunOptions
from .policies import EVICTABLE_LAYERS, Policy, Selection, check_keep_ratio, make_policy
from .stats import PrefillStats, StatRequest, column_positions
from .trace import TEXT, VISION, Trace, make_thumbnail
from .validation import validate_question


# -- 1. check ------------------------------------------------------------------------------------------------------
@dataclass
class Request:
    """A request checked without the model: normalised images, a known policy, a valid keep ratio."""

    images: list[Image.Image]
    question: str
    policy: Policy | None  # None: full KV, nothing evicted
    keep_ratio: float
    options: RunOptions
    videos: list[Any]


def check_request(processor: Any, images: Sequence[Image.Image], question: str, policy: str | Policy | None,
                  keep_ratio: float, options: RunOptions, policy_options: dict[str, Any] | None = None,
                  videos: Sequence[Any] = ()) -> Request:
    """Everything about a request that can be checked without the model. Raises ValueError naming the problem.

    Images go through `tgvkv.images.normalise_image` (RGB, EXIF orientation, alpha on white, 16-bit scaled, size
    bounds), the same intake as the CLI and the app.
    """
    validate_question(question, processor)
    if options.followup:
        validate_question(options.followup, processor, what="follow-up question")
    keep = check_keep_ratio(keep_ratio) if policy is not None else 1.0
    pol = make_policy(policy, **(policy_options or {})) if policy is not None else None
    return Request([normalise_image(im) for im in images], question, pol, keep, options, list(videos))


# -- 2. prompt -----------------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    inputs: dict[str, Any]  # the processor's tensors, on the language model's device
    ids: torch.Tensor  # (1, T) prompt token ids
    layout: TokenLayout


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


def build_prompt(model: torch.nn.Module, processor: Any, request: Request) -> Prompt:
    """The chat-templated prompt as model inputs, and where its image tokens sit."""
    n_images, n_videos = len(request.images), len(request.videos)
    text = hf_compat.render_prompt(processor, request.question, n_images, n_videos)
    device = hf_compat.language_device(model)
    inputs = hf_compat.process_inputs(processor, request.images, text, device, model.dtype, videos=request.videos)
    layout = build_layout(model.config, processor, inputs["input_ids"], inputs, request.images, request.videos)
    return Prompt(inputs, inputs["input_ids"], layout)


# -- 3. prefill ----------------------------------------------------------------------------------------------------
@dataclass
class Prefill:
    """The full cache after the prompt, what was recorded on the way, and the first answer token it chose."""

    cache: EvictingCache
    recorder: Recorder  # rows / column sums the policy asked for (+ diagnostics), full maps for short prompts
    first_token: torch.Tensor  # (1,)
    first_logits: torch.Tensor  # (1, V) raw logits that chose it
    hidden_states: dict[str, np.ndarray]  # "layer_k" -> (T, d) float16, when the capture options ask for them
    seconds: float


def stat_request(policy: Policy | None, layout: TokenLayout, capture: CaptureOptions) -> StatRequest:
    """The attention statistics to record: what the policy needs, plus every text row for the diagnostics."""
    req = policy.request(layout) if policy is not None else StatRequest(np.zeros(0, dtype=np.int64))
    if capture.diagnostics:
        req = req.merge(StatRequest(layout.text_positions.astype(np.int64), "all"))
    return req


def prefill(model: torch.nn.Module, prompt: Prompt, policy: Policy | None, capture: CaptureOptions,
            options: RunOptions) -> Prefill:
    """One forward over the prompt on an empty evicting cache, recording statistics; it also picks answer token 1.

    Runs through `generate` (one token) so the first answer token gets the model's own generation settings
    (repetition penalty, sampling, ...) exactly as in a plain `generate` call.
    """
    request = stat_request(policy, prompt.layout, capture)
    T = prompt.layout.seq_len
    recorder = Recorder(
        query_positions=request.query_positions,
        column_positions=column_positions(request, prompt.layout.text_positions, T),
        full_maps=capture.diagnostics and T <= capture.max_map_tokens,
        stat_dtype=model.dtype if request.model_dtype else None,
    )
    cache = EvictingCache(config=model.config)
    device = prompt.ids.device
    sync_device(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), recording(recorder):
        if options.do_sample:
            torch.manual_seed(options.seed)
        out = model.generate(**prompt.inputs, past_key_values=cache, return_dict_in_generate=True, output_logits=True,
                             output_hidden_states=capture.hidden_states, **generation_kwargs(model, options, 1))
    seconds = elapsed(t0, device)
    return Prefill(cache, recorder, out.sequences[:, -1], out.logits[0], _hidden_states(out, capture), seconds)


def _hidden_states(out: Any, capture: CaptureOptions) -> dict[str, np.ndarray]:
    hs = getattr(out, "hidden_states", None)
    if not capture.hidden_states or not hs:
        return {}
    hs = hs[0]  # generate output: per step; step 0 = the prefill, one (B, T, d) tensor per layer (+ embeddings)
    per_layer = hs[0][0].numel() * 2
    step = max(1, int(np.ceil(len(hs) * per_layer / capture.max_hidden_bytes)))
    return {f"layer_{k}": hs[k][0].detach().to(torch.float16).cpu().numpy() for k in range(0, len(hs), step)}


# -- 4. select and evict -------------------------------------------------------------------------------------------
@dataclass
class Evicted:
    """The selection applied to the cache, with what it was computed from and what it saved."""

    stats: PrefillStats
    selection: Selection  # over all L layers (a never-evicted layer keeps every position)
    policy_selection: Selection | None  # the policy's own, over the evictable layers only (its decode rule reads it)
    kv_bytes_full: np.ndarray  # (L,) measured before eviction
    kv_bytes_kept: np.ndarray  # (L,) measured after
    seconds: float  # statistics to host + selection


def select_evictable(policy: Policy, stats: PrefillStats, layout: TokenLayout, keep_ratio: float,
                     evictable: np.ndarray) -> tuple[Selection, Selection]:
    """The policy's selection over the evictable layers only (sliding-window layers of hybrid models such as Gemma 3
    keep their own window and are never evicted): budgets are shared among the full-attention layers, as if the
    model had only those. Returns (selection over all L layers, the policy's own selection over evictable layers);
    a non-evictable layer keeps every position, with NaN scores and NaN / -1 in per-layer info arrays."""
    if evictable.all():
        sel = policy.select(stats, layout, keep_ratio)
        return sel, sel
    idx = np.flatnonzero(evictable)
    if len(idx) == 0:
        raise ValueError("the model has no full-attention layer to evict")
    sub = policy.select(stats.layers(idx), layout, keep_ratio)
    L, T = len(evictable), layout.seq_len
    kept, budgets, scores = [np.arange(T)] * L, np.full(L, T, dtype=np.int64), np.full((L, T), np.nan)
    for j, l in enumerate(idx):
        kept[l], budgets[l], scores[l] = sub.kept[j], sub.budgets[j], sub.scores[j]
    info = {k: _spread_over_layers(np.asarray(v), idx, L) for k, v in sub.info.items()}
    info[EVICTABLE_LAYERS] = evictable.copy()
    return Selection(kept=kept, budgets=budgets, scores=scores, info=info), sub


def _spread_over_layers(v: np.ndarray, idx: np.ndarray, L: int) -> np.ndarray:
    """A per-evictable-layer array placed at its model layers, NaN (float) / -1 (int) elsewhere; others unchanged."""
    if v.ndim == 0 or v.shape[0] != len(idx):
        return v
    full = np.full((L, *v.shape[1:]), np.nan if v.dtype.kind == "f" else -1, dtype=v.dtype if v.dtype.kind in "fi" else float)
    full[idx] = v
    return full


def keep_all(L: int, T: int) -> Selection:
    return Selection(kept=[np.arange(T)] * L, budgets=np.full(L, T), scores=np.full((L, T), np.nan))


def evict(pre: Prefill, policy: Policy | None, layout: TokenLayout, keep_ratio: float) -> Evicted:
    """Statistics to host memory, the policy's pure selection, and the cache cut down to it."""
    t0 = time.perf_counter()
    L, T = len(pre.cache.layers), layout.seq_len
    stats = pre.recorder.prefill_stats(L, T)
    if policy is None:
        selection, own = keep_all(L, T), None
    else:
        selection, own = select_evictable(policy, stats, layout, keep_ratio, pre.cache.evictable_layers())
    seconds = time.perf_counter() - t0
    full = pre.cache.kv_bytes()
    pre.cache.keep_positions(selection.kept)
    return Evicted(stats, selection, own, full, pre.cache.kv_bytes(), seconds)


# -- 5. decode -----------------------------------------------------------------------------------------------------
class DecodeEviction(LogitsProcessor):
    """Runs a policy's decode-time rule after every forward inside `generate`: the attention rows the forward
    recorded go to the cache, whose layers drop at most one slot each. The scores are returned unchanged."""

    def __init__(self, cache: EvictingCache, recorder: Recorder):
        self.cache, self.recorder = cache, recorder

    def evict(self) -> None:
        self.cache.evict_by_rule(self.recorder.take_decode_rows())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.evict()
        return scores


@dataclass
class Decoder:
    """What decoding on the evicted cache needs: the model, the cache with its decode rules attached, and the
    recorder that catches each single-token forward's attention row for them."""

    model: torch.nn.Module
    cache: EvictingCache
    options: RunOptions
    recorder: Recorder
    eviction: DecodeEviction | None  # None: the policy evicts nothing while decoding

    @classmethod
    def after(cls, model: torch.nn.Module, pre: Prefill, chosen: Evicted, policy: Policy | None, layout: TokenLayout,
              options: RunOptions) -> "Decoder":
        rule = policy.decode_rule(chosen.policy_selection, layout) if policy is not None else None
        pre.cache.attach_decode_rule(rule)
        recorder = Recorder(decode=rule is not None, stat_dtype=pre.recorder.stat_dtype)
        eviction = DecodeEviction(pre.cache, recorder) if rule is not None else None
        return cls(model, pre.cache, options, recorder, eviction)

    def generate(self, ids: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Plain `model.generate` continuing `ids` on the cache; returns (sequences (1, n + G), raw logits per step)."""
        kwargs = generation_kwargs(self.model, self.options, n_tokens)
        if self.eviction is not None:
            kwargs["logits_processor"] = LogitsProcessorList([self.eviction])
        with torch.inference_mode(), recording(self.recorder):
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=self.cache,
                                      return_dict_in_generate=True, output_logits=True, **kwargs)
        return out.sequences, list(out.logits)

    def forward(self, token: int, device: torch.device) -> torch.Tensor:
        """One single-token forward (teacher forcing), then the decode rule; returns the (1, V) logits."""
        with torch.inference_mode(), recording(self.recorder):
            out = self.model(input_ids=torch.tensor([[token]], device=device), past_key_values=self.cache,
                             use_cache=True, logits_to_keep=1)
        if self.eviction is not None:
            self.eviction.evict()
        return out.logits[:, -1]


@dataclass
class Decoded:
    ids: np.ndarray  # (G,) generated ids
    logits: torch.Tensor  # (G, V) float32 raw logits that chose (or, teacher-forced, predicted) each token
    seconds: float


def decode(decoder: Decoder, prompt: Prompt, pre: Prefill) -> Decoded:
    """The answer on the evicted cache. Official: token 1 came from the full-cache prefill; strict: the last prompt
    position is re-run on the evicted cache first. Sampling continues the RNG stream seeded before the prefill."""
    opts, device, T = decoder.options, prompt.ids.device, prompt.ids.shape[1]
    sync_device(device)
    t0 = time.perf_counter()
    if opts.protocol == "official":
        logits, ids = [pre.first_logits.float()], torch.cat([prompt.ids, pre.first_token[:, None]], dim=1)
        if int(pre.first_token[0]) in eos_ids(decoder.model) or opts.max_new_tokens == 1:
            return Decoded(pre.first_token.cpu().numpy(), torch.cat(logits), elapsed(t0, device))
        remaining = opts.max_new_tokens - 1
    else:
        decoder.cache.drop_last()
        logits, ids, remaining = [], prompt.ids, opts.max_new_tokens
    sequences, step_logits = decoder.generate(ids, remaining)
    logits += [x.float() for x in step_logits]
    return Decoded(sequences[0, T:].cpu().numpy(), torch.cat(logits), elapsed(t0, device))


def teacher_force(decoder: Decoder, prompt: Prompt, pre: Prefill, tokens: Sequence[int]) -> Decoded:
    """Feed `tokens` one at a time on the evicted cache; logits[i] is the distribution that predicts tokens[i]."""
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise ValueError("teacher_tokens is empty")
    device = prompt.ids.device
    sync_device(device)
    t0 = time.perf_counter()
    if decoder.options.protocol == "official":
        logits, feed = [pre.first_logits.float()], tokens[:-1]
    else:
        decoder.cache.drop_last()
        logits, feed = [], [int(prompt.ids[0, -1])] + tokens[:-1]
    logits += [decoder.forward(tok, device).float() for tok in feed]
    return Decoded(np.asarray(tokens, dtype=np.int64), torch.cat(logits), elapsed(t0, device))


def followup(decoder: Decoder, processor: Any, request: Request, prompt: Prompt, answer: Decoded,
             answer_text: str) -> Decoded:
    """A second user turn appended after the answer (on the same, evicted cache) and its answer."""
    opts, device = decoder.options, prompt.ids.device
    sync_device(device)
    t0 = time.perf_counter()
    suffix = hf_compat.followup_suffix(processor, request.question, len(request.images), answer_text, opts.followup,
                                       len(request.videos))
    suffix_ids = processor.tokenizer(suffix, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    answer_ids = torch.as_tensor(answer.ids, device=device)[None]
    eos = eos_ids(decoder.model)
    if len(answer.ids) == 0 or int(answer.ids[-1]) not in eos:  # the template closes the assistant turn with EOS
        answer_ids = torch.cat([answer_ids, torch.tensor([[min(eos)]], device=device)], dim=1) if eos else answer_ids
    ids = torch.cat([prompt.ids, answer_ids, suffix_ids], dim=1)
    sequences, step_logits = decoder.generate(ids, opts.followup_max_new_tokens or opts.max_new_tokens)
    return Decoded(sequences[0, ids.shape[1] :].cpu().numpy(), torch.cat([x.float() for x in step_logits]),
                   elapsed(t0, device))


def eos_ids(model: torch.nn.Module) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def generation_kwargs(model: torch.nn.Module, opts: RunOptions, n_tokens: int) -> dict[str, Any]:
    """`generate` settings for `n_tokens` more tokens: greedy, or sampling with the run's temperature / top-p."""
    cfg = model.generation_config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else next(iter(eos_ids(model)), 0)
    kw: dict[str, Any] = {"max_new_tokens": n_tokens, "do_sample": opts.do_sample, "pad_token_id": pad}
    if opts.do_sample:
        kw.update(temperature=opts.temperature, top_p=opts.top_p, top_k=0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


# -- 6. trace ------------------------------------------------------------------------------------------------------
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


def _thumbnails(images: Sequence[Any], side: int) -> list[np.ndarray]:
    """Small copies of the prompt's images for the trace; none when disabled (side 0) or when an image is not a PIL
    image (arrays the processor accepts have no agreed layout), so indices always match the views' image_index."""
    if not side or not all(isinstance(im, Image.Image) for im in images):
        return []
    return [make_thumbnail(im, side) for im in images]


def _versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"tgvkv": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def run_timings(pre: Prefill, chosen: Evicted, answer: Decoded, follow: Decoded | None) -> dict[str, float]:
    n_new = len(answer.ids)
    t = {"prefill_s": pre.seconds, "select_s": chosen.seconds, "decode_s": answer.seconds}
    if follow is not None:
        t["followup_s"] = follow.seconds
    t["new_tokens"] = float(n_new)
    t["total_s"] = pre.seconds + chosen.seconds + answer.seconds
    t["tokens_per_s"] = n_new / t["total_s"] if t["total_s"] > 0 else 0.0
    t["decode_tokens_per_s"] = (n_new - 1) / answer.seconds if n_new > 1 and answer.seconds > 0 else 0.0
    return t


def assemble_trace(model: torch.nn.Module, processor: Any, request: Request, prompt: Prompt, pre: Prefill,
                   chosen: Evicted, answer: Decoded, follow: Decoded | None, capture: CaptureOptions,
                   model_name: str = "") -> Trace:
    """The run's one record, built once from the steps' records (after the last step, so sizes are final)."""
    facts = hf_compat.model_facts(model.config)
    pol, stats, sel, layout, tok = request.policy, chosen.stats, chosen.selection, prompt.layout, processor.tokenizer
    log = pre.cache.eviction_log()
    log[:, 0] -= layout.seq_len  # logical length -> decode step (1 = after the first decode forward)
    return Trace(
        model=model_name or getattr(model.config, "_name_or_path", "") or facts.model_type,
        method=pol.name if pol is not None else "full",
        keep_ratio=request.keep_ratio,
        protocol=request.options.protocol,
        question=request.question,
        layout=layout,
        prompt_ids=prompt.ids[0].cpu().numpy().astype(np.int64),
        num_layers=facts.num_layers,
        policy=pol.describe() if pol is not None else {"method": "full"},
        seed=request.options.seed,
        versions=_versions(),
        device=str(prompt.ids.device),
        dtype=str(model.dtype).replace("torch.", ""),
        image_sha256=[pixel_sha256(im) for im in request.images],
        thumbnails=_thumbnails(request.images, capture.thumbnail_side),
        budgets=sel.budgets,
        kept_mask=sel.kept_mask(layout.seq_len),
        scores=sel.scores.astype(np.float32),
        selection_info={k: np.asarray(v) for k, v in sel.info.items()},
        query_positions=stats.query_positions,
        query_rows=stats.rows.astype(np.float32),
        column_sums=stats.column_sums.astype(np.float32) if stats.column_sums is not None else None,
        block_sums=block_sums(stats.rows, stats.query_positions, stats.column_sums, layout),
        attention_maps=pre.recorder.full_maps_array(facts.num_layers),
        hidden_states=pre.hidden_states,
        kv_bytes_full=chosen.kv_bytes_full,
        kv_bytes_kept=chosen.kv_bytes_kept,
        output_ids=answer.ids.astype(np.int64),
        output_text=decoded_text(processor, answer),
        output_tokens=tok.convert_ids_to_tokens(answer.ids.tolist()),
        decode_evictions=log,
        followup_question=request.options.followup if follow is not None else None,
        followup_ids=follow.ids.astype(np.int64) if follow is not None else None,
        followup_text=decoded_text(processor, follow) if follow is not None else None,
        kv_bytes_final=pre.cache.kv_bytes(),
        cache_len_final=np.array(pre.cache.physical_lengths(), dtype=np.int64),
        timings=run_timings(pre, chosen, answer, follow),
    )


def decoded_text(processor: Any, answer: Decoded) -> str:
    return processor.tokenizer.decode(answer.ids.tolist(), skip_special_tokens=True).strip()


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed(t0: float, device: torch.device) -> float:
    sync_device(device)
    return time.perf_counter() - t0
