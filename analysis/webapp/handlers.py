"""The UI handlers: what the page's events and the named API endpoints call.

Each one validates through the core functions (``state.run_comparison``, ``views``, ``comparison``), reports
progress, re-raises every ``ValueError`` as ``gr.Error`` so the visitor sees the reason, and returns a named output
record (``outputs``) that ``ui.build_ui`` binds to the page's components.

Per-session data is one ``RunState`` kept in ``gr.State``; the only shared object is the cached model in ``models``,
used under its lock.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import torch

from tgvkv.errors import report_unexpected

from . import models
from .comparison import compare_methods
from .display import (FAILED_NOTE, answer_html, empty_figure, failed_answer_html, kl_caption, kl_figure,
                      metrics_markdown, summary)
from .inputs import is_layer
from .outputs import DiagnosticsOutputs, ExportOutputs, FigureOutputs, MethodsOutputs, RunOutputs
from .state import RunState, run_comparison
from .views import attention_view, diagnostics, overlay_view

log = logging.getLogger(__name__)


def user_errors(fn: Callable) -> Callable:
    """Re-raise ValueError (bad input, unloadable model) as gr.Error so the visitor sees the message; anything else
    is logged with its traceback under an error id, and the visitor sees one line with that id."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ValueError as e:
            raise gr.Error(str(e), duration=None) from e
        except torch.OutOfMemoryError as e:
            raise gr.Error("the model ran out of memory on this input; try a smaller image or fewer new tokens") from e
        except Exception as e:  # a bug or an environment failure: the traceback stays in the server log
            error_id = report_unexpected(e, log, fn.__name__)
            raise gr.Error(unexpected_message(error_id), duration=None) from e

    return wrapper


def unexpected_message(error_id: str) -> str:
    return (f"something went wrong on the server (error id {error_id}); the details are in the server log. "
            "Please try again, or report the id to the operator")


def _progress(progress: Any) -> Callable[[float, str], None]:
    def report(frac: float, desc: str) -> None:
        if progress is not None:
            progress(frac, desc=desc)

    return report



def make_ui_handlers(policy: models.ModelPolicy) -> dict[str, Callable]:
    """The functions ui.build_ui wires to events (each one is a named API endpoint); `policy` is the operator's."""

    @user_errors
    def on_run(image, question, model_name, method, keep_percent, max_new_tokens, progress=gr.Progress()) -> RunOutputs:
        """Full KV vs `method` keeping `keep_percent` % of the KV cache: answers, per-step KL, metrics, summary JSON."""
        run = run_comparison(image, question, model_name, method, keep_percent, max_new_tokens, policy,
                             _progress(progress))
        progress(0.9, desc="rendering answers")
        return RunOutputs(run_state=run, full_answer=answer_html(run, "full"),
                          evicted_answer=answer_html(run, "evicted"), kl_plot=kl_figure(run), kl_caption=kl_caption(run),
                          metrics=metrics_markdown(run), summary=summary(run))

    @user_errors
    def on_rerun(run, image, question, model_name, method, keep_percent, max_new_tokens,
                 progress=gr.Progress()) -> RunOutputs:
        """A settings change re-runs the comparison, but only once there is a run to update."""
        if run is None or image is None or not (question or "").strip():
            return RunOutputs.skipped()
        return on_run(image, question, model_name, method, keep_percent, max_new_tokens, progress)

    @user_errors
    def on_diagnostics_if_run(run, overlay_mode="layer", layer=None, progress=gr.Progress()) -> DiagnosticsOutputs:
        """After a settings change: the same views, keeping the visitor's overlay mode and layer when it exists."""
        if run is None:
            return DiagnosticsOutputs.skipped()
        keep = layer is not None and is_layer(layer, run.num_layers)
        return diagnostics_outputs(run, overlay_mode, int(layer) if keep else None, progress)

    @user_errors
    def on_diagnostics(run, overlay_mode="layer", progress=gr.Progress()) -> DiagnosticsOutputs:
        """Every diagnostic figure and the Explain walkthrough of this session's last /compare; the overlay in
        `overlay_mode` ('layer' or 'all layers')."""
        return diagnostics_outputs(run, overlay_mode, None, progress)

    def on_run_failed() -> tuple[RunOutputs, DiagnosticsOutputs, ExportOutputs]:
        """After a failed /compare or /diagnostics: no answer, figure or number of an earlier run stays on screen
        under the error (the inputs stay as the visitor left them)."""
        return cleared_run_outputs()

    def on_compare_failed() -> MethodsOutputs:
        return cleared_compare_outputs()

    @user_errors
    def on_overlay(run, layer, mode) -> FigureOutputs:
        """Retained patches of one layer (mode 'layer') or layers keeping each patch (mode 'all layers')."""
        if run is None:
            raise ValueError("run a comparison first")
        image, caption = overlay_view(run, layer, mode)
        return FigureOutputs(figure=image, caption=caption)

    @user_errors
    def on_attention(run, layer) -> FigureOutputs:
        """Head-averaged prefill attention map of one layer."""
        if run is None:
            raise ValueError("run a comparison first")
        figure, caption = attention_view(run, layer)
        return FigureOutputs(figure=figure, caption=caption)

    @user_errors
    def on_compare_methods(image, question, model_name, method_a, method_b, keep_percent, max_new_tokens, layer,
                           progress=gr.Progress()) -> MethodsOutputs:
        """Two methods on the same input: overlays + Jaccard of kept sets per layer, budgets, answers."""
        progress(0.1, desc=f"running {method_a} and {method_b}")
        fig, bud, md, _ = compare_methods(image, question, model_name, method_a, method_b, keep_percent,
                                          max_new_tokens, layer, policy)
        return MethodsOutputs(comparison_plot=fig, budgets_plot=bud, table=md)

    @user_errors
    def on_export(run, progress=gr.Progress()) -> ExportOutputs:
        """Trace (NPZ/JSON), figures (PNG/SVG), run card and a zip of this session's last /compare."""
        from .export import export_run

        if run is None:
            raise ValueError("run a comparison first, then export it")
        progress(0.1, desc="writing trace, figures and run card")
        files = export_run(run)
        names = ", ".join(f"`{Path(f).name}`" for f in files)
        return ExportOutputs(files=[str(f) for f in files], summary=f"Exported {len(files)} files: {names}")

    return {"run": on_run, "rerun": on_rerun, "diagnostics": on_diagnostics,
            "diagnostics_if_run": on_diagnostics_if_run,
            "overlay": on_overlay, "attention": on_attention, "run_failed": on_run_failed,
            "compare_methods": on_compare_methods, "compare_failed": on_compare_failed, "export": on_export}


def diagnostics_outputs(run: RunState | None, overlay_mode: str, layer: int | None,
                        progress: Any) -> DiagnosticsOutputs:
    """Every diagnostics view at `layer` (None: the default layer); the three layer sliders get the run's range."""
    if run is None:
        raise ValueError("run a comparison first")
    progress(0.1, desc="rendering diagnostics")
    d = diagnostics(run, layer, overlay_mode)
    slider = gr.Slider(minimum=0, maximum=run.num_layers - 1, value=d["layer"], step=1, interactive=True)
    e = d["explain"]
    return DiagnosticsOutputs(
        overlay_layer=slider, attention_layer=slider, compare_layer=slider,
        overlay_image=d["overlay"], overlay_caption=d["overlay_caption"],
        budgets_plot=d["budgets"], budgets_caption=d["budgets_caption"],
        attention_plot=d["attention"], attention_caption=d["attention_caption"],
        neighbours_plot=d["neighbours"], neighbours_caption=d["neighbours_caption"],
        accumulated_plot=d["accumulated"], accumulated_caption=d["accumulated_caption"],
        explain_intro=e["intro"], explain_tvb_figure=e["tvb_figure"], explain_tvb=e["tvb"],
        explain_twr_figure=e["twr_figure"], explain_twr=e["twr"], explain_tpr_image=e["tpr_image"],
        explain_tpr=e["tpr"])


def cleared_run_outputs() -> tuple[RunOutputs, DiagnosticsOutputs, ExportOutputs]:
    """The run, diagnostics and export outputs after a failed request: the run state is dropped (so Export cannot
    hand out an earlier run either), layer sliders stay as they are, and every view says why it is empty."""
    note = f"*{FAILED_NOTE}.*"
    run = RunOutputs(run_state=None, full_answer=failed_answer_html("full"),
                     evicted_answer=failed_answer_html("evicted"), kl_plot=empty_figure("no run"), kl_caption=note,
                     metrics=note, summary=None)
    diag = DiagnosticsOutputs(
        overlay_layer=gr.skip(), attention_layer=gr.skip(), compare_layer=gr.skip(),
        overlay_image=None, overlay_caption=note, budgets_plot=empty_figure("no run"), budgets_caption=note,
        attention_plot=empty_figure("no run"), attention_caption=note, neighbours_plot=empty_figure("no run"),
        neighbours_caption=note, accumulated_plot=empty_figure("no run"), accumulated_caption=note,
        explain_intro="### Walkthrough unavailable\n" + note, explain_tvb_figure=None, explain_tvb="",
        explain_twr_figure=None, explain_twr="", explain_tpr_image=None, explain_tpr="")
    return run, diag, ExportOutputs(files=None, summary=note)


def cleared_compare_outputs() -> MethodsOutputs:
    """The Compare-methods outputs after a failed comparison."""
    return MethodsOutputs(comparison_plot=empty_figure("no comparison"), budgets_plot=empty_figure("no comparison"),
                          table=f"*{FAILED_NOTE}.*")


__all__ = ["make_ui_handlers", "user_errors", "unexpected_message", "diagnostics_outputs", "cleared_run_outputs",
           "cleared_compare_outputs", "FAILED_NOTE"]
