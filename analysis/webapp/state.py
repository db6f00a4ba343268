"""One comparison, full KV vs an evicted cache, as the per-session ``RunState`` the views and exports read.

``run_comparison`` checks its inputs (``inputs``), runs ``tgvkv.compare`` on the shared cached model under its lock,
and keeps numpy traces plus the input image: small and deep-copyable, so it can live in ``gr.State``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from tgvkv import CaptureOptions, RunOptions, compare
from tgvkv.trace import Trace

from . import models
from .inputs import check_image, check_keep_percent, check_max_new_tokens, check_method, check_question

SEED = 0
PROTOCOL = "official"
#: what a session's trace may hold: full maps up to 768 tokens, hidden states up to 16 MB (a few layers of a 7B model)
CAPTURE = CaptureOptions(max_map_tokens=768, max_hidden_bytes=16 * 2**20)


# -- GPU scheduling on Hugging Face ZeroGPU (a no-op elsewhere) ------------------------------------------------
def on_gpu(duration: int) -> Callable[[Callable], Callable]:
    try:
        import spaces  # type: ignore[import-not-found]  # present on Hugging Face Spaces only
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


# -- per-session state ----------------------------------------------------------------------------------------------
@dataclass
class RunState:
    """Everything one comparison produced; small (numpy traces), deep-copyable, kept per session in gr.State."""

    model: str
    source: str
    device: str
    dtype: str
    method: str
    keep_ratio: float
    max_new_tokens: int
    question: str
    image: Image.Image
    full: Trace
    evicted: Trace
    step_kl: np.ndarray  # (G_full,) KL(full || evicted) per full-answer step, full answer teacher-forced
    first_divergence: int | None
    full_pieces: list[str] = field(default_factory=list)  # display text of each generated token
    evicted_pieces: list[str] = field(default_factory=list)
    seed: int = SEED
    protocol: str = PROTOCOL
    wall_s: float = 0.0
    created: float = field(default_factory=time.time)

    @property
    def num_layers(self) -> int:
        return self.evicted.num_layers

    def default_layer(self) -> int:
        """The evicted layer with the largest budget (ties: the deepest): where the method keeps most."""
        return self.evicted.largest_evicted_layer()


# -- core: one comparison ------------------------------------------------------------------------------------------
def _answer_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Display text of each generated token (prefix-difference decoding keeps the spaces right)."""
    pieces, prev = [], ""
    ids = [int(i) for i in ids]
    for i in range(len(ids)):
        cur = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        pieces.append(cur[len(prev):] if cur.startswith(prev) else tokenizer.decode([ids[i]], skip_special_tokens=True))
        prev = cur
    return pieces


@on_gpu(duration=120)
def _compare_locked(loaded: models.LoadedModel, image: Image.Image, question: str, method: str, keep_ratio: float,
                    max_new_tokens: int, seed: int) -> Any:
    with loaded.lock:
        torch.manual_seed(seed)
        return compare(
            loaded.model, loaded.processor, [image], question, method, keep_ratio, max_new_tokens,
            options=RunOptions(max_new_tokens=max_new_tokens, protocol=PROTOCOL, seed=seed),
            capture=CAPTURE, model_name=loaded.name,
        )


def run_comparison(image: Any, question: Any, model_name: str, method: str, keep_percent: Any, max_new_tokens: Any,
                   policy: models.ModelPolicy = models.ModelPolicy(), progress: Callable[[float, str], None] | None = None
                   ) -> RunState:
    """Full KV vs `method` at `keep_percent` % on one image + question. Raises ValueError on any bad input."""
    report = progress or (lambda f, d: None)
    img = check_image(image)
    method = check_method(method)
    keep = check_keep_percent(keep_percent)
    n_new = check_max_new_tokens(max_new_tokens)
    check_question(question)
    report(0.05, "loading the model (first use only)")
    loaded = models.get_model(model_name, policy)
    q = check_question(question, loaded.processor)
    report(0.25, f"generating: full KV, {method} at {keep:.0%}, and the teacher-forced divergence")
    t0 = time.perf_counter()
    cmp = _compare_locked(loaded, img, q, method, keep, n_new, SEED)
    wall = time.perf_counter() - t0
    tok = loaded.processor.tokenizer
    return RunState(
        model=loaded.name, source=loaded.source, device=loaded.device, dtype=loaded.dtype, method=method,
        keep_ratio=keep, max_new_tokens=n_new, question=q, image=img, full=cmp.full.trace, evicted=cmp.evicted.trace,
        step_kl=np.asarray(cmp.step_kl, dtype=np.float64), first_divergence=cmp.first_divergence,
        full_pieces=_answer_pieces(tok, cmp.full.token_ids), evicted_pieces=_answer_pieces(tok, cmp.evicted.token_ids),
        wall_s=wall,
    )



__all__ = ["RunState", "run_comparison", "on_gpu", "SEED", "PROTOCOL", "CAPTURE"]
