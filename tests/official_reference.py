"""An independent re-implementation of the official TGV-KV rule (Danielement321/TGV-KV, kv_caches/tgv_kv.py at
228ce29) for checking our engine: written from the official code, not from tgvkv.policies, in the official number
types (torch float32 attention statistics, float32 ratios in numpy, decode arithmetic as numpy does it).

Also a recording wrapper that makes the engine log every decode decision with its inputs, so each decision can be
re-decided here. Used by tests/test_official_decode.py and scripts/official_decode_check.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from tgvkv.policies.base import DecodeRule, Selection
from tgvkv.policies.tgv_kv import TGVKV

START_SIZE, PROTECT_SIZE = 4, 1


def official_ratios(attentions: list[torch.Tensor], image_start: int, n_image: int, keep_ratio: float,
                    layers: list[int] | None = None) -> np.ndarray:
    """(L,) float32 layer ratios as the official `_prefill`: head-mean attention per layer (already averaged here),
    text->image mass, normalised, ratio = (T - L * T * (1 - PRUNE_RATIO) * r) / T in the attention dtype, stored as
    float32.

    attentions: per language layer, the head-averaged (T, T) eager attention in float32. layers: the evictable layers
    (the official code evicts every layer; hybrid models evict only the full-attention ones, so L counts those)."""
    prune = 1.0 - keep_ratio  # the official PRUNE_RATIO
    all_attns = torch.stack([attentions[i] for i in (layers if layers is not None else range(len(attentions)))])
    text_start = image_start + n_image
    seq_len = all_attns.shape[-1]
    text_image = all_attns[:, text_start:, image_start:text_start]
    mass = text_image.reshape(text_image.size(0), -1).sum(dim=1)
    normalized = mass / mass.sum()
    layer_ratio = (seq_len - (len(normalized) * seq_len * (1 - prune) * normalized)) / seq_len
    return layer_ratio.float().cpu().numpy()


def official_protected(kept: list[np.ndarray], text_start: int) -> list[int]:
    """initial_text_len_list: kept positions >= text_start, at least PROTECT_SIZE."""
    return [max(int((np.asarray(k) >= text_start).sum()), PROTECT_SIZE) for k in kept]


def official_decode_victim(ratios: np.ndarray, layer: int, attn_row: torch.Tensor, cache_len: int, num_of_token: int,
                           protected: int) -> int | None:
    """The official `_decode` for one layer: None (nothing evicted) or the evicted cache index."""
    seq_lens = np.array([cache_len])
    forget_nums = (seq_lens - num_of_token * (1 - ratios[layer : layer + 1])).astype(np.int32)
    forget_nums[forget_nums < 0] = 0
    if forget_nums[0] == 0:
        return None
    evict_start, evict_end = START_SIZE, cache_len - protected
    if evict_start >= evict_end:
        return None
    return int(attn_row[evict_start:evict_end].argmin().item()) + evict_start


@dataclass
class Decision:
    layer: int  # index among the evictable layers (the policy's own layer index)
    attn_row: torch.Tensor
    cache_len: int
    logical_len: int
    victim: int | None


@dataclass
class RecordingRule(DecodeRule):
    """Passes every call to `inner` and records it."""

    inner: DecodeRule
    calls: list[Decision] = field(default_factory=list)

    def victim(self, layer, attn_row, cache_len, logical_len):
        v = self.inner.victim(layer, attn_row, cache_len, logical_len)
        self.calls.append(Decision(layer, attn_row.detach().float().cpu().clone(), cache_len, logical_len,
                                   None if v is None else int(v)))
        return v

    def evicted(self, layer, slot):
        self.inner.evicted(layer, slot)


@dataclass
class RecordingTGVKV(TGVKV):
    """tgv-kv whose decode rule records its decisions (`rule.calls`) and whose selection is kept (`selection`)."""

    name: ClassVar[str] = "tgv-kv"
    rule: Any = field(default=None, repr=False, compare=False)
    selection: Selection | None = field(default=None, repr=False, compare=False)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "sinks": self.sinks, "text_offset": self.text_offset, "decode": self.decode}

    def decode_rule(self, selection, layout):
        self.selection = selection
        inner = super().decode_rule(selection, layout)
        self.rule = None if inner is None else RecordingRule(inner)
        return self.rule


def float64_forget(cache_len: int, logical_len: int, ratio: float) -> int:
    """What our rule computed before it followed the official number types: float64 ratio, float64 arithmetic."""
    return max(0, int(cache_len - logical_len * (1.0 - float(ratio))))


@dataclass
class DecodeCheck:
    """Outcome of one run: every decode decision of the engine re-decided by the official rule."""

    decisions: int  # decode-rule calls (layer x step)
    equal: int  # calls where the official rule names the same victim (or none)
    evictions: int  # calls that evicted
    ratios_equal: bool  # engine's float32 layer ratios == the official float32 ratios
    float64_differs: int  # calls where the all-float64 forget count would have decided otherwise


def head_mean_eager_attention(model, inputs: dict) -> list[torch.Tensor]:
    """Per language layer, the (T, T) float32 eager attention averaged over heads (official `x.squeeze(0).mean(0)`)."""
    from tiny_models import attn

    with attn(model, "eager"), torch.inference_mode():
        out = model(**inputs, output_attentions=True)
    return [a[0].float().mean(0) for a in out.attentions]


def check_decode(model, proc, images, question: str, keep: float, max_new_tokens: int = 24) -> DecodeCheck:
    """Run tgv-kv (official protocol) and re-decide every decode decision with the official rule computed here."""
    from tgvkv import hf_compat
    from tgvkv.generation import CaptureOptions, RunOptions, generate

    pol = RecordingTGVKV()
    res = generate(model, proc, images, question, pol, keep, options=RunOptions(max_new_tokens=max_new_tokens),
                   capture=CaptureOptions(diagnostics=False, hidden_states=False))
    prompt = hf_compat.render_prompt(proc, question, len(images))
    inputs = hf_compat.process_inputs(proc, images, prompt, torch.device("cpu"), torch.float32)
    ids = inputs["input_ids"][0].numpy()
    vision = np.isin(ids, hf_compat.model_facts(model.config).vision_token_ids)
    image_start, n_image = int(np.flatnonzero(vision)[0]), int(vision.sum())
    evictable = res.trace.selection_info.get("evictable_layers")
    layers = None if evictable is None else [int(i) for i in np.flatnonzero(evictable)]
    ratios = official_ratios(head_mean_eager_attention(model, inputs), image_start, n_image, keep, layers)
    sel = pol.selection
    if sel is None or pol.rule is None:  # nothing pruned: no decode rule
        return DecodeCheck(0, 0, 0, True, 0)
    protected = official_protected(sel.kept, image_start + n_image)
    mass = sel.info["tvb_mass"]
    ratio64 = 1.0 - len(mass) * keep * mass / mass.sum()
    equal = evictions = differs = 0
    for c in pol.rule.calls:
        want = official_decode_victim(ratios, c.layer, c.attn_row, c.cache_len, c.logical_len, protected[c.layer])
        equal += want == c.victim
        evictions += c.victim is not None
        in_range = c.cache_len - protected[c.layer] > START_SIZE
        old = float64_forget(c.cache_len, c.logical_len, ratio64[c.layer]) > 0 and ratio64[c.layer] > 0
        differs += in_range and old != (want is not None)
    return DecodeCheck(len(pol.rule.calls), equal, evictions, bool(np.array_equal(ratios, sel.info["layer_ratio"])),
                       differs)


def official_prefill(attentions: list[torch.Tensor], image_start: int, n_image: int, keep_ratio: float
                     ) -> tuple[np.ndarray, list[np.ndarray], torch.Tensor]:
    """The official `_prefill`, its expressions copied, in the attentions' dtype (torch does the rounding).

    attentions: per layer the eager attention probabilities (1, H, T, T) in the model dtype, as `output_attentions`
    returns them. Returns (forget counts, kept positions per layer, score_sum (L, 1, T)). Ties in the ranking are
    broken stably (lower position evicted first), as ours; the official `torch.argsort` does not promise an order."""
    prune = 1.0 - keep_ratio
    seq_len = attentions[0].shape[-1]
    seq_lens = np.array([seq_len] * len(attentions))
    text_start = image_start + n_image
    all_attns = torch.stack([x.squeeze(0).mean(0) for x in attentions])
    text_image_attns = all_attns[:, text_start:, image_start:text_start]
    text_text_attns = all_attns[:, text_start:, text_start:]
    text_text_score = text_text_attns.sum(1, keepdim=True)
    b = torch.arange(1, text_text_score.shape[-1] + 1).flip([0]).unsqueeze(0).unsqueeze(0)
    text_text_score = text_text_score / b
    text_image_score = (text_image_attns * text_text_score.transpose(-1, -2)).sum(1, keepdim=True)
    pre_score = all_attns[..., :image_start].sum(1, keepdim=True) + 100
    post_score = all_attns[..., image_start + n_image :].sum(1, keepdim=True) + 100
    score_sum = torch.cat([pre_score, text_image_score, post_score], dim=2)
    text_image_attn_sum = text_image_attns.reshape(text_image_attns.size(0), -1).sum(dim=1)
    normalized_layer_ratio = text_image_attn_sum / text_image_attn_sum.sum()
    layer_ratio = (seq_len - (len(normalized_layer_ratio) * seq_len * (1 - prune) * normalized_layer_ratio)) / seq_len
    ratios = layer_ratio.float().cpu().numpy()
    forget_nums = (ratios * seq_lens).round().astype(np.int32)
    forget_nums[forget_nums < 0] = 0
    kept = []
    for idx in range(len(attentions)):
        order = torch.argsort(score_sum[idx, :, START_SIZE : seq_len - PROTECT_SIZE], stable=True)
        selected = order[:, forget_nums[idx]:] + START_SIZE
        kept.append(np.concatenate([np.arange(START_SIZE), np.sort(selected[0].numpy()), [seq_len - PROTECT_SIZE]]))
    return forget_nums, kept, score_sum
