"""Batched generation with per-sample, per-layer KV eviction (several prompts decoded together).

Design: per-layer padding with a validity mask (not per-sample caches).
- Prefill runs per sample (batch 1) exactly as `tgvkv.generation.generate` does: same capture, same statistics, same
  policy selection, so every sample's kept set equals its batch-1 kept set. Prefill is compute-bound, so batching
  it buys little; what batching is for is decode, where one step reads the weights once for all sequences.
- The evicted per-sample caches are then packed into one cache whose layer l holds (B, H_kv, S_l + G, D) with
  S_l = max_b kept[b][l] (each layer padded to the batch maximum *for that layer*, so TGV-KV's uneven per-layer
  budgets keep their memory saving) plus a (B, S_l + G) validity mask. Buffers are preallocated for the G new
  tokens, so a decode step writes one slot per layer instead of re-concatenating the whole cache (`DynamicLayer`).
- The mask reaches attention through the active `Recorder.key_masks` (the "tgvkv" attention function applies it,
  keyed by `module.layer_idx`); positions are explicit per sample (original prompt length + step), never derived
  from the cache. One decode forward per step for the whole batch; no host sync inside a forward.
Why not per-sample caches: B separate caches mean B forwards per step (weights read B times), which is exactly the
cost batching removes. Padding wastes at most (max - mean) kept slots per layer; `BatchResult` reports it.
Decode-time eviction (TGV-KV's one-slot-per-step rule) is not applied in batched decoding: selection is prefill-only
(the policy's decode rule is ignored; compare with batch-1 runs using `policy_options={"decode": False}`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers.cache_utils import Cache, CacheLayerMixin

from . import hf_compat, steps
from .cache import EvictingCache
from .capture import Recorder, capturing, recording
from .options import MINIMAL_CAPTURE, RunOptions
from .policies import Policy, make_policy
from .steps import Request, check_request, eos_ids


@dataclass
class BatchItem:
    images: Sequence[Image.Image]
    question: str


@dataclass
class BatchResult:
    token_ids: list[np.ndarray]  # per sample, generated ids (trimmed after the first EOS unless ignore_eos)
    texts: list[str]
    prompt_lengths: np.ndarray  # (B,)
    kept: list[list[np.ndarray]]  # [b][l] kept prompt positions after prefill eviction
    budgets: np.ndarray  # (B, L) kept prompt tokens per sample and layer
    padded_lengths: np.ndarray  # (L,) S_l = max_b budgets[b, l]
    kv_bytes_full: int  # sum over samples of the full prefill KV (measured from the per-sample cache tensors)
    kv_bytes_kept: int  # sum over samples of the evicted KV before packing (measured)
    kv_bytes_batch: int  # storage of the packed batch cache incl. padding and room for the new tokens (measured)
    kv_bytes_batch_prompt: int  # the prompt part of the packed cache (padding included, new-token room excluded)
    timings: dict[str, float] = field(default_factory=dict)
    step_logits: torch.Tensor | None = field(default=None, repr=False)  # (B, G, V) float32, if asked

    @property
    def padding_fraction(self) -> float:
        """Share of the packed prompt slots that are padding."""
        B = self.budgets.shape[0]
        return float(1.0 - self.budgets.sum() / (B * self.padded_lengths.sum()))


# -- the packed cache --------------------------------------------------------------------------------------------
class PaddedLayer(CacheLayerMixin):
    """One layer: preallocated (B, H_kv, capacity, D) keys/values, `length` slots in use, (B, capacity) validity."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, length: int):
        super().__init__()
        self.kbuf, self.vbuf, self.valid_buf = keys, values, valid
        self.length = length
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self.kbuf[:, :, : self.length]
        self.values = self.vbuf[:, :, : self.length]
        self.valid = self.valid_buf[:, : self.length]

    def lazy_initialization(self, key_states, value_states) -> None:  # built initialised
        raise RuntimeError("PaddedLayer is created from packed tensors")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, q = self.length, key_states.shape[-2]
        if n + q > self.kbuf.shape[-2]:
            raise RuntimeError(f"batch cache full: capacity {self.kbuf.shape[-2]}, need {n + q}")
        self.kbuf[:, :, n : n + q] = key_states
        self.vbuf[:, :, n : n + q] = value_states
        self.valid_buf[:, n : n + q] = True
        self.length = n + q
        self._views()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return int(self.kbuf.shape[-2])


class BatchCache(Cache):
    """Packed, per-layer padded cache; publishes each layer's validity mask to `key_masks` as it grows."""

    def __init__(self, layers: list[PaddedLayer], key_masks: dict[int, torch.Tensor]):
        super().__init__(layers=layers)
        self.key_masks = key_masks
        for l, layer in enumerate(layers):
            key_masks[l] = layer.valid

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = self.layers[layer_idx].update(key_states, value_states)
        self.key_masks[layer_idx] = self.layers[layer_idx].valid
        return keys, values

    def kv_bytes(self) -> np.ndarray:
        """(L,) bytes of K+V storage per layer (the preallocated buffers, measured from their allocations)."""
        return np.array([l.kbuf.untyped_storage().nbytes() + l.vbuf.untyped_storage().nbytes() for l in self.layers])


def pack_caches(caches: Sequence[EvictingCache], extra: int) -> tuple[list[PaddedLayer], np.ndarray, int]:
    """Pack evicted batch-1 caches into per-layer padded layers with room for `extra` new tokens.

    Consumes the caches: each layer's per-sample tensors are released once copied, so the peak is about one copy of
    the batch's KV plus one layer. Returns (layers, S_l per layer, bytes of the prompt part incl. padding).
    """
    B, L = len(caches), len(caches[0].layers)
    layers, lengths, prompt_bytes = [], np.zeros(L, dtype=np.int64), 0
    for l in range(L):
        ks = [c.layers[l].keys for c in caches]  # (1, H_kv, n_b, D)
        vs = [c.layers[l].values for c in caches]
        n = [k.shape[-2] for k in ks]
        S = max(n)
        _, H, _, D = ks[0].shape
        kbuf = ks[0].new_zeros((B, H, S + extra, D))
        vbuf = vs[0].new_zeros((B, H, S + extra, D))
        valid = torch.zeros((B, S + extra), dtype=torch.bool, device=kbuf.device)
        for b in range(B):
            kbuf[b, :, : n[b]] = ks[b][0]
            vbuf[b, :, : n[b]] = vs[b][0]
            valid[b, : n[b]] = True
        del ks, vs
        for c in caches:
            c.layers[l].keys = c.layers[l].values = None
        layers.append(PaddedLayer(kbuf, vbuf, valid, S))
        lengths[l] = S
        prompt_bytes += 2 * B * H * S * D * kbuf.element_size()
    return layers, lengths, prompt_bytes


# -- generation ----------------------------------------------------------------------------------------------------
PREFILL_OPTIONS = RunOptions(max_new_tokens=1)  # greedy; the steps' prefill picks token 1, decoding is batched here


@dataclass
class SamplePrefill:
    """One sample after its batch-1 prefill and eviction (the same steps `tgvkv.generate` runs, diagnostics off)."""

    cache: EvictingCache
    first_logits: torch.Tensor  # (1, V)
    start: int  # position of its first generated token
    prompt_length: int
    kept: list[np.ndarray]  # [l] kept prompt positions
    kv_bytes_full: int


def prefill_sample(model: torch.nn.Module, processor: Any, request: Request) -> SamplePrefill:
    prompt = steps.build_prompt(model, processor, request)
    pre = steps.prefill(model, prompt, request.policy, MINIMAL_CAPTURE, request.options)
    if not pre.cache.evictable_layers().all():
        raise ValueError("batched decoding supports full-attention language models only (this one has sliding-window "
                         "layers); use tgvkv.generate per sample")
    chosen = steps.evict(pre, request.policy, prompt.layout, request.keep_ratio)
    T = prompt.layout.seq_len
    return SamplePrefill(pre.cache, pre.first_logits, _next_position(model, T), T, list(chosen.selection.kept),
                         int(chosen.kv_bytes_full.sum()))


def _next_position(model, T: int) -> int:
    """Position of the first generated token: T, or T + rope_deltas for M-RoPE models (Qwen-VL), read after prefill."""
    deltas = getattr(getattr(model, "model", None), "rope_deltas", None)
    return T + int(deltas.flatten()[0]) if isinstance(deltas, torch.Tensor) else T


def generate_batch(
    model: torch.nn.Module,
    processor: Any,
    items: Sequence[BatchItem],
    policy: str | Policy | None = "tgv-kv",
    keep_ratio: float = 0.05,
    max_new_tokens: int = 32,
    *,
    policy_options: dict[str, Any] | None = None,
    ignore_eos: bool = False,
    return_logits: bool = False,
) -> BatchResult:
    """Greedy answers for several (images, question) items, each sample's KV evicted by `policy` at prefill.

    policy None: full KV. Official protocol: each sample's first token comes from its full-cache prefill logits.
    ignore_eos: always generate `max_new_tokens` tokens (throughput runs).
    """
    if not items:
        raise ValueError("no items to generate for")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    pol = make_policy(policy, **(policy_options or {})) if policy is not None else None
    requests = [check_request(processor, it.images, it.question, pol, keep_ratio, PREFILL_OPTIONS) for it in items]
    hf_compat.model_facts(model.config)
    device = hf_compat.language_device(model)
    with capturing(model):
        return _generate_batch(model, processor, requests, max_new_tokens, ignore_eos, return_logits, device)


def _generate_batch(model, processor, requests: list[Request], max_new_tokens: int, ignore_eos: bool,
                    return_logits: bool, device: torch.device) -> BatchResult:
    timings: dict[str, float] = {}
    steps.sync_device(device)
    t0 = time.perf_counter()
    samples = [prefill_sample(model, processor, r) for r in requests]
    timings["prefill_s"] = steps.elapsed(t0, device)
    kept_bytes = int(sum(int(p.cache.kv_bytes().sum()) for p in samples))

    t1 = time.perf_counter()
    key_masks: dict[int, torch.Tensor] = {}
    layers, padded, prompt_bytes = pack_caches([p.cache for p in samples], max_new_tokens)
    cache = BatchCache(layers, key_masks)
    batch_bytes = int(cache.kv_bytes().sum())
    timings["pack_s"] = steps.elapsed(t1, device)

    first_logits = torch.cat([p.first_logits for p in samples])
    starts = torch.as_tensor([p.start for p in samples], device=device)
    eos = eos_ids(model)
    ids, logits = _greedy(model, cache, first_logits, starts, max_new_tokens, key_masks, return_logits,
                          None if ignore_eos else eos, timings)
    token_ids = [_trim(row, eos, ignore_eos) for row in ids]
    tok = processor.tokenizer
    B, G = len(requests), ids.shape[1]
    timings["new_tokens"] = float(sum(len(t) for t in token_ids))
    timings["decode_tokens_per_s"] = B * (G - 1) / timings["decode_s"] if G > 1 and timings["decode_s"] > 0 else 0.0
    timings["total_s"] = timings["prefill_s"] + timings["pack_s"] + timings["decode_s"]
    return BatchResult(
        token_ids=token_ids,
        texts=[tok.decode(t.tolist(), skip_special_tokens=True).strip() for t in token_ids],
        prompt_lengths=np.asarray([p.prompt_length for p in samples], dtype=np.int64),
        kept=[p.kept for p in samples],
        budgets=np.array([[len(k) for k in p.kept] for p in samples], dtype=np.int64),
        padded_lengths=padded,
        kv_bytes_full=int(sum(p.kv_bytes_full for p in samples)),
        kv_bytes_kept=kept_bytes,
        kv_bytes_batch=batch_bytes,
        kv_bytes_batch_prompt=int(prompt_bytes),
        timings=timings,
        step_logits=logits,
    )


def _greedy(model, cache: BatchCache, first_logits, starts, max_new_tokens, key_masks, return_logits, eos, timings):
    """(B, G) greedy ids; one forward per step for the whole batch, explicit per-sample positions.

    starts: (B,) position of each sample's first generated token (its prompt length, + rope_deltas for M-RoPE).
    """
    device = first_logits.device
    nxt = first_logits.argmax(-1)  # (B,)
    out_ids = torch.empty((len(starts), max_new_tokens), dtype=torch.long, device=device)
    out_ids[:, 0] = nxt
    step_logits = [first_logits.float()] if return_logits else None
    eos_t = torch.as_tensor(sorted(eos), device=device) if eos else None
    done = torch.isin(nxt, eos_t) if eos_t is not None else None
    rec = Recorder(key_masks=key_masks)
    steps.sync_device(device)
    t0 = time.perf_counter()
    g = 1
    with torch.inference_mode(), recording(rec):
        while g < max_new_tokens:
            if done is not None and bool(done.all()):  # one host sync per step, only when EOS can stop the batch
                break
            pos = (starts + (g - 1))[:, None]  # fed token g-1 sits at start_b + g - 1
            out = model(input_ids=nxt[:, None], position_ids=pos, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            last = out.logits[:, -1]
            nxt = last.argmax(-1)
            out_ids[:, g] = nxt
            if return_logits:
                step_logits.append(last.float())
            if done is not None:
                done |= torch.isin(nxt, eos_t)
            g += 1
    timings["decode_s"] = steps.elapsed(t0, device)
    timings["decode_steps"] = float(g - 1)
    logits = torch.stack(step_logits, dim=1) if return_logits else None
    return out_ids[:, :g].cpu().numpy(), logits


def _trim(row: np.ndarray, eos: set[int], ignore_eos: bool) -> np.ndarray:
    """Generated ids up to and including the first EOS (as batch-1 `generate` returns them)."""
    if not ignore_eos and eos:
        hit = np.flatnonzero(np.isin(row, list(eos)))
        if len(hit):
            return row[: hit[0] + 1].astype(np.int64)
    return row.astype(np.int64)
