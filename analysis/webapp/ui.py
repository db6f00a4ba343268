"""The app's page: `build_ui` lays out the components and wires every event to the handlers through their named
outputs; `launch` serves it with the app's limits. `app.py` (the launcher) and the latency benchmark both call these.

Every event is a named API endpoint (`/compare`, `/diagnostics`, `/overlay`, `/attention`, `/compare_methods`,
`/export`, `/lesson`, `/export_lesson`) callable with gradio_client.
"""
from __future__ import annotations

import gradio as gr

from tgvkv.images import MAX_FILE_BYTES

from . import models
from .components import CheckedSlider, ImageInput
from .examples import EXAMPLES_DIR, PHOTO_PANEL_LABEL, SCENE_PANEL_LABEL, load_examples
from .handlers import make_ui_handlers
from .inputs import (DEFAULT_KEEP_PERCENT, DEFAULT_MAX_NEW_TOKENS, KEEP_PERCENT_RANGE, MAX_NEW_TOKENS_UI, MAX_SIDE,
                     method_choices)
from .lesson import build_lesson_tab
from .outputs import Binding, DiagnosticsOutputs, ExportOutputs, FigureOutputs, MethodsOutputs, RunOutputs, wired

MAX_UPLOAD = f"{MAX_FILE_BYTES // 2**20}mb"  # the CLI refuses larger image files with the same limit
STATE_TTL_S = 3600
MAX_SESSIONS = 200  # sessions whose run state is kept in memory (oldest dropped first)
#: layer sliders start with maximum 1 and get the model's range from /diagnostics; the handlers check any value
LAYER_API = "layer index, 0 to the model's number of layers - 1 (checked against the run)"

CSS = """
.gradio-container {max-width: 1500px !important}
#title h1 {margin-bottom: 0}
.answer {border: 1px solid #d0d7de; border-radius: 10px; padding: 12px 14px; min-height: 120px; background: #fff}
.answer-full {border-left: 6px solid #0072B2}
.answer-evicted {border-left: 6px solid #E69F00}
.answer-title {font-weight: 600; font-size: 0.95rem; color: #444; margin-bottom: 6px}
.answer-text {font-size: 1.35rem; line-height: 1.6; color: #111}
.answer-text .tok.div {background: #fde2cf; border-bottom: 3px solid #D55E00; border-radius: 3px}
.answer-meta {margin-top: 8px; font-size: 0.85rem; color: #555}
.answer-failed .answer-text {font-size: 1rem; color: #777; font-style: italic}
.answer-meta .same {color: #007a5a; font-weight: 600}
.answer-meta .differs {color: #D55E00; font-weight: 600}
.caption {font-size: 0.95rem; color: #333}
#image img, #overlay-image img {image-rendering: pixelated}
.explain {font-size: 1.15rem; line-height: 1.55}
.explain h3 {font-size: 1.6rem} .explain h4 {font-size: 1.3rem}
"""

INTRO = (
    "# TGV-KV Explorer\n"
    "Ask a vision-language model about an image twice: once with its **full KV cache** and once with the cache "
    "**evicted** by TGV-KV (text-grounded KV eviction) or a baseline, then see where the answers part, how far the "
    "evicted model's beliefs drift per token, and which image patches each layer kept. Start with an example below."
)


def build_ui(policy: models.ModelPolicy = models.ModelPolicy(), concurrency: int = 1) -> gr.Blocks:
    """The page layout and its events; `policy` is what the operator allows (from the command line)."""
    h = make_ui_handlers(policy)
    heavy = dict(concurrency_limit=concurrency, concurrency_id="model")
    model_choices = models.choices()
    if policy.default_model not in [v for _, v in model_choices]:
        model_choices.insert(0, (f"{policy.default_model} (set by the operator)", policy.default_model))

    with gr.Blocks(title="TGV-KV Explorer") as demo:
        run_state = gr.State(None, time_to_live=STATE_TTL_S)
        gr.Markdown(INTRO, elem_id="title")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=360):
                image = ImageInput(type="filepath", label=f"Image (larger sides are downscaled to {MAX_SIDE} px)",
                                   sources=["upload", "clipboard"], height=300, elem_id="image")
                question = gr.Textbox(label="Question", placeholder="what color is the triangle ?", lines=1,
                                      max_lines=3, elem_id="question")
                model = gr.Dropdown(model_choices, value=policy.default_model, label="Model", allow_custom_value=True,
                                    info="bundled demo, a hub id (needs network)"
                                    + (", or a local folder" if policy.allow_local else ""), elem_id="model")
                method = gr.Dropdown(method_choices(), value="tgv-kv", label="Eviction method", elem_id="method")
                keep = CheckedSlider(*KEEP_PERCENT_RANGE, value=DEFAULT_KEEP_PERCENT, step=1, elem_id="keep",
                                     label="Keep ratio: % of the KV cache kept",
                                     info="changing it (or the method) re-runs the comparison",
                                     api_description="percent of the KV cache kept, %g to %g" % KEEP_PERCENT_RANGE)
                max_new = CheckedSlider(1, MAX_NEW_TOKENS_UI, value=DEFAULT_MAX_NEW_TOKENS, step=1,
                                        label="Max new tokens", elem_id="max-new",
                                        api_description=f"whole number from 1 to {MAX_NEW_TOKENS_UI}")
                run_btn = gr.Button("Run full vs evicted", variant="primary", elem_id="run")
                scene_rows = [[e.path.as_posix(), e.question, models.DEMO] for e in load_examples("scene")]
                photo_rows = [[e.path.as_posix(), e.question] for e in load_examples("photo")]
                scene_ex = gr.Examples(scene_rows, [image, question, model], label=SCENE_PANEL_LABEL,
                                       example_labels=[r[1] for r in scene_rows], visible_columns=[0, 1],
                                       cache_examples=False, examples_per_page=8, elem_id="scene-examples")
                photo_ex = gr.Examples(photo_rows, [image, question], label=PHOTO_PANEL_LABEL,
                                       example_labels=[r[1] for r in photo_rows], cache_examples=False,
                                       elem_id="photo-examples")
            with gr.Column(scale=6, min_width=480):
                with gr.Row(equal_height=True):
                    full_html = gr.HTML('<div class="answer answer-full"><div class="answer-title">Full KV cache</div>'
                                        '<div class="answer-text">…</div></div>', elem_id="answer-full",
                                        label="full answer")
                    evicted_html = gr.HTML('<div class="answer answer-evicted"><div class="answer-title">Evicted KV'
                                           '</div><div class="answer-text">…</div></div>', elem_id="answer-evicted",
                                           label="evicted answer")
                kl_plot = gr.Plot(label="Per-step divergence", elem_id="kl-plot")
                kl_caption = gr.Markdown(elem_classes="caption", elem_id="kl-caption", label="divergence caption")
                metrics = gr.Markdown(elem_id="metrics", label="metrics")
                with gr.Accordion("Raw numbers (JSON, also returned by the /compare endpoint)", open=False):
                    summary_json = gr.JSON(label="run summary", elem_id="summary")

        with gr.Tabs():
            with gr.Tab("Retained patches", id="overlay"):
                with gr.Row():
                    overlay_layer = CheckedSlider(0, 1, value=0, step=1, label="Overlay layer", elem_id="overlay-layer",
                                                  api_description=LAYER_API)
                    overlay_mode = gr.Radio(["layer", "all layers"], value="layer", label="Show",
                                            info="kept patches of one layer, or how many layers keep each patch")
                overlay_img = gr.Image(type="pil", label="Retained patches", format="png", height=480,
                                       elem_id="overlay-image", interactive=False)
                overlay_caption = gr.Markdown(elem_classes="caption", elem_id="overlay-caption", label="overlay caption")
            with gr.Tab("Budgets per layer", id="budgets"):
                budgets_plot = gr.Plot(elem_id="budgets-plot", label="budgets")
                budgets_caption = gr.Markdown(elem_classes="caption", label="budgets caption")
            with gr.Tab("Attention map", id="attention"):
                attn_layer = CheckedSlider(0, 1, value=0, step=1, label="Attention layer", elem_id="attention-layer",
                                           api_description=LAYER_API)
                attn_plot = gr.Plot(elem_id="attention-plot", label="attention map")
                attn_caption = gr.Markdown(elem_classes="caption", label="attention caption")
            with gr.Tab("Cosine neighbours", id="neighbours"):
                neigh_plot = gr.Plot(elem_id="neighbours-plot", label="cosine neighbours")
                neigh_caption = gr.Markdown(elem_classes="caption", label="neighbours caption")
            with gr.Tab("Accumulated attention", id="accumulated"):
                acc_plot = gr.Plot(elem_id="accumulated-plot", label="accumulated attention")
                acc_caption = gr.Markdown(elem_classes="caption", label="accumulated caption",
                                          elem_id="accumulated-caption")
            with gr.Tab("Explain", id="explain"):
                with gr.Column(elem_classes="explain"):
                    ex_intro = gr.Markdown("Run a comparison to get a walkthrough of this input.", label="explain intro")
                    ex_tvb = gr.Markdown(label="explain TVB")
                    ex_tvb_fig = gr.Plot(show_label=False, label="TVB figure")
                    ex_twr = gr.Markdown(label="explain TWR")
                    ex_twr_fig = gr.Plot(show_label=False, label="TWR figure")
                    ex_tpr = gr.Markdown(label="explain TPR")
                    ex_tpr_img = gr.Image(type="pil", format="png", show_label=False, height=420, interactive=False,
                                          label="TPR overlay")
            with gr.Tab("Lesson", id="lesson"):
                build_lesson_tab(policy, heavy, image, question, model, keep, max_new)
            with gr.Tab("Compare methods", id="compare"):
                gr.Markdown("Two methods on the image, question, model and keep ratio above.")
                with gr.Row():
                    cmp_a = gr.Dropdown(method_choices(), value="tgv-kv", label="Method A")
                    cmp_b = gr.Dropdown(method_choices(), value="h2o" if "h2o" in dict(method_choices()).values()
                                        else "random", label="Method B")
                    cmp_layer = CheckedSlider(0, 1, value=0, step=1, label="Layer for the overlays",
                                              elem_id="compare-layer", api_description=LAYER_API)
                cmp_btn = gr.Button("Compare the two methods", elem_id="compare-run")
                cmp_md = gr.Markdown(elem_classes="caption", label="comparison table")
                cmp_plot = gr.Plot(elem_id="compare-plot", label="comparison overlays")
                cmp_budgets = gr.Plot(label="comparison budgets")
            with gr.Tab("Export", id="export"):
                gr.Markdown("Download the evicted run's trace (`Trace.load` reads NPZ and JSON back), the full run's "
                            "trace, every figure as PNG and SVG, and a run card (model, method, budget, versions, "
                            "seed) — one by one or as a zip.")
                export_btn = gr.Button("Export this run", elem_id="export-run")
                export_md = gr.Markdown(label="export summary")
                export_files = gr.File(label="Files", file_count="multiple", interactive=False, elem_id="export-files")

        run_inputs = [image, question, model, method, keep, max_new]
        # one binding per output record: the handlers' named outputs meet the page's components here, and only here
        run_out = Binding(RunOutputs, run_state=run_state, full_answer=full_html, evicted_answer=evicted_html,
                          kl_plot=kl_plot, kl_caption=kl_caption, metrics=metrics, summary=summary_json)
        diag_out = Binding(DiagnosticsOutputs, overlay_layer=overlay_layer, attention_layer=attn_layer,
                           compare_layer=cmp_layer, overlay_image=overlay_img, overlay_caption=overlay_caption,
                           budgets_plot=budgets_plot, budgets_caption=budgets_caption, attention_plot=attn_plot,
                           attention_caption=attn_caption, neighbours_plot=neigh_plot, neighbours_caption=neigh_caption,
                           accumulated_plot=acc_plot, accumulated_caption=acc_caption, explain_intro=ex_intro,
                           explain_tvb_figure=ex_tvb_fig, explain_tvb=ex_tvb, explain_twr_figure=ex_twr_fig,
                           explain_twr=ex_twr, explain_tpr_image=ex_tpr_img, explain_tpr=ex_tpr)
        export_out = Binding(ExportOutputs, files=export_files, summary=export_md)
        cmp_out = Binding(MethodsOutputs, comparison_plot=cmp_plot, budgets_plot=cmp_budgets, table=cmp_md)
        on_run, run_outputs = wired(h["run"], run_out)
        on_rerun, _ = wired(h["rerun"], run_out)
        on_diagnostics, diag_outputs = wired(h["diagnostics"], diag_out)
        on_diagnostics_if_run, _ = wired(h["diagnostics_if_run"], diag_out)
        # a failed run or diagnostics empties the run, diagnostics and export outputs (handlers.cleared_run_outputs)
        on_run_failed, cleared = wired(h["run_failed"], run_out, diag_out, export_out)
        private = dict(api_visibility="private")

        def on_failure(event) -> None:
            event.failure(on_run_failed, None, cleared, **private)

        # a new input: diagnostics at the default layer, in the overlay mode the visitor chose
        run_event = gr.on([run_btn.click, question.submit], on_run, run_inputs, run_outputs, api_name="compare",
                          **heavy)
        on_failure(run_event)
        on_failure(run_event.success(on_diagnostics, [run_state, overlay_mode], diag_outputs, api_name="diagnostics",
                                     **heavy))
        for ex in (scene_ex, photo_ex):
            ex_run = ex.load_input_event.then(on_run, run_inputs, run_outputs, **private, **heavy)
            on_failure(ex_run)
            on_failure(ex_run.success(on_diagnostics, [run_state, overlay_mode], diag_outputs, **private, **heavy))
        # a settings change on the same input: keeps the overlay mode and layer the visitor is looking at
        rerun = gr.on([keep.release, method.input], on_rerun, [run_state, *run_inputs], run_outputs,
                      trigger_mode="always_last", **private, **heavy)
        on_failure(rerun)
        on_failure(rerun.success(on_diagnostics_if_run, [run_state, overlay_mode, overlay_layer], diag_outputs,
                                 **private, **heavy))
        on_overlay, overlay_outputs = wired(h["overlay"], Binding(FigureOutputs, figure=overlay_img,
                                                                  caption=overlay_caption))
        gr.on([overlay_layer.release, overlay_mode.input], on_overlay, [run_state, overlay_layer, overlay_mode],
              overlay_outputs, api_name="overlay", trigger_mode="always_last")
        on_attention, attention_outputs = wired(h["attention"], Binding(FigureOutputs, figure=attn_plot,
                                                                        caption=attn_caption))
        attn_layer.release(on_attention, [run_state, attn_layer], attention_outputs, api_name="attention",
                           trigger_mode="always_last")
        cmp_inputs = [image, question, model, cmp_a, cmp_b, keep, max_new, cmp_layer]
        on_compare_methods, cmp_outputs = wired(h["compare_methods"], cmp_out)
        cmp_event = cmp_btn.click(on_compare_methods, cmp_inputs, cmp_outputs, api_name="compare_methods", **heavy)
        on_compare_failed, _ = wired(h["compare_failed"], cmp_out)
        cmp_event.failure(on_compare_failed, None, cmp_outputs, **private)
        on_export, export_outputs = wired(h["export"], export_out)
        export_btn.click(on_export, [run_state], export_outputs, api_name="export")
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           concurrency: int = 1, prevent_thread_lock: bool = False):
    """Queue + launch with the app's limits (upload size, served folders, theme, CSS); also used by the tests."""
    demo.queue(default_concurrency_limit=concurrency, max_size=32)
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD,
                       allowed_paths=[str(EXAMPLES_DIR)], theme=gr.themes.Soft(), css=CSS, show_error=True,
                       state_session_capacity=MAX_SESSIONS,
                       prevent_thread_lock=prevent_thread_lock, quiet=prevent_thread_lock)



__all__ = ["build_ui", "launch", "CSS", "INTRO"]
