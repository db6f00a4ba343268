"""The app's handlers called directly (no server): values match the engine, validation speaks plainly, exports load.

Uses the bundled demo model; a missing assets/demo-vlm is a failure, not a skip.
"""
from __future__ import annotations

import copy
import html
import json
import struct
import threading
import zlib

import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image

import gradio as gr
from tgvkv import POLICIES, RunOptions, Trace, compare
from tgvkv.loading import DEMO_MODEL_DIR
from analysis.webapp import display as D
from analysis.webapp import handlers as H
from analysis.webapp import inputs as I
from analysis.webapp import state as S
from analysis.webapp import views as V
from analysis.webapp import models as M
from analysis.webapp.examples import load_examples
from analysis.webapp.export import export_run
from analysis.webapp.outputs import DiagnosticsOutputs, ExportOutputs, MethodsOutputs, RunOutputs

POLICY = M.ModelPolicy()


def demo_example():
    assert (DEMO_MODEL_DIR / "config.json").is_file(), f"the bundled demo model is missing at {DEMO_MODEL_DIR}"
    ex = load_examples("scene")
    assert ex, "assets/examples/examples.json lists no scenes"
    return ex[0]


@pytest.fixture(scope="module")
def example():
    return demo_example()


@pytest.fixture(scope="module")
def run(example):
    return H.run_comparison(Image.open(example.path), example.question, M.DEMO, "tgv-kv", 10, 24, POLICY)


def assert_traces_equal(a: Trace, b: Trace) -> None:
    ma, aa = a.to_parts()
    mb, ab = b.to_parts()
    skip = {"timings"}
    assert {k: v for k, v in ma.items() if k not in skip} == {k: v for k, v in mb.items() if k not in skip}
    assert sorted(aa) == sorted(ab)
    for k in aa:
        np.testing.assert_array_equal(aa[k], ab[k], err_msg=k)


# -- values ------------------------------------------------------------------------------------------------------------
def test_answers_equal_engine_output(run, example):
    loaded = M.get_model(M.DEMO, POLICY)
    ref = compare(loaded.model, loaded.processor, [Image.open(example.path).convert("RGB")], example.question, "tgv-kv",
                  0.10, 24, options=RunOptions(max_new_tokens=24, seed=0), capture=S.CAPTURE, model_name="demo")
    assert run.full.output_text == ref.full.text and run.evicted.output_text == ref.evicted.text
    np.testing.assert_array_equal(run.evicted.output_ids, ref.evicted.token_ids)
    np.testing.assert_array_equal(run.evicted.kept_mask, ref.evicted.trace.kept_mask)
    np.testing.assert_allclose(run.step_kl, ref.step_kl, rtol=1e-5, atol=1e-7)
    assert run.first_divergence == ref.first_divergence
    assert "".join(run.full_pieces).strip() == run.full.output_text
    # the demo model answers its own test scene correctly with the full cache
    assert run.full.output_text == example.answer


def test_same_inputs_give_identical_runs(run, example):
    again = H.run_comparison(Image.open(example.path), example.question, M.DEMO, "tgv-kv", 10, 24, POLICY)
    assert_traces_equal(run.evicted, again.evicted)
    assert_traces_equal(run.full, again.full)
    np.testing.assert_array_equal(run.step_kl, again.step_kl)


def test_summary_and_metrics_match_trace(run):
    s = H.summary(run)
    e, f = run.evicted, run.full
    assert s["evicted"]["kv_bytes_kept"] == int(e.kv_bytes_kept.sum())
    assert s["full"]["kv_bytes_kept"] == int(f.kv_bytes_full.sum()) > s["evicted"]["kv_bytes_kept"]
    assert s["evicted"]["kv_bytes_final"] == int(e.kv_bytes_final.sum())
    assert s["prompt_tokens"] == e.seq_len and s["vision_tokens"] == e.layout.n_vision
    assert s["evicted"]["kept_tokens_per_layer"] == e.budgets.tolist()
    assert s["evicted"]["answer"] == e.output_text and s["step_kl"] == [float(x) for x in run.step_kl]
    assert s["keep_ratio"] == pytest.approx(0.10) and s["method"] == "tgv-kv" and s["seed"] == 0
    json.dumps(s)  # JSON-able for the API
    md = H.metrics_markdown(run)
    assert D.fmt_bytes(int(e.kv_bytes_kept.sum())) in md and D.fmt_bytes(int(f.kv_bytes_kept.sum())) in md
    assert f"{e.seq_len} ({e.layout.n_vision})" in md
    assert f"{e.timings['prefill_s'] * 1e3:.1f} ms" in md


def test_answer_html_marks_divergence(run):
    full, ev = H.answer_html(run, "full"), H.answer_html(run, "evicted")
    assert "Full KV cache" in full and "10% of KV kept" in ev
    n_div = 0 if run.first_divergence is None else len(run.evicted_pieces) - run.first_divergence
    assert ev.count('class="tok div"') == n_div
    assert D.fmt_bytes(int(run.evicted.kv_bytes_kept.sum())) in ev


def test_diagnostics_render_from_trace(run, example):
    d = H.diagnostics(run)
    L = run.num_layers
    assert d["layer"] == run.default_layer() and 0 <= d["layer"] < L
    assert isinstance(d["overlay"], Image.Image) and d["overlay"].size == (480, 480)  # 96x96 scene, square panel
    for k in ("budgets", "attention", "neighbours", "accumulated"):
        assert isinstance(d[k], go.Figure) and d[k].data, k
        assert "What to notice" in d[k + "_caption"], k
    assert "What to notice" in d["overlay_caption"]
    e = d["explain"]
    assert "TVB" in e["tvb"] and "TWR" in e["twr"] and "TPR" in e["tpr"] and e["tpr_image"].size == (480, 480)
    # the explanation quotes the policy's own numbers
    best = int(np.argmax(run.evicted.selection_info["tvb_mass"]))
    assert f"**Layer {best}**" in e["tvb"] and f"keeps **{run.evicted.budgets[best]}** tokens" in e["tvb"]
    img, cap = H.overlay_view(run, 0, "all layers")
    assert img.size == (480, 480) and "layers keeping each patch" in cap
    fig, cap = H.attention_view(run, L - 1)
    assert isinstance(fig, go.Figure) and f"Layer {L - 1}" in cap


def test_overlay_shows_kept_patches(run):
    """Kept cells keep their pixels; evicted ones are washed to grey (checked on the layer's kept mask)."""
    layer = run.default_layer()
    img, _ = H.overlay_view(run, layer, "layer")
    px = np.asarray(img.convert("RGB"), dtype=float)
    lay = run.evicted.layout
    rows, cols = lay.views[0].rows, lay.views[0].cols
    kept = run.evicted.kept_mask[layer][lay.token_map.positions].reshape(rows, cols)
    cell = 480 // cols
    centre = px[cell // 2 :: cell, cell // 2 :: cell][:rows, :cols]  # (rows, cols, 3) cell-centre colours
    grey = np.abs(centre - centre.mean(axis=2, keepdims=True)).max(axis=2) < 12
    assert grey[~kept].all()


def test_explain_for_other_methods_recomputes_tgv_quantities(example):
    run = H.run_comparison(Image.open(example.path), example.question, M.DEMO, "h2o", 20, 8, POLICY)
    e = H.diagnostics(run)["explain"]
    assert "would" in e["intro"] and e["tvb_figure"] is not None and e["twr_figure"] is not None


def test_export_round_trip(run, tmp_path):
    files = export_run(run, tmp_path)
    names = {p.name for p in files}
    assert {"trace-tgv-kv-keep10.npz", "trace-tgv-kv-keep10.json", "trace-full.npz", "run_card-tgv-kv-keep10.json",
            "tgvkv-tgv-kv-keep10.zip"} <= names
    for fig in ("kl_per_step", "overlay", "budgets", "attention", "neighbours", "accumulated"):
        assert {f"{fig}.png", f"{fig}.svg"} <= names, fig
    assert_traces_equal(Trace.load(tmp_path / "trace-tgv-kv-keep10.npz"), run.evicted)
    assert_traces_equal(Trace.load(tmp_path / "trace-tgv-kv-keep10.json"), run.evicted)
    assert_traces_equal(Trace.load(tmp_path / "trace-full.npz"), run.full)
    card = json.loads((tmp_path / "run_card-tgv-kv-keep10.json").read_text())
    assert card["method"] == "tgv-kv" and card["keep_ratio"] == pytest.approx(0.1) and card["seed"] == 0
    assert card["model"] == M.DEMO and card["budget_tokens_per_layer"] == run.evicted.budgets.tolist()
    assert {"torch", "transformers", "gradio", "tgvkv"} <= set(card["versions"])
    assert card["results"]["evicted"]["answer"] == run.evicted.output_text
    with Image.open(tmp_path / "overlay.png") as im:
        assert im.size[0] > 100


def test_ui_handlers_return_every_output(run, example):
    h = H.make_ui_handlers(POLICY)
    out = h["run"](str(example.path), example.question, M.DEMO, "tgv-kv", 10, 24)
    assert isinstance(out, RunOutputs) and all(v is not None for v in out.values())
    state = out.run_state
    assert isinstance(state, H.RunState) and state.evicted.output_text == run.evicted.output_text
    assert out.summary == H.summary(state) and isinstance(out.kl_plot, go.Figure) and "What to notice" in out.kl_caption
    assert out.full_answer == H.answer_html(state, "full") and out.metrics == H.metrics_markdown(state)
    diag = h["diagnostics"](state)
    assert isinstance(diag, DiagnosticsOutputs) and isinstance(diag.overlay_image, Image.Image)
    assert diag.overlay_caption == H.overlay_view(state, state.default_layer())[1]
    assert all(v is not None for v in diag.values())
    exported = h["export"](state)
    assert any(f.endswith(".npz") for f in exported.files) and "Exported" in exported.summary
    methods = h["compare_methods"](str(example.path), example.question, M.DEMO, "tgv-kv", "random", 10, 8, None)
    assert isinstance(methods.comparison_plot, go.Figure) and "Jaccard" in methods.table and "random" in methods.table


def test_sessions_do_not_share_state(example):
    """Two sessions' states are independent objects; deep copies (what gr.State does) are equal and separate."""
    ex2 = load_examples("scene")[1]
    a = H.run_comparison(Image.open(example.path), example.question, M.DEMO, "tgv-kv", 10, 8, POLICY)
    b = H.run_comparison(Image.open(ex2.path), ex2.question, M.DEMO, "tgv-kv", 50, 8, POLICY)
    assert a.question != b.question and a.evicted is not b.evicted and a.keep_ratio != b.keep_ratio
    c = copy.deepcopy(a)
    assert_traces_equal(c.evicted, a.evicted)
    c.evicted.kept_mask[:] = False
    assert a.evicted.kept_mask.any()


def test_concurrent_requests_match_sequential(example):
    """The shared model is used under its lock: parallel requests give the sequential results."""
    exs = load_examples("scene")[:3]
    seq = [H.run_comparison(Image.open(e.path), e.question, M.DEMO, "snapkv", 20, 8, POLICY).evicted.output_ids for e in exs]
    par: dict[int, np.ndarray] = {}

    def work(i, e):
        par[i] = H.run_comparison(Image.open(e.path), e.question, M.DEMO, "snapkv", 20, 8, POLICY).evicted.output_ids

    threads = [threading.Thread(target=work, args=(i, e)) for i, e in enumerate(exs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(exs)):
        np.testing.assert_array_equal(par[i], seq[i])


def test_method_choices_follow_the_registry():
    names = [v for _, v in I.method_choices()]
    assert sorted(names) == sorted(POLICIES) and names[0] == "tgv-kv"


# -- validation --------------------------------------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): enough to trip the size checks."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "I;16", "L", "1"])
def test_image_modes_become_rgb(mode):
    im = Image.new(mode, (20, 12))
    out = I.check_image(im)
    assert out.mode == "RGB" and out.size == (20, 12)


def test_large_images_are_downscaled():
    out = I.check_image(Image.new("RGB", (I.MAX_SIDE * 2, I.MAX_SIDE)))
    assert max(out.size) == I.MAX_SIDE


@pytest.mark.parametrize("content, message", [
    (b"this is not an image", "not a readable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "not a readable image"),
    ("huge", "too large"),
    ("truncated", "corrupt or truncated"),
])
def test_bad_image_files(tmp_path, content, message):
    path = tmp_path / "upload.png"
    if content == "huge":
        content = _png_header(9_000, 9_000)  # 81 MP: above our 64 MP limit, below PIL's bomb guard
    elif content == "truncated":
        Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
        content = path.read_bytes()[:60]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        I.check_image(str(path))


@pytest.mark.parametrize("args, message", [
    ((None, "q ?", 10, 8), "upload an image"),
    (("img", "   ", 10, 8), "type a question"),
    (("img", "x" * (I.MAX_QUESTION_CHARS + 1), 10, 8), "too long"),
    (("img", "what is <image> here ?", 10, 8), "image placeholder"),
    (("img", "q ?", 4, 8), "between 5% and 100%"),
    (("img", "q ?", 101, 8), "between 5% and 100%"),
    (("img", "q ?", float("nan"), 8), "between 5% and 100%"),
    (("img", "q ?", "lots", 8), "number of percent"),
    (("img", "q ?", 10, 0), "from 1 to"),
    (("img", "q ?", 10, I.MAX_NEW_TOKENS_UI + 1), "from 1 to"),
    (("img", "q ?", 10, 2.5), "from 1 to"),
])
def test_input_validation_messages(example, args, message):
    image, question, keep, n = args
    image = Image.open(example.path) if image == "img" else image
    h = H.make_ui_handlers(POLICY)
    with pytest.raises(gr.Error, match=message):
        h["run"](image, question, M.DEMO, "tgv-kv", keep, n)


def test_unknown_method(example):
    with pytest.raises(ValueError, match="unknown method"):
        H.run_comparison(Image.open(example.path), "q ?", M.DEMO, "no-such-method", 10, 8, POLICY)


@pytest.mark.parametrize("name, message", [
    ("nobody/no-such-model-xyz", "cannot reach the Hugging Face Hub|could not load"),
    ("/etc", "local model folders are disabled"),
    ("../assets/demo-vlm", "local model folders are disabled"),
    (str(DEMO_MODEL_DIR), "local model folders are disabled"),
    ("not a model id!", "neither the demo model nor a hub id"),
    ("", "no model chosen"),
])
def test_model_names_a_visitor_cannot_use(example, name, message):
    with pytest.raises(ValueError, match=message):
        H.run_comparison(Image.open(example.path), "q ?", name, "tgv-kv", 10, 8, POLICY)


def test_local_folder_with_operator_flag(tmp_path, example):
    from tiny_models import tiny_llava

    model, proc = tiny_llava(image_size=32, layers=2)
    model.save_pretrained(tmp_path / "tiny")
    proc.save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError, match="disabled"):
        M.resolve_source(str(tmp_path / "tiny"), POLICY)
    allowed = M.ModelPolicy(allow_local=True)
    with pytest.raises(ValueError, match="no config.json"):
        M.resolve_source(str(tmp_path), allowed)
    try:
        run = H.run_comparison(Image.open(example.path), "what is the colour ?", str(tmp_path / "tiny"), "tgv-kv", 50,
                               4, allowed)
        assert run.evicted.num_layers == 2 and run.source == str((tmp_path / "tiny").resolve())
    finally:
        M.clear_cache()


def test_remote_code_is_never_enabled_by_visitors():
    assert M.ModelPolicy().trust_remote_code is False
    import inspect

    assert "trust" not in " ".join(inspect.signature(H.run_comparison).parameters)


def test_dtype_choice_per_device_and_checkpoint(monkeypatch, tmp_path):
    import torch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert M.pick_dtype("llava-hf/llava-1.5-7b-hf", cpu, "auto") == "float32"
    assert M.pick_dtype(str(DEMO_MODEL_DIR), cpu, "auto") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert M.pick_dtype("llava-hf/llava-1.5-7b-hf", cuda, "auto") == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    assert M.pick_dtype(str(tmp_path), cuda, "auto") == "float32"  # small fp32 checkpoints (the demo) stay exact
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float16"}))
    assert M.pick_dtype(str(tmp_path), cuda, "auto") == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert M.pick_dtype("llava-hf/llava-1.5-7b-hf", cuda, "auto") == "float16"
    assert M.pick_dtype("llava-hf/llava-1.5-7b-hf", cuda, "bfloat16") == "bfloat16"  # an explicit choice wins


def test_unreachable_hub_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(M, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(ValueError, match="no connection to huggingface.co"):
        M.get_model("llava-hf/llava-1.5-7b-hf", POLICY)


# -- figures say what they show (issue 15) -----------------------------------------------------------------------------
def _long_answer(run, n: int = 64, divergence: int = 37):
    """The run with a made-up n-token answer whose last token is the end-of-sequence token (decodes to nothing)."""
    import dataclasses

    eos = M.get_model(M.DEMO, POLICY).processor.tokenizer.eos_token
    full = copy.deepcopy(run.full)
    full.output_tokens = [f"w{i}" for i in range(n - 2)] + ["\n", eos]
    pieces = [f" w{i}" for i in range(n - 2)] + ["\n", ""]
    kl = np.linspace(0.0, 2.0, n)
    return dataclasses.replace(run, full=full, full_pieces=pieces, step_kl=kl, first_divergence=divergence), eos


def test_kl_axis_is_readable_on_long_answers(run):
    long, eos = _long_answer(run)
    fig = H.kl_figure(long)
    ax = fig.layout.xaxis
    shown = list(ax.tickvals)
    assert len(shown) <= D.KL_MAX_LABELS + 1 and 37 in shown and shown[0] == 0
    labels = [D.token_label(p, t) for p, t in zip(long.full_pieces, long.full.output_tokens)]
    assert list(ax.ticktext) == [html.escape(f"{i}:{D._short(labels[i])}") for i in shown]
    assert ax.tickangle == -45
    bar = fig.data[0]
    assert bar.customdata[-1] == html.escape(eos) and bar.customdata[-2] == "\\n" and bar.customdata[5] == "w5"
    assert "␣" not in "".join(bar.customdata) + "".join(ax.ticktext)
    assert list(bar.marker.color[:37]) == [palette_mod().AGREE] * 37
    assert set(bar.marker.color[37:]) == {palette_mod().DIVERGED}
    assert [D.token_label(p) for p in (" yes", " ", "\t", "")] == ["yes", "(space)", "\\t", "(empty)"]


def palette_mod():
    from analysis import palette

    return palette


def test_kl_labels_of_the_real_run_name_the_end_token(run):
    eos = M.get_model(M.DEMO, POLICY).processor.tokenizer.eos_token
    fig = H.kl_figure(run)
    labels = [html.unescape(x) for x in fig.data[0].customdata]  # escaped: plotly would read '</s>' as markup
    assert labels == D.answer_labels(run)[: len(run.step_kl)]
    assert [p.strip() for p in run.full_pieces if p.strip()] == [x for x in labels if x != eos]
    if run.full.output_tokens[-1] == eos:  # the answer ended with the end-of-sequence token: shown by its name
        assert labels[-1] == eos
    assert list(fig.layout.xaxis.tickvals) == list(range(len(run.step_kl)))  # short answers: every token labelled


def test_export_kl_figure_thins_labels(run):
    from analysis.webapp.export import kl_figure_mpl

    long, eos = _long_answer(run)
    ax = kl_figure_mpl(long, max_labels=24).axes[0]
    texts = [t.get_text() for t in ax.get_xticklabels()]
    assert len(texts) <= 25 and "37:w37" in texts and "0:w0" in texts
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["before the answers part",
                                                                   "from the first differing token on"]


def test_captions_name_the_drawn_colours(run):
    from analysis import compute_accumulated
    from analysis import palette as P

    _, cap = H.overlay_view(run, run.default_layer(), "layer")
    assert f"{P.name_of(P.HIGHLIGHT)} boxes: the 5 patches" in cap and f"{P.name_of(P.KEPT)} outline" in cap
    assert "red boxes" not in cap and f'color:{P.HIGHLIGHT}' in cap
    _, cap = H.overlay_view(run, 0, "all layers")
    assert "colour from dark purple to yellow" in cap and f"of the {run.num_layers} layers keep the patch" in cap
    _, cap = V.accumulated_view(run)
    rows = [label for label, _ in compute_accumulated(run.evicted).eviction_rows()]
    assert rows == [run.method, "attention-only"]
    assert f"{run.method}'s own evictions are the top row" in cap and "bottom row of the lower panel" in cap
    assert "row below" not in cap
    _, cap = H.attention_view(run, 0)
    assert "colour from dark blue to yellow: log10" in cap and f"{P.name_of(P.BOUNDARY)} line: boundaries" in cap
    _, cap = V.neighbours_view(run)
    assert f"{P.name_of(P.TEXT)} line: text tokens' neighbours" in cap and f"{P.name_of(P.VISION)} (vision)" in cap
    _, cap = V.budgets_view(run)
    assert f"{P.name_of(P.TEXT)} bars: text kept" in cap and f"{P.name_of(P.VISION)} bars: vision kept" in cap
    cap = H.kl_caption(run)
    if run.first_divergence is not None:
        assert f"{P.name_of(P.AGREE)} bars before it, {P.name_of(P.DIVERGED)} bars from there on" in cap
    e = H.diagnostics(run)["explain"]
    assert f"({P.name_of(P.HIGHLIGHT)} boxes)" in e["tpr"] and "red boxes" not in e["tpr"]
    assert f"the {P.name_of(P.VISION)} bars (attention share)" in e["tvb"]


def test_overlay_mode_and_layer_survive_a_rerun(run, example):
    """'all layers' stays 'all layers' after a settings change re-runs the comparison (handler level)."""
    h = H.make_ui_handlers(POLICY)
    state = h["rerun"](run, str(example.path), example.question, M.DEMO, "tgv-kv", 20, 24).run_state
    assert isinstance(state, H.RunState) and state.keep_ratio == pytest.approx(0.2)
    out = h["diagnostics_if_run"](state, "all layers", 1)
    slider, img, cap = out.overlay_layer, out.overlay_image, out.overlay_caption
    assert slider.value == 1
    want_img, want_cap = H.overlay_view(state, 1, "all layers")
    assert cap == want_cap and "layers keeping each patch" in cap
    np.testing.assert_array_equal(np.asarray(img), np.asarray(want_img))
    out = h["diagnostics_if_run"](state, "all layers", 99)  # a layer the model does not have: the default layer
    assert out.overlay_layer.value == state.default_layer() and "layers keeping each patch" in out.overlay_caption
    out = h["diagnostics"](state, "all layers")  # a new run starts at the default layer, in the visitor's mode
    assert out.overlay_layer.value == state.default_layer() and "layers keeping each patch" in out.overlay_caption
    assert "keeps" in h["diagnostics"](state, "layer").overlay_caption
    with pytest.raises(gr.Error, match="overlay mode must be one of"):
        h["overlay"](state, 0, "every layer")


def test_failed_run_clears_every_output():
    """The failure handler names every run, diagnostics and export output, what app.py wires gets them on the right
    components, and nothing of an earlier run is left."""
    import app

    h = H.make_ui_handlers(POLICY)
    run, diag, export = h["run_failed"]()
    demo = app.build_ui(POLICY)
    wired = [f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_run_failed"]
    # run + diagnostics of each entry point: the Run button, both example sets, a settings change
    assert len(wired) == 8 and all(f.trigger_only_on_failure for f in wired)
    names = RunOutputs.names() + DiagnosticsOutputs.names() + ExportOutputs.names()
    assert all(len(f.outputs) == len(names) == 29 for f in wired)
    on_page = {name: (getattr(c, "label", None), value)
               for name, c, value in zip(names, wired[0].outputs, wired[0].fn())}  # what the page receives
    assert run.run_state is None and run.summary is None and on_page["run_state"][1] is None
    assert on_page["full_answer"] == ("full answer", run.full_answer)
    assert on_page["evicted_answer"] == ("evicted answer", run.evicted_answer)
    assert H.FAILED_NOTE in run.full_answer and H.FAILED_NOTE in run.evicted_answer
    assert 'class="tok' not in run.full_answer + run.evicted_answer
    assert isinstance(run.kl_plot, go.Figure) and not run.kl_plot.data
    assert H.FAILED_NOTE in run.kl_caption and H.FAILED_NOTE in run.metrics
    assert [on_page[n][0] for n in ("overlay_layer", "attention_layer", "compare_layer")] == [
        "Overlay layer", "Attention layer", "Layer for the overlays"]
    assert diag.overlay_layer == diag.attention_layer == diag.compare_layer == gr.skip()  # sliders stay put
    for name in DiagnosticsOutputs.names()[3:]:
        value = getattr(diag, name)
        if isinstance(value, go.Figure):
            assert not value.data, name
        elif isinstance(value, str):
            assert value == "" or H.FAILED_NOTE in value, name
        else:
            assert value is None, name
    assert export == ExportOutputs(files=None, summary=f"*{H.FAILED_NOTE}.*") and on_page["files"][0] == "Files"
    cmp = [f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_compare_failed"]
    assert len(cmp) == 1 and len(cmp[0].outputs) == len(MethodsOutputs.names()) == 3
    assert isinstance(h["compare_failed"](), MethodsOutputs) and H.FAILED_NOTE in h["compare_failed"]().table
