"""`generate` and `compare`: one request run as the steps of `tgvkv.steps`, the model routed through the capturing
attention only while it runs (`tgvkv.capture.capturing`), so the caller's model is left as it was found.

Protocols ("official" / "strict") and positions: see `tgvkv.steps` and `tgvkv.cache`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from . import hf_compat, steps
from .capture import capturing
from .options import MINIMAL_CAPTURE, CaptureOptions, RunOptions
from .policies import Policy
from .steps import build_layout, check_request
from .trace import Trace

__all__ = ["generate", "compare", "Result", "Comparison", "RunOptions", "CaptureOptions", "build_layout",
           "check_request"]


@dataclass
class Result:
    text: str
    token_ids: np.ndarray  # (G,) generated ids
    trace: Trace
    step_logits: torch.Tensor | None = field(default=None, repr=False)  # (G, V) float32 logits that chose each token
    followup_text: str | None = None
    followup_step_logits: torch.Tensor | None = field(default=None, repr=False)  # (F, V) float32, follow-up turn


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
    request = check_request(processor, images, question, policy, keep_ratio, opts, policy_options, videos or ())
    hf_compat.model_facts(model.config)  # an unsupported model is refused before anything touches it
    with capturing(model):
        prompt = steps.build_prompt(model, processor, request)
        pre = steps.prefill(model, prompt, request.policy, capture, opts)
        chosen = steps.evict(pre, request.policy, prompt.layout, request.keep_ratio)
        decoder = steps.Decoder.after(model, pre, chosen, request.policy, prompt.layout, opts)
        if teacher_tokens is not None:
            answer = steps.teacher_force(decoder, prompt, pre, teacher_tokens)
        else:
            answer = steps.decode(decoder, prompt, pre)
        follow = None
        if opts.followup:
            follow = steps.followup(decoder, processor, request, prompt, answer, steps.decoded_text(processor, answer))
    trace = steps.assemble_trace(model, processor, request, prompt, pre, chosen, answer, follow, capture, model_name)
    return Result(text=trace.output_text, token_ids=trace.output_ids, trace=trace, step_logits=answer.logits,
                  followup_text=trace.followup_text, followup_step_logits=follow.logits if follow else None)


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
    images = check_request(processor, images, question, policy, keep_ratio, opts, policy_options).images  # before any run
    common = dict(options=opts, capture=capture, model_name=model_name)
    with capturing(model):  # one routing for the three runs
        full = generate(model, processor, images, question, None, 1.0, **common)
        evicted = generate(model, processor, images, question, policy, keep_ratio, policy_options=policy_options,
                           **common)
        forced = generate(
            model, processor, images, question, policy, keep_ratio, options=RunOptions(**{**vars(opts), "followup": None}),
            capture=MINIMAL_CAPTURE, policy_options=policy_options, teacher_tokens=full.token_ids.tolist(),
            model_name=model_name,
        )
    p = torch.log_softmax(full.step_logits, dim=-1)
    q = torch.log_softmax(forced.step_logits, dim=-1)
    kl = (p.exp() * (p - q)).sum(-1).clamp_min(0).cpu().numpy()
    a, b = full.token_ids.tolist(), evicted.token_ids.tolist()
    diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
    return Comparison(full=full, evicted=evicted, step_kl=kl, first_divergence=diverge)
