"""The app's named API endpoints through gradio_client, against the app served on 127.0.0.1 (a free port).

Uses the bundled demo model; a missing assets/demo-vlm is a failure, not a skip.
"""
from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tgvkv import Trace
from tgvkv.loading import DEMO_MODEL_DIR
from analysis.webapp import handlers as H
from analysis.webapp import models as M
from analysis.webapp.examples import load_examples

ENDPOINTS = {"/compare", "/diagnostics", "/overlay", "/attention", "/compare_methods", "/export"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(policy: M.ModelPolicy = M.ModelPolicy()):
    """The real app (app.build_ui + app.launch) served from a thread; yields its URL."""
    import app

    assert (DEMO_MODEL_DIR / "config.json").is_file(), f"the bundled demo model is missing at {DEMO_MODEL_DIR}"
    demo = app.build_ui(policy)
    app.launch(demo, "127.0.0.1", free_port(), prevent_thread_lock=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def url():
    with running_app() as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


@pytest.fixture(scope="module")
def example():
    return load_examples("scene")[0]


def test_named_endpoints(client):
    info = client.view_api(return_format="dict", print_info=False)
    assert ENDPOINTS <= set(info["named_endpoints"])
    params = [p["parameter_name"] for p in info["named_endpoints"]["/compare"]["parameters"]]
    assert params == ["image", "question", "model_name", "method", "keep_percent", "max_new_tokens"]


def test_compare_diagnostics_export_over_the_api(client, example, tmp_path):
    from gradio_client import handle_file

    full_html, ev_html, kl, kl_cap, metrics, summary = client.predict(
        handle_file(str(example.path)), example.question, "demo", "tgv-kv", 10, 24, api_name="/compare")
    ref = H.run_comparison(Image.open(example.path), example.question, M.DEMO, "tgv-kv", 10, 24)
    assert summary["full"]["answer"] == ref.full.output_text == example.answer
    assert summary["evicted"]["answer"] == ref.evicted.output_text
    assert summary["evicted"]["token_ids"] == ref.evicted.output_ids.tolist()
    assert summary["evicted"]["kv_bytes_kept"] == int(ref.evicted.kv_bytes_kept.sum())
    assert summary["step_kl"] == pytest.approx(ref.step_kl.tolist(), rel=1e-5, abs=1e-7)
    assert kl["type"] == "plotly" and "What to notice" in kl_cap and "KV bytes after prefill" in metrics
    assert "10% of KV kept" in ev_html

    diag = client.predict(api_name="/diagnostics")
    assert len(diag) == 20
    layer = diag[0]["value"] if isinstance(diag[0], dict) else diag[0]
    assert layer == ref.default_layer()
    with Image.open(diag[3]) as im:
        assert im.size == (480, 480)
    img, cap = client.predict(0, "all layers", api_name="/overlay")
    with Image.open(img) as im:
        assert im.size == (480, 480)
    assert "layers keeping each patch" in cap
    fig, cap = client.predict(ref.num_layers - 1, api_name="/attention")
    assert fig["type"] == "plotly" and f"Layer {ref.num_layers - 1}" in cap

    files, md = client.predict(api_name="/export")
    paths = [f if isinstance(f, str) else f["path"] for f in files]
    npz = next(p for p in paths if Path(p).name == "trace-tgv-kv-keep10.npz")
    trace = Trace.load(npz)
    assert trace.output_text == summary["evicted"]["answer"] and trace.keep_ratio == pytest.approx(0.1)
    np.testing.assert_array_equal(trace.kept_mask, ref.evicted.kept_mask)
    assert trace.budgets.tolist() == summary["evicted"]["kept_tokens_per_layer"]


def test_compare_methods_endpoint(client, example):
    from gradio_client import handle_file

    fig, budgets, md = client.predict(handle_file(str(example.path)), example.question, "demo", "tgv-kv", "streamingllm",
                                      20, 8, 0, api_name="/compare_methods")
    assert fig["type"] == "plotly" and budgets["type"] == "plotly" and "streamingllm" in md and "Jaccard" in md


def test_errors_reach_the_client(client, example):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="type a question"):
        client.predict(handle_file(str(example.path)), "  ", "demo", "tgv-kv", 10, 8, api_name="/compare")
    with pytest.raises(AppError, match="local model folders are disabled"):
        client.predict(handle_file(str(example.path)), "q ?", "/etc", "tgv-kv", 10, 8, api_name="/compare")
    with pytest.raises(AppError, match="image placeholder"):
        client.predict(handle_file(str(example.path)), "a <image> b", "demo", "tgv-kv", 10, 8, api_name="/compare")


def test_non_image_upload_is_refused(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(AppError, match="not a readable image"):
        client.predict(handle_file(str(bad)), "q ?", "demo", "tgv-kv", 10, 8, api_name="/compare")


def test_sessions_are_separate(url, example):
    """Each client is a session: its overlay comes from its own run, and a new session has no run."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    a, b = Client(url, verbose=False), Client(url, verbose=False)
    ex2 = load_examples("scene")[1]
    sa = a.predict(handle_file(str(example.path)), example.question, "demo", "tgv-kv", 10, 8, api_name="/compare")[-1]
    sb = b.predict(handle_file(str(ex2.path)), ex2.question, "demo", "random", 50, 8, api_name="/compare")[-1]
    assert sa["question"] == example.question and sb["question"] == ex2.question
    _, cap_a = a.predict(0, "layer", api_name="/overlay")
    _, cap_b = b.predict(0, "layer", api_name="/overlay")
    assert "(tgv-kv)" in cap_a and "(random)" in cap_b
    with pytest.raises(AppError, match="run a comparison first"):
        Client(url, verbose=False).predict(0, "layer", api_name="/overlay")


def test_upload_size_limit(client, tmp_path):
    from gradio_client import handle_file

    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * (11 * 2**20))  # over the app's 10 MB upload limit
    with pytest.raises(Exception, match="(?i)too large|exceed|413|maximum"):
        client.predict(handle_file(str(big)), "q ?", "demo", "tgv-kv", 10, 8, api_name="/compare")


def test_local_model_folder_when_the_operator_allows_it(tmp_path, example):
    """`python app.py --allow-local-models`: a saved random-weight model folder can be typed into the model box."""
    from gradio_client import Client, handle_file
    from tiny_models import tiny_llava

    model, proc = tiny_llava(image_size=32, layers=2)
    model.save_pretrained(tmp_path / "tiny")
    proc.save_pretrained(tmp_path / "tiny")
    try:
        with running_app(M.ModelPolicy(allow_local=True)) as u:
            c = Client(u, verbose=False)
            summary = c.predict(handle_file(str(example.path)), "what is the colour ?", str(tmp_path / "tiny"),
                                "tgv-kv", 50, 4, api_name="/compare")[-1]
            assert summary["num_layers"] == 2 and summary["model"] == str(tmp_path / "tiny")
            diag = c.predict(api_name="/diagnostics")
            with Image.open(diag[3]) as im:
                assert im.size == (480, 480)
    finally:
        M.clear_cache()
