"""Render every figure available from saved traces.

    python -m analysis.figures --trace run.npz --out figs/ [--compare other.npz ...] [--image photo.png ...]
                               [--layer N] [--formats png,svg,pdf] [--html] [--projection pca|tsne|none]

Static figures are written per format (matplotlib; PNG and SVG by default), interactive ones as `.html` with
`--html` (plotly), overlay panels as plain PNGs for the app, and the one-line findings in `captions.json`.
The overlays are drawn on the image stored in the trace (a small copy; `--image` gives the original instead); a trace
without one is drawn on a neutral grid with each view's geometry, marked "no image stored".
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from tgvkv.trace import Trace

from . import compute, explain, plots_mpl, plots_plotly
from .overlay import overlay_panels

log = logging.getLogger(__name__)

DEFAULT_FORMATS = ("png", "svg")
FORMATS = ("png", "svg", "pdf")


def figure_specs(traces: Sequence[Trace], layer: int, projection: str | None, top_k: int) -> dict[str, tuple[Callable[[], Any], str]]:
    """name -> (data builder, plot/explain function name); builders raise ValueError when the trace lacks the data."""
    t = traces[0]
    specs: dict[str, tuple[Callable[[], Any], str]] = {
        "neighbours": (lambda: compute.compute_neighbours(t, layer, projection=projection), "neighbours"),
        "attention": (lambda: compute.compute_attention(t, layer), "attention"),
        "accumulated": (lambda: compute.compute_accumulated(t), "accumulated"),
        "overlay": (lambda: compute.compute_overlay(t, layer, top_k), "overlay"),
        "budgets": (lambda: compute.compute_budgets(traces), "budgets"),
    }
    if len(traces) > 1:
        specs["comparison"] = (lambda: compute.compute_comparison(traces, layer, top_k), "comparison")
    return specs


def render_all(traces: Sequence[Trace], images: Sequence[Image.Image] | None = None, layer: int | None = None,
               projection: str | None = "pca", top_k: int = 5, backends: Sequence[str] = ("mpl", "plotly"),
               ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """({name: {"data", "caption", and per backend "mpl" / "plotly": figure}}, {skipped name: reason}). No I/O."""
    modules = {"mpl": plots_mpl, "plotly": plots_plotly}
    layer = traces[0].num_layers // 2 if layer is None else layer
    done: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name, (build, kind) in figure_specs(traces, layer, projection, top_k).items():
        try:
            data = build()
        except ValueError as e:
            skipped[name] = str(e)
            continue
        extra = (images,) if kind in ("overlay", "comparison") else ()
        done[name] = {"data": data, "caption": getattr(explain, kind)(data)}
        done[name].update({b: getattr(modules[b], f"plot_{kind}")(data, *extra) for b in backends})
    return done, skipped


def write_all(done: dict[str, dict[str, Any]], skipped: dict[str, str], out: Path, formats: Sequence[str], html: bool,
              images: Sequence[Image.Image] | None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in done.items():
        for fmt in formats if "mpl" in fig else ():
            written.append(out / f"{name}.{fmt}")
            fig["mpl"].savefig(written[-1], format=fmt)
        if html and "plotly" in fig:
            written.append(out / f"{name}.html")
            fig["plotly"].write_html(written[-1], include_plotlyjs="cdn")
    if "overlay" in done:
        for kind in ("kept", "counts"):
            for vi, (_, img) in enumerate(overlay_panels(done["overlay"]["data"], images, kind)):
                written.append(out / f"overlay_{kind}_view{vi}.png")
                img.save(written[-1])
    captions = {"figures": {n: f["caption"] for n, f in done.items()}, "skipped": skipped}
    written.append(out / "captions.json")
    written[-1].write_text(json.dumps(captions, indent=2, ensure_ascii=False))
    return written


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True, type=Path, help="saved trace (.npz or .json)")
    p.add_argument("--compare", nargs="*", default=[], type=Path, help="traces of other methods on the same input")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--image", nargs="*", default=[], type=Path,
                   help="the prompt's original image(s), in order (default: the copy stored in the trace)")
    p.add_argument("--layer", type=int, default=None, help="layer for the per-layer figures (default: middle)")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help="comma-separated matplotlib formats among png,svg,pdf (default: %(default)s)")
    p.add_argument("--html", action="store_true", help="also write interactive plotly .html files")
    p.add_argument("--projection", default="pca", choices=["pca", "tsne", "none"])
    p.add_argument("--top-k", type=int, default=5, help="highlighted text->image patches")
    args = p.parse_args(argv)
    unknown = [f for f in args.formats.split(",") if f.strip() and f.strip() not in FORMATS]
    if unknown:
        p.error(f"unknown figure format(s) {', '.join(map(repr, unknown))}; choose among {','.join(FORMATS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    traces = [Trace.load(p) for p in [args.trace, *args.compare]]
    images = [Image.open(p).convert("RGB") for p in args.image] or traces[0].images() or None
    if images is None:
        log.warning("the trace stores no image and no --image was given: overlays are drawn on a neutral grid, "
                    "marked 'no image stored'")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    backends = (["mpl"] if formats else []) + (["plotly"] if args.html else [])
    done, skipped = render_all(traces, images, args.layer, None if args.projection == "none" else args.projection,
                               args.top_k, backends)
    written = write_all(done, skipped, args.out, formats, args.html, images)
    for name, fig in done.items():
        log.info("%-12s %s", name, fig["caption"])
    for name, why in skipped.items():
        log.warning("%-12s skipped: %s", name, why)
    log.info("wrote %d files to %s", len(written), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
