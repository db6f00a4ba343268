"""Issue 17: everything is checked before work starts, and no traceback reaches a user.

- CLI early refusals: exit 2, `error: <message naming the problem>` on stderr, the model never loaded, no output file.
- Broken model folders: `load_model` names the folder and the problem before any weights are read (CLI and app).
- `compare()` refuses a bad request before the full-KV run.
- `python -m analysis.figures` checks traces, images, formats, layer and output folder before rendering.
- Unexpected errors: one line with an error id for the user, the traceback in a file (CLI) or the server log (app).
- Layers that are never evicted (Gemma 3's sliding window): diagnostics open on an evicted layer, the budget chart
  marks the others.
docs/reliability.md lists every row with its exact message.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import random_image, save_tiny_llava, tiny_llava

import tgvkv
from tgvkv.cli import main as cli_main

QUESTION = "what is the colour of the circle ?"
REPO = Path(__file__).resolve().parent.parent


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli_main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("early")
    save_tiny_llava(root / "model")
    random_image(3, (40, 32)).save(root / "image.png")
    return root


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if the CLI gets as far as loading a model."""
    calls = []

    def refuse(*a, **kw):
        calls.append(a)
        raise AssertionError("the model was loaded although the request should have been refused first")

    monkeypatch.setattr(tgvkv, "load_model", refuse)
    return calls


def _expected_device_message(device: str) -> str:
    if device == "tpu9":
        return "unknown device 'tpu9'; use cpu, cuda, cuda:N or mps"
    if not torch.cuda.is_available():
        return "CUDA was requested but no GPU is available"
    n = torch.cuda.device_count()
    return f"device 'cuda:99' does not exist: this machine has {n} GPU(s), cuda:0 to cuda:{n - 1}"


#: (id, extra argv, exact message); {o} is the test's empty output folder
CLI_EARLY_ROWS = [
    ("trace-folder-missing", ["--trace", "{o}/missing/run.npz"],
     "--trace '{o}/missing/run.npz': the folder '{o}/missing' does not exist"),
    ("trace-wrong-suffix", ["--trace", "{o}/run.txt"], "--trace '{o}/run.txt': the file name must end in .json or .npz"),
    ("trace-is-a-folder", ["--trace", "{o}/folder.npz"], "--trace '{o}/folder.npz' is a folder; give a file name"),
    ("trace-parent-is-a-file", ["--trace", "{o}/file.txt/run.npz"],
     "--trace '{o}/file.txt/run.npz': '{o}/file.txt' is not a folder"),
    ("full-trace-wrong-suffix", ["--full-trace", "{o}/full.pt"],
     "--full-trace '{o}/full.pt': the file name must end in .json or .npz"),
    ("json-file-wrong-suffix", ["--json", "{o}/summary.txt"], "--json '{o}/summary.txt': the file name must end in .json"),
    ("json-folder-missing", ["--json", "{o}/nope/summary.json"],
     "--json '{o}/nope/summary.json': the folder '{o}/nope' does not exist"),
    ("trace-and-full-trace-same-file", ["--trace", "{o}/run.npz", "--full-trace", "{o}/./run.npz"],
     "--trace and --full-trace name the same file '{o}/./run.npz'"),
    ("device-unknown", ["--device", "tpu9"], _expected_device_message("tpu9")),
    ("device-missing-gpu", ["--device", "cuda:99"], _expected_device_message("cuda:99")),
    ("image-file-over-10-mib", ["--image", "{o}/big.png"],
     "big.png: the file is too large (10.5 MiB; the limit is 10 MiB, as for uploads to the app); downscale or "
     "recompress it first"),
]


@pytest.mark.parametrize("row_id,extra,message", CLI_EARLY_ROWS, ids=[r[0] for r in CLI_EARLY_ROWS])
def test_cli_refuses_before_loading(tiny, tmp_path, no_model_loading, row_id, extra, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "folder.npz").mkdir()
    (out_dir / "file.txt").write_text("x")
    (out_dir / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * (10 * 2**20 + 2**19))  # never decoded
    before = sorted(p.name for p in out_dir.rglob("*"))
    argv = ["run", "--model", str(tiny / "model"), "--image", str(tiny / "image.png"), "--question", QUESTION]
    extra = [e.format(o=out_dir) for e in extra]
    if "--image" in extra:
        argv[argv.index("--image") + 1] = extra[1]
        extra = []
    rc, out, err = _cli(argv + extra)
    assert (rc, out) == (2, "")
    assert err == f"error: {message.format(o=out_dir)}\n"
    assert no_model_loading == [] and sorted(p.name for p in out_dir.rglob("*")) == before


def test_cli_outputs_are_written_where_checked(tiny, tmp_path):
    rc, out, err = _cli(["run", "--model", str(tiny / "model"), "--image", str(tiny / "image.png"), "--question",
                         QUESTION, "--keep", "0.3", "--max-new-tokens", "3", "--trace", str(tmp_path / "e.json"),
                         "--full-trace", str(tmp_path / "f.npz"), "--json", str(tmp_path / "s.json")])
    assert rc == 0, err
    summary = json.loads((tmp_path / "s.json").read_text())
    evicted, full = tgvkv.Trace.load(tmp_path / "e.json"), tgvkv.Trace.load(tmp_path / "f.npz")
    assert summary["evicted"]["answer"] == evicted.output_text and summary["full"]["answer"] == full.output_text
    assert summary["images"] == [{"size": [40, 32], "sha256": evicted.image_sha256[0]}]
    assert out.splitlines()[-3:] == [f"written: {tmp_path / n}" for n in ("e.json", "f.npz", "s.json")]


def test_cli_refusal_in_a_fresh_process(tiny, tmp_path):
    """The real command: exit 2, one line on stderr, no traceback, nothing written."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "tgvkv", "run", "--model", str(tiny / "model"), "--image",
                        str(tiny / "image.png"), "--question", QUESTION, "--device", "tpu9", "--trace",
                        str(tmp_path / "t.npz")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "error: unknown device 'tpu9'; use cpu, cuda, cuda:N or mps\n")
    assert list(tmp_path.iterdir()) == []


# -- broken model folders ------------------------------------------------------------------------------------------------
def _break(folder: Path, how: str) -> str:
    """Damage a copy of a good model folder; returns the problem part of the expected message."""
    weights = folder / "model.safetensors"
    if how == "truncated-weights":
        size = weights.stat().st_size
        with open(weights, "r+b") as f:
            f.truncate(size - 1000)
        return f"model.safetensors is truncated ({size - 1000:,} of {size:,} bytes; the download or copy is incomplete)"
    if how == "weights-cut-inside-header":
        weights.write_bytes(weights.read_bytes()[:100])
        n = int.from_bytes(weights.read_bytes()[:8], "little")
        return f"model.safetensors is truncated or not a safetensors file (header of {n:,} bytes, file of 100 bytes)"
    if how == "no-weights":
        weights.unlink()
        return "no weights inside (model.safetensors, pytorch_model.bin or a sharded index)"
    if how == "missing-shard":
        weights.rename(folder / "model-00001-of-00002.safetensors")
        index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                 "b": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        return ("1 of 2 weight files listed in model.safetensors.index.json are missing "
                "(model-00002-of-00002.safetensors)")
    if how == "no-tokenizer":
        (folder / "tokenizer.json").unlink()
        return ("no tokenizer inside (none of tokenizer.json, tokenizer.model, vocab.json, spiece.model, vocab.txt); "
                "copy the tokenizer files from the original model")
    if how == "no-processor-config":
        (folder / "processor_config.json").unlink()
        return "no image processor configuration inside (processor_config.json or preprocessor_config.json)"
    config = json.loads((folder / "config.json").read_text())
    if how == "unknown-model-type":
        config["model_type"] = "llava_9000"
        (folder / "config.json").write_text(json.dumps(config))
        import transformers

        return (f"unknown architecture: model_type 'llava_9000' is not known to this transformers "
                f"{transformers.__version__} (a newer transformers may know it)")
    if how == "no-model-type":
        del config["model_type"]
        (folder / "config.json").write_text(json.dumps(config))
        return "config.json names no model_type, so the architecture is unknown"
    if how == "config-not-json":
        (folder / "config.json").write_text("{ not json")
        return "config.json is not readable JSON (Expecting property name enclosed in double quotes: line 1 column 3 " \
               "(char 2))"
    raise AssertionError(how)


BROKEN = ["truncated-weights", "weights-cut-inside-header", "no-weights", "missing-shard", "no-tokenizer",
          "no-processor-config", "unknown-model-type", "no-model-type", "config-not-json"]


@pytest.fixture
def no_weights_read(monkeypatch):
    import transformers

    calls = []
    original = transformers.AutoModelForImageTextToText.from_pretrained.__func__

    def spy(cls, *a, **kw):
        calls.append(a)
        return original(cls, *a, **kw)

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", classmethod(spy))
    return calls


@pytest.mark.parametrize("how", BROKEN)
def test_broken_model_folder_cli(tiny, tmp_path, no_weights_read, how):
    folder = tmp_path / "broken"
    shutil.copytree(tiny / "model", folder)
    problem = _break(folder, how)
    rc, out, err = _cli(["run", "--model", str(folder), "--image", str(tiny / "image.png"), "--question", QUESTION,
                         "--trace", str(tmp_path / "t.npz")])
    assert (rc, out, err) == (2, "", f"error: could not load local folder {str(folder)!r}: {problem}\n")
    assert no_weights_read == [] and not (tmp_path / "t.npz").exists()


@pytest.mark.parametrize("how", ["truncated-weights", "no-tokenizer", "unknown-model-type"])
def test_broken_model_folder_app(tiny, tmp_path, how):
    import gradio as gr

    from analysis.webapp import handlers as H
    from analysis.webapp import models as M

    folder = tmp_path / "broken"
    shutil.copytree(tiny / "model", folder)
    problem = _break(folder, how)
    h = H.make_ui_handlers(M.ModelPolicy(allow_local=True))
    try:
        with pytest.raises(gr.Error) as info:
            h["run"](str(tiny / "image.png"), QUESTION, str(folder), "tgv-kv", 50, 4)
        assert info.value.message == f"could not load local folder {str(folder.resolve())!r}: {problem}"
        summary = h["run"](str(tiny / "image.png"), QUESTION, str(tiny / "model"), "tgv-kv", 50, 4).summary
        assert summary["full"]["token_ids"]  # the next good request answers
    finally:
        M.clear_cache()


# -- compare(): everything before the full-KV run ----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    ({"keep_ratio": 1.5}, "keep_ratio must be in (0, 1] (fraction of the KV cache retained), got 1.5"),
    ({"keep_ratio": "half"}, "keep_ratio must be a number in (0, 1], got 'half'"),
    ({"policy": "best"}, None),
    ({"policy_options": {"sinks": "4"}}, None),
    ({"question": "what <image> ?"}, None),
    ({"images": ["not an image"]}, "expected an image, got str"),
], ids=["keep-1.5", "keep-text", "unknown-method", "bad-option", "typed-image-token", "image-not-pil"])
def test_compare_refuses_before_the_full_run(monkeypatch, kwargs, message):
    import tgvkv.generation as G

    model, processor = tiny_llava(seed=1)
    runs = []
    monkeypatch.setattr(G, "generate", lambda *a, **kw: runs.append(a))
    args = {"images": [random_image(1)], "question": QUESTION, "policy": "tgv-kv", "keep_ratio": 0.5, **kwargs}
    with pytest.raises(ValueError) as info:
        G.compare(model, processor, **args)
    if message is not None:
        assert str(info.value) == message
    assert runs == []


# -- unexpected errors: an id, no traceback --------------------------------------------------------------------------
def test_cli_unexpected_error_gets_an_id(tiny, tmp_path, monkeypatch):
    import tgvkv.errors as E

    monkeypatch.setattr(E, "ERROR_REPORT_DIR", tmp_path / "reports")

    def broken_compare(*a, **kw):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(tgvkv, "compare", broken_compare)
    rc, out, err = _cli(["run", "--model", str(tiny / "model"), "--image", str(tiny / "image.png"), "--question",
                         QUESTION])
    reports = list((tmp_path / "reports").iterdir())
    assert rc == 1 and out == "" and len(reports) == 1
    error_id = reports[0].stem
    assert err.splitlines()[-1] == (f"error: unexpected RuntimeError: kernel exploded (error id {error_id}; the "
                                    f"traceback is in {reports[0]}; please report it)")
    assert "Traceback" not in err and "second line" not in err
    text = reports[0].read_text()
    assert "Traceback (most recent call last)" in text and "kernel exploded" in text and "broken_compare" in text


def test_app_unexpected_error_gets_an_id(monkeypatch, caplog, tiny):
    import gradio as gr

    from analysis.webapp import handlers as H
    from analysis.webapp import models as M

    def broken(*a, **kw):
        raise KeyError("internal detail")

    monkeypatch.setattr(H, "run_comparison", broken)
    h = H.make_ui_handlers(M.ModelPolicy())
    with caplog.at_level("ERROR", logger=H.log.name), pytest.raises(gr.Error) as info:
        h["run"](str(tiny / "image.png"), QUESTION, "demo", "tgv-kv", 50, 4)
    record = next(r for r in caplog.records if r.name == H.log.name)
    error_id = record.args[0]
    assert info.value.message == H.unexpected_message(error_id)
    assert info.value.message.startswith(f"something went wrong on the server (error id {error_id});")
    assert "internal detail" not in info.value.message and record.exc_info[0] is KeyError


# -- figures: inputs checked before rendering ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def traces(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("figure_inputs")
    model, processor = tgvkv.load_model(tiny / "model", tgvkv.LoadOptions(device="cpu"))
    image = tgvkv.load_image(tiny / "image.png")
    for name, q in (("a.npz", QUESTION), ("b.npz", "what shape is in the top left corner of the picture ?")):
        tgvkv.generate(model, processor, [image], q, "tgv-kv", 0.5, 3).trace.save(d / name)
    (d / "garbage.npz").write_bytes(b"garbage")
    (d / "text.png").write_text("not an image")
    return d


def _figures(argv: list[str]) -> tuple[int, str]:
    from analysis.figures import main

    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


def test_figures_refuse_bad_inputs_before_rendering(tiny, traces, tmp_path):
    from analysis.figures import matplotlib_formats

    a, b = tgvkv.Trace.load(traces / "a.npz"), tgvkv.Trace.load(traces / "b.npz")
    assert a.seq_len != b.seq_len
    formats = ", ".join(sorted(matplotlib_formats()))
    rows = [
        (["--compare", str(traces / "b.npz")],
         f"--compare 'b.npz' is not a run on the same input as --trace 'a.npz': it has a prompt of {b.seq_len} "
         f"tokens, not {a.seq_len}; compare traces of the same image, question and model"),
        (["--image", str(tiny / "image.png"), str(tiny / "image.png")],
         "--image: the trace was run on 1 image(s), got 2 file(s); give the prompt's images in order, or none"),
        (["--image", str(traces / "text.png")], "text.png: not a readable image (UnidentifiedImageError)"),
        (["--formats", "png,bmp"], f"--formats: unknown format 'bmp'; choose from {formats}"),
        (["--layer", "99"], f"--layer must be between 0 and {a.num_layers - 1} for this trace, got 99"),
        (["--formats", "", "--top-k", "3"], "nothing to write: --formats is empty and --html is off"),
        (["--top-k", "0"], "--top-k must be at least 1, got 0"),
    ]
    out = tmp_path / "figs"
    for extra, message in rows:
        rc, err = _figures(["--trace", str(traces / "a.npz"), "--out", str(out), *extra])
        assert (rc, err.splitlines()[-1]) == (2, f"error: {message}"), extra
        assert "Traceback" not in err and not out.exists()
    for trace, message in ((traces / "garbage.npz", "could not load trace 'garbage.npz': not an .npz archive"),
                           (tiny / "image.png", "could not load trace 'image.png': trace path must end in .npz or "
                                                ".json, got 'image.png'")):
        rc, err = _figures(["--trace", str(trace), "--out", str(out)])
        assert (rc, err.splitlines()[-1]) == (2, f"error: {message}")
    (tmp_path / "file").write_text("x")
    rc, err = _figures(["--trace", str(traces / "a.npz"), "--out", str(tmp_path / "file")])
    assert (rc, err.splitlines()[-1]) == (2, f"error: --out {str(tmp_path / 'file')!r} is a file, not a folder")
    rc, err = _figures(["--trace", str(traces / "a.npz"), "--out", str(out), "--image", str(tiny / "image.png")])
    assert rc == 0 and (out / "budgets.png").is_file() and "not the pixels" not in err


# -- layers that are never evicted (Gemma 3) -----------------------------------------------------------------------------
def test_never_evicted_layers_are_not_the_default_and_are_marked():
    from tiny_families import tiny_gemma3

    from analysis import compute_budgets, explain
    from analysis.plots_mpl import plot_budgets as mpl_budgets
    from analysis.plots_plotly import plot_budgets as plotly_budgets

    model, processor = tiny_gemma3(layers=4)
    trace = tgvkv.generate(model, processor, [random_image(2, (32, 32))], QUESTION, "tgv-kv", 0.3, 2).trace
    evictable = trace.evictable_layers()
    assert evictable.tolist() == [False, True, False, True]  # sliding / full attention alternate
    assert trace.budgets[0] == trace.seq_len > trace.budgets[1]  # a sliding layer keeps its whole prompt
    layer = trace.largest_evicted_layer()
    b = trace.budgets
    assert evictable[layer] and b[layer] == max(b[1], b[3]) and layer == (3 if b[3] >= b[1] else 1)
    data = compute_budgets([trace])
    assert data.never_evicted.tolist() == [True, False, True, False]
    caption = explain.budgets(data)
    most = 1 if b[1] >= b[3] else 3  # the caption names the first of equal budgets, the default view the deepest
    assert f"layer {most} gets most" in caption and caption.endswith("; 2 of 4 layers are never evicted (grey: 0, 2)")
    fig = plotly_budgets(data)
    shapes = [(s.x0, s.x1) for s in fig.layout.shapes if s.type == "rect"]
    assert shapes == [(-0.45, 0.45), (1.55, 2.45)]
    assert any(t.name == "never evicted (own window)" for t in fig.data)
    ax = mpl_budgets(data).axes[0]
    assert "never evicted (own window)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert np.allclose(sorted(p.get_x() for p in ax.patches if p.get_alpha() == 0.45), [-0.45, 1.55])
