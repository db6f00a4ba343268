"""Two eviction methods on the same input (the Compare methods tab): overlays and Jaccard of the kept sets per layer,
budgets, and a table of answers, KV bytes and times.
"""
from __future__ import annotations

import html
from typing import Any, Sequence

import plotly.graph_objects as go
import torch
from PIL import Image

from tgvkv import CaptureOptions, RunOptions, generate
from tgvkv.trace import Trace

from . import models
from .display import empty_figure, fmt_bytes
from .inputs import check_image, check_keep_percent, check_layer, check_max_new_tokens, check_method, check_question
from .state import PROTOCOL, SEED, on_gpu


@on_gpu(duration=120)
def _generate_locked(loaded: models.LoadedModel, image: Image.Image, question: str, methods: Sequence[str],
                     keep_ratio: float, max_new_tokens: int, seed: int) -> list[Any]:
    opts = RunOptions(max_new_tokens=max_new_tokens, protocol=PROTOCOL, seed=seed)
    cap = CaptureOptions(hidden_states=False)
    out = []
    with loaded.lock:
        for m in methods:
            torch.manual_seed(seed)
            out.append(generate(loaded.model, loaded.processor, [image], question, m, keep_ratio, max_new_tokens,
                                options=opts, capture=cap, model_name=loaded.name))
    return out


def compare_methods(image: Any, question: Any, model_name: str, method_a: str, method_b: str, keep_percent: Any,
                    max_new_tokens: Any, layer: Any = None, policy: models.ModelPolicy = models.ModelPolicy()
                    ) -> tuple[go.Figure, go.Figure, str, list[Trace]]:
    """Two methods on the same input: (overlay + Jaccard figure, budgets figure, markdown table, traces)."""
    from analysis import compute_budgets, compute_comparison
    from analysis import explain as ax
    from analysis.plots_plotly import plot_budgets, plot_comparison

    img = check_image(image)
    a, b = check_method(method_a), check_method(method_b)
    keep = check_keep_percent(keep_percent)
    n_new = check_max_new_tokens(max_new_tokens)
    check_question(question)
    loaded = models.get_model(model_name, policy)
    q = check_question(question, loaded.processor)
    results = _generate_locked(loaded, img, q, [a, b], keep, n_new, SEED)
    traces = [r.trace for r in results]
    L = traces[0].num_layers
    layer = traces[0].largest_evicted_layer() if layer is None or layer == "" else check_layer(layer, L)
    cmp = compute_comparison(traces, layer)
    fig = plot_comparison(cmp, [img]) if cmp.overlays else empty_figure("no patch geometry for this model")
    bud = plot_budgets(compute_budgets(traces))
    rows = "\n".join(
        f"| {html.escape(t.method)} | {html.escape(t.output_text) or '(empty)'} | {fmt_bytes(int(t.kv_bytes_kept.sum()))} "
        f"| {t.budgets.min()}–{t.budgets.max()} | {t.timings['total_s'] * 1e3:.0f} ms |" for t in traces)
    md = (f"| method | answer | KV after prefill | kept tokens/layer | time |\n|---|---|---:|---:|---:|\n{rows}\n\n"
          f"**{ax.comparison(cmp)}.** What to notice: a Jaccard near 1 means both methods keep the same tokens in "
          "that layer; where it drops, look at the overlays below to see which patches each one chose. Budgets "
          "(second figure) show where each method spends its memory.")
    return fig, bud, md, traces



__all__ = ["compare_methods"]
