"""One figure of the benchmark results (matplotlib object API, no pyplot state)."""
from __future__ import annotations

from collections import defaultdict

from matplotlib.figure import Figure


def figure(prefill: list[dict], batched: list[dict], engine: list[dict]) -> Figure:
    fig = Figure(figsize=(15, 4.4), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    _prefill(ax1, prefill)
    _batched(ax2, batched)
    _kv(ax3, engine or batched)
    return fig


def _prefill(ax, rows):
    by = defaultdict(list)
    for r in rows:
        if r["ratio_to_sdpa"] == r["ratio_to_sdpa"]:  # not NaN
            by[r["variant"]].append((r["T"], r["ratio_to_sdpa"]))
    for v, pts in by.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
    ax.axhline(1.10, color="grey", ls="--", lw=1, label="1.10x target")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill time / SDPA")
    ax.set_title("Prefill overhead of statistics capture")
    ax.legend(fontsize=8)


def _batched(ax, rows):
    by = defaultdict(list)
    for r in rows:
        by[(r["method"], r["keep"])].append(r)
    for (m, k), rs in sorted(by.items()):
        rs.sort(key=lambda r: r["batch"])
        line, = ax.plot([r["batch"] for r in rs], [r["decode_tokens_per_s"] for r in rs], marker="o",
                        label=f"{m} {k:.0%}" if m != "full" else "full KV")
        if m != "full":
            full = {r["batch"]: r["decode_tokens_per_s"] / r["speedup"] for r in rs}
            ax.plot([r["batch"] for r in rs], [full[r["batch"]] * r["bound"] for r in rs], ls=":",
                    color=line.get_color(), lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s (dotted: bandwidth bound)")
    ax.set_title("Batched decode throughput")
    ax.legend(fontsize=7)


def _kv(ax, rows):
    """KV MiB per sequence: full, and each method at 5% after prefill eviction and at the end of decoding."""
    import numpy as np

    pick = [r for r in rows if r["batch"] == 1 and (r["method"] == "full" or r["keep"] == 0.05)]
    if not pick:
        return
    names = [r["method"] if r["method"] == "full" else f"{r['method']}\n5%" for r in pick]
    kept = [r["kv_bytes_kept"] / 2**20 for r in pick]
    final = [r.get("kv_bytes_final", r["kv_bytes_kept"]) / 2**20 for r in pick]
    x = np.arange(len(pick))
    ax.bar(x - 0.2, kept, 0.4, label="after prefill eviction")
    ax.bar(x + 0.2, final, 0.4, label="after decoding")
    for xi, r in zip(x, pick):
        ax.annotate(f"{r['kept_fraction']:.1%}", (xi - 0.2, r["kv_bytes_kept"] / 2**20), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(x, names, fontsize=7)
    ax.set_ylabel("KV MiB per sequence (measured)")
    ax.set_title("KV memory at 5% (batch 1; label: kept / full)")
    ax.legend(fontsize=8)
