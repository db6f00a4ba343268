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
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from tgvkv.errors import cli_unexpected_message
from tgvkv.images import load_image_file, pixel_sha256
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
    layer = traces[0].largest_evicted_layer() if layer is None else layer
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
    p.add_argument("--layer", type=int, default=None,
                   help="layer for the per-layer figures (default: the evicted layer with the largest budget)")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help="comma-separated matplotlib formats among png,svg,pdf (default: %(default)s)")
    p.add_argument("--html", action="store_true", help="also write interactive plotly .html files")
    p.add_argument("--projection", default="pca", choices=["pca", "tsne", "none"])
    p.add_argument("--top-k", type=int, default=5, help="highlighted text->image patches")
    return p.parse_args(argv)  # values are checked by check_inputs, before anything is rendered


@dataclass
class FigureInputs:
    """The figures command's inputs, all checked: loaded traces and images, formats, layer, output folder."""

    traces: list[Trace]
    images: list[Image.Image] | None
    formats: list[str]
    layer: int | None
    out: Path


def matplotlib_formats() -> set[str]:
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def same_input(a: Trace, b: Trace) -> str | None:
    """Why trace `b` is not a run on the same input as `a` (None when it is): model depth and prompt tokens."""
    if a.num_layers != b.num_layers:
        return f"{b.num_layers} layers, not {a.num_layers}"
    if a.seq_len != b.seq_len:
        return f"a prompt of {b.seq_len} tokens, not {a.seq_len}"
    if not np.array_equal(a.prompt_ids, b.prompt_ids):
        first = int(np.flatnonzero(np.asarray(a.prompt_ids) != np.asarray(b.prompt_ids))[0])
        return f"different prompt tokens (first difference at position {first})"
    if a.layout.image_spans != b.layout.image_spans:
        return "different image token spans"
    return None


def check_inputs(args: argparse.Namespace) -> FigureInputs:
    """Load and check everything before rendering; ValueError names the option and the problem."""
    traces = [Trace.load(args.trace)]
    for path in args.compare:
        other = Trace.load(path)
        why = same_input(traces[0], other)
        if why is not None:
            raise ValueError(f"--compare {path.name!r} is not a run on the same input as --trace {args.trace.name!r}: "
                             f"it has {why}; compare traces of the same image, question and model")
        traces.append(other)
    expected = len(traces[0].layout.image_sizes)
    if args.image and len(args.image) != expected:
        raise ValueError(f"--image: the trace was run on {expected} image(s), got {len(args.image)} file(s); give "
                         "the prompt's images in order, or none")
    images = [load_image_file(p) for p in args.image] or traces[0].images() or None
    if images is None:
        log.warning("the trace stores no image and no --image was given: overlays are drawn on a neutral grid, "
                    "marked 'no image stored'")
    for i, (path, im) in enumerate(zip(args.image, images or [])):
        hashes = traces[0].image_sha256
        if i < len(hashes) and pixel_sha256(im) != hashes[i]:
            log.warning("--image %s: not the pixels this trace was run on (different hash); the overlay may not match",
                        path.name)
    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    known = matplotlib_formats()
    unknown = [f for f in formats if f not in known]
    if unknown:
        raise ValueError(f"--formats: unknown format {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    if not formats and not args.html:
        raise ValueError("nothing to write: --formats is empty and --html is off")
    L = traces[0].num_layers
    if args.layer is not None and not 0 <= args.layer < L:
        raise ValueError(f"--layer must be between 0 and {L - 1} for this trace, got {args.layer}")
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    return FigureInputs(traces, images, formats, args.layer, check_out_folder(args.out))


def check_out_folder(out: Path) -> Path:
    """The output folder, created if needed, and able to take files (probed)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".tgvkv-write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"--out {str(out)!r}: cannot write there ({e.strerror or e})") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done, 2 refused before rendering (the message names the problem), 1 unexpected failure."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        inputs = check_inputs(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _render(args, inputs)
    except Exception as e:  # noqa: BLE001 - a bug: one line with an error id, the traceback saved to a file
        print("error: " + cli_unexpected_message(e, "python -m analysis.figures"), file=sys.stderr)
        return 1


def _render(args: argparse.Namespace, inputs: FigureInputs) -> int:
    backends = (["mpl"] if inputs.formats else []) + (["plotly"] if args.html else [])
    done, skipped = render_all(inputs.traces, inputs.images, inputs.layer,
                               None if args.projection == "none" else args.projection, args.top_k, backends)
    written = write_all(done, skipped, inputs.out, inputs.formats, args.html, inputs.images)
    for name, fig in done.items():
        log.info("%-12s %s", name, fig["caption"])
    for name, why in skipped.items():
        log.warning("%-12s skipped: %s", name, why)
    log.info("wrote %d files to %s", len(written), inputs.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
