"""The memory-bandwidth bound on decode speed-up from KV eviction.

A decode step reads every weight the step uses once (shared by the whole batch) plus the KV cache of every sequence.
If a step is bandwidth-bound its time is proportional to the bytes read, so keeping a fraction k of the KV gives at
most

    speedup(k) = (W + B * KV) / (W + B * k * KV)

W: weight bytes read per decode step; B: sequences in flight; KV: bytes of K+V per sequence at full KV.
Which weights count (stated in every result): the language model's decoder layers, final norm and LM head. The input
embedding table is excluded when it is not tied to the LM head (a step reads only B rows of it); the vision tower and
projector are excluded (they run once, at prefill).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

KIB = 1024


def speedup_bound(weight_bytes: float, kv_bytes_per_seq: float, batch: int, keep: float) -> float:
    """Best possible decode speed-up at keep ratio `keep` (bytes read per step at full KV / at `keep`)."""
    if weight_bytes < 0 or kv_bytes_per_seq < 0 or batch < 1 or not (0 < keep <= 1):
        raise ValueError("need weight_bytes >= 0, kv_bytes_per_seq >= 0, batch >= 1, 0 < keep <= 1")
    return (weight_bytes + batch * kv_bytes_per_seq) / (weight_bytes + batch * keep * kv_bytes_per_seq)


def bytes_per_token(weight_bytes: float, kv_bytes_per_seq: float, batch: int, keep: float = 1.0) -> float:
    """Bytes read per generated token (one step generates `batch` tokens)."""
    return (weight_bytes + batch * keep * kv_bytes_per_seq) / batch


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K + V bytes one token occupies in the cache of a (non-sliding) decoder."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


@dataclass(frozen=True)
class BoundRow:
    config: str
    weight_bytes: int
    kv_bytes_per_seq: int
    batch: int
    keep: float
    bytes_per_token_full: float
    bytes_per_token_kept: float
    bound: float

    def as_dict(self) -> dict:
        return asdict(self)


def bound_row(config: str, weight_bytes: int, kv_bytes_per_seq: int, batch: int, keep: float) -> BoundRow:
    return BoundRow(
        config=config,
        weight_bytes=int(weight_bytes),
        kv_bytes_per_seq=int(kv_bytes_per_seq),
        batch=batch,
        keep=keep,
        bytes_per_token_full=bytes_per_token(weight_bytes, kv_bytes_per_seq, batch, 1.0),
        bytes_per_token_kept=bytes_per_token(weight_bytes, kv_bytes_per_seq, batch, keep),
        bound=speedup_bound(weight_bytes, kv_bytes_per_seq, batch, keep),
    )


# -- weights read by a decode step -----------------------------------------------------------------------------
def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: language decoder (minus an untied input embedding) + LM head."""
    lm = model.get_decoder()
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    seen: set[int] = set()
    total = 0
    for p in list(lm.parameters()) + (list(head.parameters()) if head is not None else []):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    tied = head is not None and head.weight is emb.weight
    if not tied:
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


# -- the worked example ----------------------------------------------------------------------------------
LLAVA15_7B_LM_PARAMS = 6_738_415_616  # Llama-2-7B / Vicuna-7B: 32 layers, d 4096, MHA 32 heads, vocab 32000
LLAVA15_7B_EMBED_PARAMS = 32_000 * 4096


def llava15_7b_example(prompt_tokens: int = 2048, keep: float = 0.05, batches=(1, 4, 16)) -> list[BoundRow]:
    """LLaVA-1.5-7B fp16: W = LM params read per step (embedding table excluded, untied), 512 KiB of KV per token."""
    w = (LLAVA15_7B_LM_PARAMS - LLAVA15_7B_EMBED_PARAMS) * 2
    kv = prompt_tokens * kv_bytes_per_token(32, 32, 128, 2)
    return [bound_row("llava-1.5-7b fp16 (reference)", w, kv, b, keep) for b in batches]


def max_batch(mem_limit_bytes: float, resident_bytes: float, kv_bytes_per_seq: float) -> int:
    """Largest batch whose caches fit next to the resident weights (activations neglected: decode needs little)."""
    if kv_bytes_per_seq <= 0:
        raise ValueError("kv_bytes_per_seq must be positive")
    return max(0, int((mem_limit_bytes - resident_bytes) // kv_bytes_per_seq))


def param_bytes(model: torch.nn.Module) -> int:
    """All parameter bytes (vision tower included): what stays resident in memory."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
