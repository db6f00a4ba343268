"""Prefill overhead of statistics capture: "tgvkv" + Recorder vs plain "sdpa" vs "eager" with output_attentions.

What is timed: one forward of a random-weight Llama language model (`LlamaForCausalLM`, `logits_to_keep=1`,
`use_cache=True` with a fresh `DynamicCache`, inference mode) over a prompt of T token ids laid out like an
image-dominated VLM prompt: a short text prefix, T - prefix - suffix image positions, a text question suffix. Only the
attention implementation differs between variants:

- "sdpa": transformers' SDPA attention, no statistics;
- "tgvkv": the engine's registered attention function with a Recorder asking exactly what the `tgv-kv` policy
  requests for that layout (head-averaged rows of the text queries after the image + column sums over all queries of
  the text keys), as `tgvkv.generation.generate` does with diagnostics off;
- "tgvkv+diag" (optional): the engine's default diagnostics request on top (rows of every text query and column sums
  over every key: an extra chunked pass over all T x T scores);
- "eager": transformers' eager attention with `output_attentions=True` (every layer's (B, H, T, T) map kept), the way
  the official TGV-KV code obtains its statistics. Skipped when its attention maps would exceed `eager_max_gib`.

Variants run interleaved (the order rotates every repetition) after one warm-up each; the figure is the median of
`reps` repetitions, and ratios are medians of the per-repetition ratios to SDPA (paired, so load drift cancels).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import capture
from ..capture import Recorder, recording
from ..layout import TokenLayout
from ..policies import make_policy
from ..stats import StatRequest, column_positions


@dataclass(frozen=True)
class LMShape:
    """Shape of the random-weight language model (defaults: a Llama with a realistic width, 2 layers)."""

    hidden: int = 1024
    layers: int = 2
    heads: int = 8  # head dim 128, as Llama-2-7B / Vicuna
    kv_heads: int = 8
    intermediate: int = 2752
    vocab: int = 32064

    def config(self, max_positions: int):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=max_positions)


def build_lm(shape: LMShape, max_positions: int, dtype=torch.float32, device="cpu", seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(shape.config(max_positions)).to(dtype).eval()
    return model


def image_dominated_layout(T: int, prefix: int = 5, suffix: int = 40) -> TokenLayout:
    """[prefix text][image tokens][suffix text] of T tokens in total."""
    if T <= prefix + suffix:
        raise ValueError(f"prompt length {T} leaves no image tokens")
    return TokenLayout.from_spans(T, [(prefix, T - suffix)])


def recorder_for(layout: TokenLayout, diagnostics: bool = False, method: str = "tgv-kv") -> Recorder:
    """The Recorder the engine builds for `method` on this layout (diagnostics off unless asked)."""
    req = make_policy(method).request(layout)
    if diagnostics:
        req = req.merge(StatRequest(layout.text_positions.astype(np.int64), "all"))
    return Recorder(query_positions=req.query_positions,
                    column_positions=column_positions(req, layout.text_positions, layout.seq_len))


def _forward(model, ids: torch.Tensor, variant: str, layout: TokenLayout) -> float:
    from transformers import DynamicCache

    impl = {"sdpa": "sdpa", "tgvkv": capture.SDPA_NAME, "tgvkv+diag": capture.SDPA_NAME, "eager": "eager"}[variant]
    capture.register()
    model.set_attn_implementation(impl)
    rec = recorder_for(layout, diagnostics=variant == "tgvkv+diag") if variant.startswith("tgvkv") else None
    kwargs = {"output_attentions": True} if variant == "eager" else {}
    _sync(ids.device)
    t0 = time.perf_counter()
    with torch.inference_mode(), recording(rec):
        out = model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True,
                    logits_to_keep=1, **kwargs)
        if rec is not None:  # what the engine does next: move the statistics to host memory
            rec.prefill_stats(model.config.num_hidden_layers, layout.seq_len)
    _sync(ids.device)
    dt = time.perf_counter() - t0
    del out, rec
    return dt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eager_gib(shape: LMShape, T: int, dtype_bytes: int = 4) -> float:
    """Attention maps eager + output_attentions holds: every layer's (H, T, T) plus ~2 transient copies."""
    return (shape.layers + 2) * shape.heads * T * T * dtype_bytes / 2**30


def run(lengths=(1024, 2048, 4096, 8192), shape: LMShape = LMShape(), reps: int = 5, diagnostics: bool = False,
        eager_max_gib: float = 10.0, device: str = "cpu", dtype=torch.float32, log=print) -> list[dict]:
    """One row per (prompt length, variant): median seconds and paired ratio to SDPA."""
    model = build_lm(shape, max(lengths) + 1, dtype=dtype, device=device)
    variants = ["sdpa", "tgvkv"] + (["tgvkv+diag"] if diagnostics else []) + ["eager"]
    rows = []
    for T in lengths:
        layout = image_dominated_layout(T)
        ids = torch.randint(4, shape.vocab, (1, T), generator=torch.Generator().manual_seed(T)).to(device)
        todo = [v for v in variants if v != "eager" or eager_gib(shape, T, torch.finfo(dtype).bits // 8) <= eager_max_gib]
        for v in todo:  # warm-up
            _forward(model, ids, v, layout)
        times: dict[str, list[float]] = {v: [] for v in todo}
        for r in range(reps):
            order = todo[r % len(todo):] + todo[: r % len(todo)]
            for v in order:
                times[v].append(_forward(model, ids, v, layout))
        base = np.array(times["sdpa"])
        for v in variants:
            if v not in times:
                rows.append(dict(T=T, variant=v, median_s=float("nan"), ratio_to_sdpa=float("nan"), reps=0,
                                 note=f"skipped: attention maps need ~{eager_gib(shape, T):.1f} GiB > {eager_max_gib} GiB"))
                continue
            t = np.array(times[v])
            rows.append(dict(T=T, variant=v, median_s=float(np.median(t)), ratio_to_sdpa=float(np.median(t / base)),
                             reps=reps, note=""))
        log("  T=%d: %s" % (T, ", ".join(f"{r['variant']} {r['median_s']:.3f}s x{r['ratio_to_sdpa']:.3f}"
                                         for r in rows if r["T"] == T)))
    for r in rows:
        r.update(n_query_rows=int(len(recorder_for(image_dominated_layout(r["T"])).query_positions)),
                 hidden=shape.hidden, layers=shape.layers, heads=shape.heads, kv_heads=shape.kv_heads,
                 device=device, dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads())
    return rows
