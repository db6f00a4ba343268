"""The Lesson tab: the paper's claims walked through on the current image and question, a presentation view and a
one-file export (``/lesson`` builds it, ``/export_lesson`` writes the HTML and PDF).

Model plumbing only: the runs come from ``tgvkv.compare`` / ``tgvkv.generate`` (TGV-KV, official and strict
protocol, a follow-up turn, and a full-KV probe of the follow-up); the steps, texts and files from
``analysis.lesson``. Navigation happens in the browser (``analysis.lesson.DECK_JS``), so stepping through costs no
server round trip and works the same in the exported file.
"""
from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import torch
from PIL import Image

from tgvkv import CaptureOptions, RunOptions, compare, generate
from . import models
from .handlers import user_errors
from .inputs import check_image, check_keep_percent, check_max_new_tokens, check_question
from .outputs import Binding, ExportOutputs, LessonOutputs, wired
from .state import CAPTURE, SEED, on_gpu
from .lesson_examples import load_lesson_examples

LESSON_METHOD = "tgv-kv"  # the lesson explains the paper's method, whatever the main method dropdown says
PLACEHOLDER = ('<div class="lesson-deck lesson-empty"><p class="lesson-title">Lesson</p><p class="lesson-sub">Pick an '
               "image and a question above (or one of the lesson examples), optionally a follow-up question about "
               "another region, then press <strong>Build the lesson</strong>.</p></div>")


@dataclass
class LessonState:
    """One session's lesson (PNG bytes, texts): small and deep-copyable, kept in gr.State."""

    lesson: Any  # analysis.lesson.Lesson
    created: float


@on_gpu(duration=120)
def _runs_locked(loaded: models.LoadedModel, image: Image.Image, question: str, followup: str | None,
                 keep_ratio: float, max_new_tokens: int) -> Any:
    from analysis.lesson import LessonInput, ProtocolRun

    def opts(protocol: str, fu: str | None) -> RunOptions:
        return RunOptions(max_new_tokens=max_new_tokens, protocol=protocol, seed=SEED, followup=fu)

    common = dict(capture=CAPTURE, model_name=loaded.name)
    with loaded.lock:
        torch.manual_seed(SEED)
        official = compare(loaded.model, loaded.processor, [image], question, LESSON_METHOD, keep_ratio,
                           max_new_tokens, options=opts("official", followup), **common)
        torch.manual_seed(SEED)
        strict = compare(loaded.model, loaded.processor, [image], question, LESSON_METHOD, keep_ratio,
                         max_new_tokens, options=opts("strict", None),
                         capture=CaptureOptions(diagnostics=False, hidden_states=False), model_name=loaded.name)
        probe = None
        if followup:
            probe = generate(loaded.model, loaded.processor, [image], followup, None, 1.0,
                             options=opts("official", None), capture=CaptureOptions(hidden_states=False),
                             model_name=loaded.name).trace
    return LessonInput(full=official.full.trace,
                       official=ProtocolRun("official", official.evicted.trace, official.step_kl),
                       strict=ProtocolRun("strict", strict.evicted.trace, strict.step_kl),
                       followup_probe=probe, image=image)


def lesson_input(image: Any, question: Any, followup: Any, model_name: str, keep_percent: Any, max_new_tokens: Any,
                 policy: models.ModelPolicy = models.ModelPolicy()) -> Any:
    """The runs a lesson reads, for one image + question (+ follow-up). Raises ValueError on bad input."""
    img = check_image(image)
    keep = check_keep_percent(keep_percent)
    n_new = check_max_new_tokens(max_new_tokens)
    check_question(question)
    fu = followup.strip() if isinstance(followup, str) and followup.strip() else None
    if fu is not None:
        check_question(fu)
    loaded = models.get_model(model_name, policy)
    q = check_question(question, loaded.processor)
    fu = check_question(fu, loaded.processor) if fu is not None else None
    return _runs_locked(loaded, img, q, fu, keep, n_new)


def build(image: Any, question: Any, followup: Any, model_name: str, keep_percent: Any, max_new_tokens: Any,
          policy: models.ModelPolicy = models.ModelPolicy()) -> Any:
    """The lesson (analysis.lesson.Lesson) for one input."""
    from analysis.lesson import build_lesson

    return build_lesson(lesson_input(image, question, followup, model_name, keep_percent, max_new_tokens, policy))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "lesson"


def export_lesson(lesson: Any, out_dir: str | Path | None = None) -> list[Path]:
    """Write the lesson as one self-contained HTML file and one PDF; returns [html, pdf]."""
    from analysis.lesson import write_html, write_pdf

    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="tgvkv-lesson-"))
    out.mkdir(parents=True, exist_ok=True)
    stem = f"lesson-{_slug(lesson.meta.get('question') or '')}"
    return [write_html(lesson, out / f"{stem}.html"), write_pdf(lesson, out / f"{stem}.pdf")]


def make_lesson_handlers(policy: models.ModelPolicy) -> dict[str, Callable]:
    @user_errors
    def on_build(image, question, followup, model_name, keep_percent, max_new_tokens, progress=gr.Progress()):
        """The lesson for this image + question (+ follow-up) with TGV-KV: slides HTML and the state for export."""
        from analysis.lesson import deck_html

        progress(0.1, desc="running full KV, TGV-KV (official and strict) and the follow-up")
        lesson = build(image, question, followup, model_name, keep_percent, max_new_tokens, policy)
        return LessonOutputs(lesson_state=LessonState(lesson, time.time()), deck=deck_html(lesson))

    @user_errors
    def on_export(state, progress=gr.Progress()):
        """This session's lesson as one self-contained HTML file (works offline) and a PDF."""
        if state is None:
            raise ValueError("build the lesson first, then export it")
        progress(0.2, desc="writing HTML and PDF")
        files = export_lesson(state.lesson)
        return ExportOutputs(files=[str(f) for f in files],
                             summary=f"Exported `{files[0].name}` (opens offline) and `{files[1].name}`.")

    return {"build": on_build, "export": on_export}


def build_lesson_tab(policy: models.ModelPolicy, heavy: dict[str, Any], image: gr.components.Component,
                     question: gr.Textbox, model: gr.Dropdown, keep: gr.Slider, max_new: gr.Slider) -> None:
    """The Lesson tab's layout and events; call inside a `gr.Tab` of app.py's Blocks (inputs are the page's own)."""
    from analysis.lesson import DECK_CSS, DECK_JS

    h = make_lesson_handlers(policy)
    state = gr.State(None, time_to_live=3600)
    gr.Markdown("A walk through the paper's claims on the image and question above, one figure and a few computed "
                "sentences per step, always with **TGV-KV** at the keep ratio above. **Presentation view**: the "
                "button under the slides (or the `p` key) fills the screen; `←` / `→` step through, `Esc` leaves.")
    with gr.Row():
        followup = gr.Textbox(label="Follow-up question about another region (asked on the evicted cache)",
                              placeholder="is there a red circle ?", scale=4, elem_id="lesson-followup")
        build_btn = gr.Button("Build the lesson", variant="primary", scale=1, elem_id="lesson-build")
    rows = load_lesson_examples()
    examples = None
    if rows:
        examples = gr.Examples([[e.path.as_posix(), e.question, e.followup, e.keep_percent] for e in rows],
                               [image, question, followup, keep], example_labels=[e.label for e in rows],
                               label="Lesson examples, chosen by rule from the evaluation (docs/lesson.md)",
                               cache_examples=False, elem_id="lesson-examples")
    deck = gr.HTML(PLACEHOLDER, elem_id="lesson-deck-html", css_template=DECK_CSS, apply_default_css=False,
                   js_on_load=DECK_JS + "\nlessonInit(element);\nwatch('value', () => lessonInit(element));")
    with gr.Row():
        export_btn = gr.Button("Export the lesson (HTML + PDF)", elem_id="lesson-export")
        export_md = gr.Markdown(label="lesson export summary")
    export_files = gr.File(label="Lesson files", file_count="multiple", interactive=False, elem_id="lesson-files")
    build_inputs = [image, question, followup, model, keep, max_new]
    on_build, built = wired(h["build"], Binding(LessonOutputs, lesson_state=state, deck=deck))
    gr.on([build_btn.click, followup.submit], on_build, build_inputs, built, api_name="lesson", **heavy)
    if examples is not None:  # a lesson example builds its lesson straight away
        examples.load_input_event.then(on_build, build_inputs, built, api_visibility="private", **heavy)
    on_export, exported = wired(h["export"], Binding(ExportOutputs, files=export_files, summary=export_md))
    export_btn.click(on_export, [state], exported, api_name="export_lesson")


__all__ = ["build", "lesson_input", "export_lesson", "make_lesson_handlers", "build_lesson_tab", "LessonState"]
