"""Named outputs: a binding maps every field of a handler's output record to one page component, in the record's field
order, and refuses a record it does not fit (no model needed)."""
from __future__ import annotations

import dataclasses

import pytest

import gradio as gr
from analysis.webapp.outputs import Binding, ExportOutputs, FigureOutputs, RunOutputs, wired


def test_binding_orders_components_by_field_and_checks_completeness():
    with gr.Blocks():
        caption, figure = gr.Markdown(label="caption"), gr.Plot(label="figure")
        binding = Binding(FigureOutputs, caption=caption, figure=figure)  # keyword order does not matter
        assert binding.components == [figure, caption]
        with pytest.raises(ValueError, match=r"no component for \['caption'\], no field for \['title'\]"):
            Binding(FigureOutputs, figure=figure, title=caption)


def test_wired_hands_gradio_the_values_in_output_order():
    with gr.Blocks():
        fig, cap, files, summary = gr.Plot(), gr.Markdown(), gr.File(), gr.Markdown()
        figure_binding = Binding(FigureOutputs, figure=fig, caption=cap)
        export_binding = Binding(ExportOutputs, files=files, summary=summary)

    def on_view(layer, progress=gr.Progress()):
        """A view."""
        return FigureOutputs(caption=f"layer {layer}", figure="the figure")

    fn, outputs = wired(on_view, figure_binding)
    assert outputs == [fig, cap] and fn(3) == ["the figure", "layer 3"]
    assert fn.__name__ == "on_view" and fn.__doc__ == "A view."  # Gradio reads both (and the signature) through it

    def on_both():
        return FigureOutputs(figure=1, caption="c"), ExportOutputs(files=None, summary="s")

    fn, outputs = wired(on_both, figure_binding, export_binding)
    assert outputs == [fig, cap, files, summary] and fn() == [1, "c", None, "s"]
    swapped, _ = wired(lambda: (ExportOutputs(files=None, summary="s"), FigureOutputs(figure=1, caption="c")),
                       figure_binding, export_binding)
    with pytest.raises(TypeError, match="expected FigureOutputs, got ExportOutputs"):
        swapped()


def test_records_are_named_not_positional():
    with pytest.raises(TypeError):
        FigureOutputs("figure", "caption")  # keyword-only: a field cannot be filled by position
    skipped = RunOutputs.skipped()
    assert skipped.values() == [gr.skip()] * len(dataclasses.fields(RunOutputs))
    assert RunOutputs.names() == ["run_state", "full_answer", "evicted_answer", "kl_plot", "kl_caption", "metrics",
                                  "summary"]  # the /compare endpoint's output order (gradio_client callers rely on it)
