"""One-line findings per figure, computed from the figure data: used as titles and as captions in the app."""
from __future__ import annotations

import numpy as np

from .compute import (AccumulatedData, AttentionData, BudgetData, ComparisonData, NeighbourData, OverlayData,
                      hidden_label)

BLOCK = {(0, 0): "T→T", (0, 1): "T→V", (1, 0): "V→T", (1, 1): "V→V"}  # [query modality, key modality]


def neighbours(d: NeighbourData) -> str:
    c = d.curves
    if not len(c["text→text"]) or not len(c["text→vision"]):
        return f"{hidden_label(d.layer_name).capitalize()}: needs both text and vision tokens"
    within, across = c["text→text"][0], c["text→vision"][0]
    verdict = "cluster by modality" if within > across else "mix across modalities"
    where = hidden_label(d.layer_name)
    return f"Hidden states ({where}) {verdict}: nearest-neighbour cosine text→text {within:.2f}, text→vision {across:.2f}"


def attention(d: AttentionData) -> str:
    dens = np.divide(d.block_sums, d.block_entries, out=np.zeros((2, 2)), where=d.block_entries > 0)
    if dens[0, 1] <= 0:
        return f"Layer {d.layer}: text queries give no attention to vision"
    ratio = dens[0, 0] / dens[0, 1]
    scope = "" if d.full else " (captured text-query rows only; full map not stored)"
    return f"Layer {d.layer}: per entry, text→text attention is {ratio:.1f}× text→vision{scope}"


def accumulated(d: AccumulatedData) -> str:
    a, m = d.share_attention_only["text"], d.share_method["text"]
    scope = "" if d.source == "all queries" else f" (ranked by {d.source})"
    return f"Attention-only eviction drops {a:.0%} of text KV; {d.method} drops {m:.0%}{scope}"


def row_position(i: int, n: int) -> str:
    """Where the i-th of n stacked rows is: 'top row', 'bottom row', 'row 2 from the top'."""
    return "top row" if i == 0 else "bottom row" if i == n - 1 else f"row {i + 1} from the top"


def eviction_rows(d: AccumulatedData) -> str:
    """Which strip of the accumulated-attention figure is which, read from the order the figure draws them."""
    rows = d.eviction_rows()
    names = {"attention-only": "attention-only ranking (same per-layer budgets)"}
    return "; ".join(f"{row_position(i, len(rows))}: {names.get(label, label + ' (the traced method)')}"
                     for i, (label, _) in enumerate(rows))


def overlay(d: OverlayData) -> str:
    n_cells = sum(k.size for k in d.kept)
    n_kept = sum(int(k.sum()) for k in d.kept)
    text = f"Layer {d.layer} ({d.method}) keeps {n_kept} of {n_cells} patches"
    if d.top:
        v, r, c = d.top[0]
        text += f"; top text→image patch: {d.views[v].name} row {r} col {c}"
    return text


def budgets(d: BudgetData) -> str:
    total = d.text[0] + d.vision[0]
    never = d.never_evicted if d.never_evicted is not None else np.zeros(len(total), dtype=bool)
    evicted = np.flatnonzero(~never) if (~never).any() else np.arange(len(total))
    hi = int(evicted[np.argmax(total[evicted])])
    full_text = int(np.sum(d.text[0][evicted] == d.n_text))
    text = (f"{d.methods[0]} budgets range {total[evicted].min()}–{total[evicted].max()} tokens (uniform "
            f"{d.uniform:.0f}); layer {hi} gets most; {full_text}/{len(evicted)} layers keep all text")
    if never.any():
        text += f"; {never.sum()} of {len(total)} layers are never evicted (grey: {_layer_list(np.flatnonzero(never))})"
    return text


def _layer_list(layers: np.ndarray, most: int = 8) -> str:
    shown = ", ".join(str(int(l)) for l in layers[:most])
    return shown + (f", … ({len(layers) - most} more)" if len(layers) > most else "")


def comparison(d: ComparisonData) -> str:
    if len(d.pairs) == 1:
        i, j = d.pairs[0]
        return (f"{d.methods[i]} vs {d.methods[j]}: kept sets overlap by Jaccard {d.jaccard[0].mean():.2f} on average "
                f"(vision tokens only: {d.jaccard_vision[0].mean():.2f})")
    firsts = [(j, p) for p, (i, j) in enumerate(d.pairs) if i == 0]
    parts = ", ".join(f"{d.methods[j]} {d.jaccard[p].mean():.2f}" for j, p in firsts)
    return f"Mean Jaccard of {d.methods[0]}'s kept sets with {parts}"
