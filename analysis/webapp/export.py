"""Export one run: traces (NPZ + JSON), figures (PNG + SVG), a run card (JSON) and a zip of all of it.

Each request writes into its own fresh temporary folder (under the system temp dir, which Gradio serves), so
sessions never see each other's files.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import platform
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from matplotlib.figure import Figure

from .display import KL_NOTICEABLE, answer_labels, summary

if TYPE_CHECKING:
    from .state import RunState

log = logging.getLogger(__name__)

FIGURE_FORMATS = ("png", "svg")


def image_sha256(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return hashlib.sha256(buf.getvalue()).hexdigest()


def versions() -> dict[str, str]:
    import gradio
    import matplotlib
    import plotly
    import torch
    import transformers

    from tgvkv import __version__

    return {"tgvkv": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "gradio": gradio.__version__, "numpy": np.__version__,
            "plotly": plotly.__version__, "matplotlib": matplotlib.__version__}


def run_card(run: "RunState") -> dict[str, Any]:
    """Everything needed to reproduce and cite the run."""
    s = summary(run)
    return {
        "format": "tgvkv-run-card/1",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(run.created)),
        "model": run.model, "model_source": run.source, "device": run.device, "dtype": run.dtype,
        "method": run.method, "policy": run.evicted.policy, "keep_ratio": run.keep_ratio,
        "budget_tokens_per_layer": s["evicted"]["kept_tokens_per_layer"],
        "max_new_tokens": run.max_new_tokens, "protocol": run.protocol, "seed": run.seed, "decoding": "greedy",
        "question": run.question, "image": {"size": list(run.image.size), "sha256_png": image_sha256(run.image)},
        "versions": versions(),
        "results": {k: s[k] for k in ("prompt_tokens", "vision_tokens", "num_layers", "first_divergence", "step_kl")}
        | {"full": {k: s["full"][k] for k in ("answer", "kv_bytes_kept", "kv_bytes_final", "timings")},
           "evicted": {k: s["evicted"][k] for k in ("answer", "kv_bytes_kept", "kv_bytes_final", "timings")}},
    }


def kl_figure_mpl(run: "RunState", max_labels: int = 24) -> Figure:
    """The app's per-step KL bars for papers: token labels thinned to `max_labels` (first divergence always shown)."""
    from analysis import palette
    from analysis.ticks import thinned
    from matplotlib.patches import Patch

    kl = run.step_kl
    d = run.first_divergence
    labels = answer_labels(run)
    fig = Figure(figsize=(max(8, 0.22 * len(kl) + 3), 4), dpi=150)
    ax = fig.add_subplot()
    ax.bar(np.arange(len(kl)), kl, color=[palette.AGREE if d is None or i < d else palette.DIVERGED
                                           for i in range(len(kl))])
    ax.axhline(KL_NOTICEABLE, color=palette.REFERENCE, ls=":", lw=1.5)
    shown = thinned(len(kl), max_labels, [] if d is None else [d])
    text = [f"{i}:{labels[i] if i < len(labels) else ''}".replace("$", r"\$") for i in shown]  # no mathtext
    ax.set_xticks(shown, text, rotation=60, ha="right",
                  rotation_mode="anchor", fontsize=9)
    ax.set_xlim(-0.6, len(kl) - 0.4)
    ax.set_xlabel("full-answer token (step:token)")
    ax.set_ylabel("KL(full ‖ evicted), nats")
    ax.set_title(f"{run.method} at {run.keep_ratio:.0%}: divergence per answer step")
    handles = [Patch(color=palette.AGREE, label="before the answers part"),
               Patch(color=palette.DIVERGED, label="from the first differing token on")][: 1 if d is None else 2]
    ax.legend(handles=handles, frameon=False, fontsize=9, loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def _figures(run: "RunState", layer: int) -> dict[str, Callable[[], Figure]]:
    from analysis import compute_accumulated, compute_attention, compute_budgets, compute_neighbours, compute_overlay
    from analysis import plots_mpl

    t = run.evicted
    return {
        "kl_per_step": lambda: kl_figure_mpl(run),
        "overlay": lambda: plots_mpl.plot_overlay(compute_overlay(t, layer), [run.image]),
        "budgets": lambda: plots_mpl.plot_budgets(compute_budgets([t])),
        "attention": lambda: plots_mpl.plot_attention(compute_attention(t, layer)),
        "neighbours": lambda: plots_mpl.plot_neighbours(compute_neighbours(t, None, projection="pca", seed=run.seed)),
        "accumulated": lambda: plots_mpl.plot_accumulated(compute_accumulated(t)),
    }


def export_run(run: "RunState", out_dir: str | Path | None = None, layer: int | None = None,
               formats: tuple[str, ...] = FIGURE_FORMATS) -> list[Path]:
    """Write the run's files into a fresh folder; returns [zip, run card, traces..., figures...]."""
    from analysis import compute_overlay, overlay_panels

    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="tgvkv-export-"))
    out.mkdir(parents=True, exist_ok=True)
    layer = run.default_layer() if layer is None else int(layer)
    stem = f"{run.method}-keep{round(run.keep_ratio * 100)}"
    files: list[Path] = []
    card = run_card(run)
    card_path = out / f"run_card-{stem}.json"
    files.append(card_path)
    files.append(run.evicted.save(out / f"trace-{stem}.npz"))
    files.append(run.evicted.save(out / f"trace-{stem}.json"))
    files.append(run.full.save(out / "trace-full.npz"))
    skipped: dict[str, str] = {}
    for name, make in _figures(run, layer).items():
        try:
            fig = make()
        except ValueError as e:  # the trace lacks what this figure needs (e.g. no patch geometry)
            skipped[name] = str(e)
            continue
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            fig.savefig(path, format=fmt, bbox_inches="tight")
            files.append(path)
    try:
        panels = overlay_panels(compute_overlay(run.evicted, layer), [run.image], "kept")
        for i, (_, img) in enumerate(panels):
            path = out / f"overlay-layer{layer}-view{i}.png"
            img.save(path)
            files.append(path)
    except ValueError as e:
        skipped["overlay_panels"] = str(e)
    card["files"] = [p.name for p in files[1:]]
    card["skipped_figures"] = skipped
    card_path.write_text(json.dumps(card, indent=1))
    bundle = out / f"tgvkv-{stem}.zip"
    with zipfile.ZipFile(bundle, "w", zipfile.ZIP_DEFLATED) as z:
        for p in files:
            z.write(p, p.name)
    log.info("exported %d files to %s", len(files) + 1, out)
    return [bundle, *files]
