"""Attention statistics under SDPA, through transformers' attention-function registry (no eager, no patching).

Two attention functions are registered for the language model:
- "tgvkv": the output comes from SDPA (or, when column sums over all queries are needed, from the same fused kernel
  called with its log-sum-exp output); the statistics are recomputed only for the requested query rows / key columns.
- "tgvkv_eager": the reference path for tests: eager softmax(QK^T) attention, statistics sliced from the full map.
Both read what to record from the `Recorder` made active with `recording(...)` (a context variable, so concurrent
requests in different threads never share one). With no active recorder they behave like plain SDPA / eager.
Both also repair the one thing a ragged (per-layer evicted) cache breaks: a mask sized for layer 0.

`capturing(model)` routes a model's language attention through "tgvkv" for the duration of a run and restores the
caller's attention implementation on exit (also on error); the functions are registered on first use, not on import.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.nn.attention import SDPBackend
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .stats import PrefillStats

SDPA_NAME = "tgvkv"
EAGER_NAME = "tgvkv_eager"
_ACTIVE: contextvars.ContextVar["Recorder | None"] = contextvars.ContextVar("tgvkv_recorder", default=None)
_CHUNK = 512  # query rows per chunk when a statistic needs every query


@dataclass
class Recorder:
    """What to record in the next forward(s), and what was recorded (per language layer index).

    prefill: rows of `query_positions` and column sums over all queries at `column_positions` (None = no column
    sums), optional full head-averaged maps. decode (single-token forwards): the new query's row over the cache.
    """

    query_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    column_positions: np.ndarray | None = None
    full_maps: bool = False
    decode: bool = False
    # statistics as the official eager code computes them for a bf16/fp16 model: scores q.k^T in this dtype, each
    # head's probabilities rounded to it, their head mean taken in it (None: float32 throughout)
    stat_dtype: torch.dtype | None = None
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (Q, T) float32
    column_sums: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (len(column_positions),)
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (T, T) float16
    decode_rows: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (S,) float32, newest step
    # batched decoding (tgvkv.batch): layer -> (B, S) bool, which key slots of that layer hold a token of each sample
    # (per-layer padding); applied on top of the model's mask by the "tgvkv" function. Empty: no effect.
    key_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def prefill_stats(self, num_layers: int, seq_len: int) -> PrefillStats:
        missing = [l for l in range(num_layers) if l not in self.rows]
        if missing:
            raise RuntimeError(
                f"no attention statistics were captured for language layers {missing[:5]}: the language model does not "
                f"route attention through the '{SDPA_NAME}' function (see tgvkv.hf_compat.enable_capture)"
            )
        rows = torch.stack([self.rows[l] for l in range(num_layers)]).cpu().numpy()
        colsums = mask = None
        if self.column_positions is not None:
            colsums = np.full((num_layers, seq_len), np.nan, dtype=np.float32)
            colsums[:, self.column_positions] = torch.stack([self.column_sums[l] for l in range(num_layers)]).cpu().numpy()
            mask = np.zeros(seq_len, dtype=bool)
            mask[self.column_positions] = True
        dtype = str(self.stat_dtype).replace("torch.", "") if self.stat_dtype is not None else None
        return PrefillStats(rows=rows, query_positions=self.query_positions, column_sums=colsums, column_mask=mask,
                            dtype=dtype)

    def take_decode_rows(self) -> dict[int, torch.Tensor]:
        """The newest single-token forward's rows (layer -> (S,)), removed from the recorder."""
        rows, self.decode_rows = self.decode_rows, {}
        return rows

    def full_maps_array(self, num_layers: int) -> np.ndarray | None:
        if not self.maps:
            return None
        return torch.stack([self.maps[l] for l in range(num_layers)]).cpu().numpy()


@contextlib.contextmanager
def recording(recorder: Recorder | None) -> Iterator[Recorder | None]:
    """Make `recorder` the active one for forwards run in this thread/context."""
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def active_recorder() -> Recorder | None:
    return _ACTIVE.get()


# -- masks -----------------------------------------------------------------------------------------------------
def _fit_mask(mask: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor | None:
    """A ragged cache layer has a different length than layer 0, for which the mask was built: rebuild it causal.

    Only valid without padding (batch-1 eviction), which is the only case where caches are ragged.
    """
    if mask is None or mask.shape[-1] == kv_len:
        return mask
    offset = kv_len - q_len
    q_pos = torch.arange(q_len, device=mask.device)[:, None] + offset
    allowed = torch.arange(kv_len, device=mask.device)[None, :] <= q_pos  # lower-right aligned causal
    allowed = allowed[None, None]  # (1, 1, q, kv)
    if mask.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device).masked_fill(~allowed, torch.finfo(mask.dtype).min)


def _with_key_mask(mask: torch.Tensor | None, key_mask: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """(B, 1, q, kv) bool: `mask` (or lower-right causal when None) AND the per-sample slot validity `key_mask` (B, kv)."""
    allowed = key_mask[:, None, None, :kv_len]  # (B, 1, 1, kv)
    if q_len > 1 or mask is not None:
        q_idx = torch.arange(q_len, device=key_mask.device)
        allowed = allowed & _allowed(mask, q_idx, q_len, kv_len)
    return allowed


def _allowed(mask: torch.Tensor | None, q_idx: torch.Tensor, q_len: int, kv_len: int,
             cols: torch.Tensor | None = None) -> torch.Tensor:
    """(B|1, 1|H, n, kv) bool: which keys the queries `q_idx` (indices into this forward's queries) may see.

    cols: only these key columns (then the last dimension is len(cols)); avoids building n x kv just to slice it.
    """
    if mask is not None:
        rows = (mask if cols is None else mask[..., cols])[..., q_idx, :]
        return rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2
    offset = kv_len - q_len
    keys = torch.arange(kv_len, device=q_idx.device) if cols is None else cols
    return (keys[None, :] <= (q_idx[:, None] + offset))[None, None]


# -- statistics ------------------------------------------------------------------------------------------------
def _head_mean_probs(module, query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scaling: float,
                    stat_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, n, S) float32 head-averaged softmax(q k^T * scaling) for the given queries, GQA without repeat_kv.

    query: (B, H, n, D); key: (B, H_kv, S, D); allowed: broadcastable to (B, H, n, S).
    stat_dtype: compute as transformers' eager attention does in that dtype (scores in it, float32 softmax, each
    head's probabilities cast to it) and take the head mean in it, as the official code's `.mean(0)` does.
    """
    if stat_dtype is not None:
        n_rep = query.shape[1] // key.shape[1]
        k = repeat_kv(key, n_rep).to(stat_dtype)
        s = torch.matmul(query.to(stat_dtype), k.transpose(2, 3)) * scaling
        s = s.masked_fill(~allowed, float("-inf"))
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(stat_dtype).mean(dim=1).float()
    B, H, n, D = query.shape
    h_kv = key.shape[1]
    q = (query.float() * scaling).view(B, h_kv, H // h_kv, n, D)  # (B, H_kv, G, n, D); scaled here (n x D < n x S)
    s = torch.einsum("bkgnd,bksd->bkgns", q, key.float())  # (B, H_kv, G, n, S)
    s = s.reshape(B, H, n, key.shape[2]).masked_fill(~allowed, float("-inf"))  # n may be 0
    return torch.softmax(s, dim=-1).mean(dim=1)  # (B, n, S)


def _column_sums_with_lse(query, key, lse, columns: torch.Tensor, scaling: float, mask) -> torch.Tensor:
    """(B, |columns|) sum over all queries of head-averaged exp(q.k_j * scaling - lse_q) for key columns j."""
    B, H, T, D = query.shape
    # only the requested columns are gathered (before repeating GQA heads), with the scaling folded into them
    k = repeat_kv(key[:, :, columns], H // key.shape[1]).float() * scaling  # (B, H, C, D)
    out = torch.zeros(B, len(columns), device=query.device)
    for start in range(0, T, _CHUNK):
        q = query[:, :, start : start + _CHUNK].float()  # (B, H, c, D)
        s = torch.einsum("bhcd,bhjd->bhcj", q, k) - lse[:, :, start : start + _CHUNK, None].float()
        q_idx = torch.arange(start, start + q.shape[2], device=query.device)
        allowed = _allowed(mask, q_idx, T, key.shape[2], cols=columns)  # (B|1, 1|H, c, C)
        out += torch.exp(s).masked_fill_(~allowed, 0.0).sum(dim=(1, 2))  # (exp of -inf is a slow path on CPU)
    return out / H  # head mean


def _sdpa_with_lse(query, key, value, scaling: float):
    """Causal attention output (B, T, H, D) plus log-sum-exp (B, H, T) from the kernel SDPA itself dispatches to."""
    n_rep = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, k, v, 0.0, True, scale=scaling)
    elif query.device.type == "cuda":
        # the kernel plain SDPA would pick (flash for fp16/bf16 on recent GPUs), so capture does not change the kernel
        if torch._fused_sdp_choice(query, k, v, None, 0.0, True, scale=scaling) == SDPBackend.FLASH_ATTENTION.value:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, k, v, 0.0, True, False, scale=scaling)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, k, v, None, True, 0.0, True, scale=scaling)[:2]
    else:
        raise RuntimeError(f"column-sum capture is not implemented for device {query.device.type}")
    return out.transpose(1, 2).contiguous(), lse[..., : query.shape[2]]  # efficient attention pads lse to 32 rows


def _record_prefill(rec: Recorder, module, query, key, attention_mask, scaling, lse=None, full=None) -> None:
    """Store rows / column sums / maps of one layer's prefill forward (batch row 0)."""
    layer = module.layer_idx
    T, S = query.shape[2], key.shape[2]
    q_idx = torch.as_tensor(rec.query_positions, device=query.device) - (S - T)
    if full is not None:  # eager reference: slice the full (B, T, S) head-mean map
        rec.rows[layer] = full[0, q_idx].float()
    else:
        allowed = _allowed(attention_mask, q_idx, T, S)
        rec.rows[layer] = _head_mean_probs(module, query[:, :, q_idx], key, allowed, scaling, rec.stat_dtype)[0]
    if rec.column_positions is not None:
        cols = torch.as_tensor(rec.column_positions, device=query.device)
        if full is not None:
            rec.column_sums[layer] = full[0][:, cols].float().sum(dim=0)
        elif rec.stat_dtype is not None:  # sums of the rounded head-mean map, chunked over queries
            total = torch.zeros(len(cols), device=query.device)
            for s in range(0, T, _CHUNK):
                q_rows = torch.arange(s, min(T, s + _CHUNK), device=query.device)
                allowed = _allowed(attention_mask, q_rows, T, S)
                part = _head_mean_probs(module, query[:, :, q_rows], key, allowed, scaling, rec.stat_dtype)
                total += part[0][:, cols].sum(dim=0)
            rec.column_sums[layer] = total
        else:
            if lse is None:
                lse = _lse_chunked(query, key, attention_mask, scaling)
            rec.column_sums[layer] = _column_sums_with_lse(query, key, lse, cols, scaling, attention_mask)[0]
    if rec.full_maps:
        if full is None:
            parts = []
            for s in range(0, T, _CHUNK):
                q_rows = torch.arange(s, min(T, s + _CHUNK), device=query.device)
                allowed = _allowed(attention_mask, q_rows, T, S)
                parts.append(_head_mean_probs(module, query[:, :, q_rows], key, allowed, scaling, rec.stat_dtype))
            full = torch.cat(parts, dim=1)
        rec.maps[layer] = full[0].half()


def _lse_chunked(query, key, mask, scaling) -> torch.Tensor:
    """(B, H, T) log-sum-exp of the masked scores, chunked over queries (used when a padding mask is present)."""
    B, H, T, D = query.shape
    k = repeat_kv(key, H // key.shape[1]).float()
    parts = []
    for start in range(0, T, _CHUNK):
        q = query[:, :, start : start + _CHUNK].float()
        s = torch.einsum("bhcd,bhsd->bhcs", q, k) * scaling
        q_idx = torch.arange(start, start + q.shape[2], device=query.device)
        parts.append(s.masked_fill(~_allowed(mask, q_idx, T, key.shape[2]), float("-inf")).logsumexp(-1))
    return torch.cat(parts, dim=-1)


def _record_decode(rec: Recorder, module, query, key, attention_mask, scaling, full=None) -> None:
    layer = module.layer_idx
    # one query, no padding: it sees every slot, no mask to apply (a model-dtype row goes the general way)
    if full is None and attention_mask is None and rec.stat_dtype is None:
        B, H, _, D = query.shape
        h_kv = key.shape[1]
        q = (query[:1].float() * scaling).view(1, h_kv, H // h_kv, D)  # (1, H_kv, G, D)
        s = torch.matmul(q, key[:1].float().transpose(-1, -2))  # (1, H_kv, G, S)
        rec.decode_rows[layer] = torch.softmax(s, dim=-1).mean(dim=(1, 2))[0]
        return
    if full is None:
        q_idx = torch.zeros(1, dtype=torch.long, device=query.device)
        allowed = _allowed(attention_mask, q_idx, 1, key.shape[2])
        full = _head_mean_probs(module, query, key, allowed, scaling, rec.stat_dtype)
    rec.decode_rows[layer] = full[0, -1].float()


# -- the registered attention functions ---------------------------------------------------------------------------
def tgvkv_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA output; records the statistics the active Recorder asks for. query (B, H, q, D), key (B, H_kv, S, D)."""
    rec = _ACTIVE.get()
    q_len, kv_len = query.shape[2], key.shape[2]
    attention_mask = _fit_mask(attention_mask, q_len, kv_len)
    if rec is not None and rec.key_masks and module.layer_idx in rec.key_masks:
        attention_mask = _with_key_mask(attention_mask, rec.key_masks[module.layer_idx], q_len, kv_len)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    prefill = rec is not None and q_len > 1 and q_len == kv_len
    fused = rec is not None and rec.column_positions is not None and rec.stat_dtype is None
    if prefill and fused and attention_mask is None and not module.training:
        out, lse = _sdpa_with_lse(query, key, value, scaling)
        _record_prefill(rec, module, query, key, attention_mask, scaling, lse=lse)
        return out, None
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    if prefill:
        _record_prefill(rec, module, query, key, attention_mask, scaling)
    elif rec is not None and rec.decode and q_len == 1:
        _record_decode(rec, module, query, key, attention_mask, scaling)
    return out, None


def tgvkv_eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Reference: eager softmax attention; statistics are slices of the full head-averaged probability map."""
    rec = _ACTIVE.get()
    q_len, kv_len = query.shape[2], key.shape[2]
    attention_mask = _fit_mask(attention_mask, q_len, kv_len)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    n_rep = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling  # (B, H, q, S)
    q_idx = torch.arange(q_len, device=query.device)
    scores = scores.masked_fill(~_allowed(attention_mask, q_idx, q_len, kv_len), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    out = torch.matmul(probs.to(value.dtype), v).transpose(1, 2).contiguous()
    if rec is not None:
        # (B, q, S) head mean; in the model dtype as the official code takes it when asked
        full = probs.mean(dim=1) if rec.stat_dtype is None else probs.to(rec.stat_dtype).mean(dim=1).float()
        if q_len > 1 and q_len == kv_len:
            _record_prefill(rec, module, query, key, attention_mask, scaling, full=full)
        elif rec.decode and q_len == 1:
            _record_decode(rec, module, query, key, attention_mask, scaling, full=full)
    return out, probs if kwargs.get("output_attentions") else None


def register() -> None:
    """Register both functions (and their mask builders: without those, transformers builds no mask at all).

    Idempotent. Registering adds two names to transformers' registries; it changes no model by itself."""
    AttentionInterface.register(SDPA_NAME, tgvkv_sdpa_attention)
    AttentionMaskInterface.register(SDPA_NAME, sdpa_mask)
    AttentionInterface.register(EAGER_NAME, tgvkv_eager_attention)
    AttentionMaskInterface.register(EAGER_NAME, eager_mask)


# -- routing a model through the capturing functions, for one run -------------------------------------------------
CAPTURE_NAMES = (SDPA_NAME, EAGER_NAME)


@dataclass
class _Routing:
    previous: str | None  # the language model's attention implementation before the first run entered
    runs: int = 0  # runs inside `capturing` right now (concurrent requests share one model in the app)


_ROUTING_LOCK = threading.Lock()
_ROUTINGS: "weakref.WeakKeyDictionary[torch.nn.Module, _Routing]" = weakref.WeakKeyDictionary()


def language_attention(model: torch.nn.Module) -> str | None:
    """The attention implementation the language model uses now ("sdpa", "eager", "tgvkv", ...)."""
    return model.config.get_text_config(decoder=True)._attn_implementation


def route(model: torch.nn.Module, name: str | None) -> None:
    """Set the language model's attention implementation (the vision tower is left alone)."""
    model.set_attn_implementation({"text_config": name})


@contextlib.contextmanager
def capturing(model: torch.nn.Module, eager_reference: bool = False) -> Iterator[torch.nn.Module]:
    """Route `model`'s language attention through the capturing function while inside; restore it on exit.

    Output is unchanged (SDPA, or eager for `eager_reference`); statistics are recorded only inside `recording`.
    Re-entrant and thread-safe: concurrent runs on one model share the routing, and the last one out restores the
    caller's implementation, also when a run raises. A model the caller routed for good (`tgvkv.hf_compat.
    enable_capture`) is left as it is.
    """
    register()
    with _ROUTING_LOCK:
        routing = _ROUTINGS.get(model)
        if routing is None and language_attention(model) not in CAPTURE_NAMES:
            previous = language_attention(model)
            route(model, EAGER_NAME if eager_reference else SDPA_NAME)
            routing = _ROUTINGS[model] = _Routing(previous)
        if routing is not None:
            routing.runs += 1
    try:
        yield model
    finally:
        if routing is not None:
            with _ROUTING_LOCK:
                routing.runs -= 1
                if routing.runs == 0:
                    del _ROUTINGS[model]
                    route(model, routing.previous)
