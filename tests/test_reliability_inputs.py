"""Bad inputs: each row gives the exact message the user sees, and a good request must still answer afterwards.

Channels: the CLI (`tgvkv.cli.main`: exit code 2 and `error: <message>` on stderr), the app's handlers called
directly (the ``on_*`` functions Gradio calls: ``gr.Error(<message>)``) and the app's HTTP API through
gradio_client on 127.0.0.1 (the same message in the client's ``AppError``). docs/reliability.md lists the table.
"""
from __future__ import annotations

import io
import struct
import zlib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import random_image, save_tiny_llava, tiny_llava

from tgvkv.cli import main as cli_main
from tgvkv.trace import Trace

GOOD_Q = "what is the colour of the circle ?"


# -- files ----------------------------------------------------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries a few bytes of pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def write_bad_files(d: Path) -> dict[str, Path]:
    """Every kind of bad (and odd but acceptable) image file, by name."""
    d.mkdir(parents=True, exist_ok=True)
    good = d / "good.png"
    random_image(4, (40, 32)).save(good)
    files = {"good": good}

    def put(name: str, data: bytes) -> None:
        (d / name).write_bytes(data)
        files[name] = d / name

    put("text.png", b"hello, I am not an image\n")
    put("empty.png", b"")
    put("truncated.png", good.read_bytes()[:200])
    jpeg = io.BytesIO()
    random_image(5, (64, 48)).save(jpeg, format="JPEG")
    put("corrupt.jpg", jpeg.getvalue()[:300] + bytes(range(256)) * 4)
    put("html.png", b"<html><body><img src=x onerror=alert(1)></body></html>")
    put("bomb.png", png_header_only(20_000, 10_000))  # 200 MP: PIL's decompression-bomb guard
    put("huge.png", png_header_only(9_000, 8_000))  # 72 MP: above our 64 MP limit
    buf = io.BytesIO()
    Image.new("RGB", (400, 10), (200, 30, 30)).save(buf, format="PNG")
    put("strip.png", buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    put("dot.png", buf.getvalue())
    # odd but acceptable modes (converted to RGB): RGBA, palette with transparency, CMYK JPEG, 16-bit grey, LA, 1-bit
    rgb = random_image(6, (40, 32))
    for name, im, fmt in [
        ("rgba.png", rgb.convert("RGBA"), "PNG"),
        ("palette.png", rgb.convert("P"), "PNG"),
        ("cmyk.jpg", rgb.convert("CMYK"), "JPEG"),
        ("grey16.png", Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)), "PNG"),
        ("la.png", rgb.convert("LA"), "PNG"),
        ("bilevel.png", rgb.convert("1"), "PNG"),
    ]:
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        put(name, buf.getvalue())
    return files


# -- CLI ------------------------------------------------------------------------------------------------------------
#: (id, argv overrides, exact message after "error: "); {d} is the folder of the bad files, {m} the model folder
CLI_ROWS = [
    ("image-not-an-image", {"--image": "{d}/text.png"}, "text.png: not a readable image (UnidentifiedImageError)"),
    ("image-empty-file", {"--image": "{d}/empty.png"}, "empty.png: not a readable image (UnidentifiedImageError)"),
    ("image-truncated", {"--image": "{d}/truncated.png"},
     "truncated.png: the image file is corrupt or truncated (image file is truncated)"),
    ("image-html-as-png", {"--image": "{d}/html.png"}, "html.png: not a readable image (UnidentifiedImageError)"),
    ("image-decompression-bomb", {"--image": "{d}/bomb.png"}, "bomb.png: not a readable image (DecompressionBombError)"),
    ("image-72-megapixels", {"--image": "{d}/huge.png"},
     "huge.png: image is too large (9000x8000 pixels; the limit is 64 megapixels)"),
    ("image-400x10-strip", {"--image": "{d}/strip.png"},
     "image is too elongated (400x10 pixels; the longer side may be at most 20 times the shorter)"),
    ("image-1x1", {"--image": "{d}/dot.png"}, "image is too small (1x1 pixels)"),
    ("image-missing-file", {"--image": "{d}/nope.png"}, "image file not found: {d}/nope.png"),
    ("question-empty", {"--question": ""}, "the question is empty"),
    ("question-whitespace", {"--question": " \t\n "}, "the question is empty"),
    ("question-2001-chars", {"--question": "a" * 2001}, "the question is too long (2,001 characters; the limit is 2,000)"),
    ("question-image-token", {"--question": "what is <image> ?"},
     "the question contains '<image>', a special token of this model; remove it (images are attached separately, "
     "not typed in)"),
    ("question-eos-token", {"--question": "what </s> is"},
     "the question contains '</s>', a special token of this model; remove it (images are attached separately, "
     "not typed in)"),
    ("question-escape-sequence", {"--question": "what\x1b[31m is"},
     "the question contains a control character (U+001B at position 4); remove it and try again"),
    ("followup-image-token", {"--followup": "and <image> ?"},
     "the follow-up question contains '<image>', a special token of this model; remove it (images are attached "
     "separately, not typed in)"),
    ("keep-0", {"--keep": "0"}, "keep_ratio must be in (0, 1] (fraction of the KV cache retained), got 0.0"),
    ("keep-1.5", {"--keep": "1.5"}, "keep_ratio must be in (0, 1] (fraction of the KV cache retained), got 1.5"),
    ("keep-nan", {"--keep": "nan"}, "keep_ratio must be in (0, 1] (fraction of the KV cache retained), got nan"),
    ("max-new-tokens-0", {"--max-new-tokens": "0"}, "max_new_tokens must be an integer in [1, 1024], got 0"),
    ("max-new-tokens-5000", {"--max-new-tokens": "5000"}, "max_new_tokens must be an integer in [1, 1024], got 5000"),
    ("method-unknown", {"--method": "best"},
     "unknown method 'best'; choose one of: full, h2o, prefixkv, pyramidkv, random, snapkv, streamingllm, "
     "text-only, tgv-ablation, tgv-evict-text-first, tgv-evict-vision-first, tgv-kv, tgv-self-attn, tgv-tv-tt, tgv-tvb-tv-tt, "
     "tgv-uniform-window, tgv-vv-tt"),
    ("model-unknown-hub-id", {"--model": "nobody/no-such-model"},
     "could not load model id 'nobody/no-such-model': We couldn't connect to 'https://huggingface.co' to load the "
     "files, and couldn't find them in the cached files. (hub ids need network access; offline, use a local folder "
     "such as assets/demo-vlm)"),
    ("model-dotdot-path", {"--model": "{d}/.."},  # an existing folder reached with "..", whatever the clone's depth
     "could not load local folder '{d}/..': it is not a model folder (no config.json inside)"),
    ("model-missing-folder", {"--model": "{d}/no_model"}, "could not load local folder '{d}/no_model': no such folder"),
    ("model-malformed-id", {"--model": "a b"},
     "could not load 'a b': it is neither a local model folder nor a hub id of the form owner/name (letters, "
     "digits, '-', '_' and '.')"),
    ("model-without-image-token", {"--model": "{t}"},
     "unsupported model: config of type 'llama' has no `image_token_id` (or `image_token_index`), so image tokens "
     "cannot be located in the prompt"),
]


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability_cli")
    _, proc = save_tiny_llava(root / "model")
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=len(proc.tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    text_only.save_pretrained(root / "text_only")
    proc.tokenizer.save_pretrained(root / "text_only")
    files = write_bad_files(root / "files")
    return root, files


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli_main(argv)
    return rc, out.getvalue(), err.getvalue()


def _good_argv(root: Path, files: dict[str, Path]) -> list[str]:
    return ["run", "--model", str(root / "model"), "--image", str(files["good"]), "--question", GOOD_Q,
            "--method", "tgv-kv", "--keep", "0.3", "--max-new-tokens", "3", "--json"]


@pytest.mark.parametrize("row_id,overrides,message", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_cli_bad_input(cli_setup, row_id, overrides, message):
    root, files = cli_setup
    fmt = {"d": str(files["good"].parent), "m": str(root / "model"), "t": str(root / "text_only")}
    argv = _good_argv(root, files)
    for flag, value in overrides.items():
        value = value.format(**fmt)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    rc, out, err = _cli(argv)
    assert rc == 2 and out == ""
    last = [line for line in err.splitlines() if line.startswith("error: ")]
    assert last == ["error: " + message.format(**fmt)], err[-2000:]
    rc, out, _ = _cli(_good_argv(root, files))  # the next good request still answers
    assert rc == 0 and '"answer"' in out


@pytest.mark.parametrize("name", ["rgba.png", "palette.png", "cmyk.jpg", "grey16.png", "la.png", "bilevel.png"])
def test_cli_odd_image_modes_are_converted_and_answered(cli_setup, name):
    root, files = cli_setup
    argv = _good_argv(root, files)
    argv[argv.index("--image") + 1] = str(files[name])
    rc, out, err = _cli(argv)
    assert rc == 0, err[-2000:]
    assert '"answer"' in out


# -- traces that fail to load ---------------------------------------------------------------------------------------
TRACE_ROWS = [  # (id, file name, content, exact message)
    ("trace-not-npz", "t.npz", b"garbage", "could not load trace 't.npz': not an .npz archive"),
    ("trace-npz-without-meta", "t.npz", "npz-no-meta",
     "could not load trace 't.npz': not a TGV-KV trace (no __meta__ entry; the archive holds ['x'])"),
    ("trace-json-list", "t.json", b"[1, 2]", "could not load trace 't.json': list indices must be integers or slices, not str"),
    ("trace-json-not-utf8", "t.json", b"\xff\xfe", "could not load trace 't.json': 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
    ("trace-json-other-format", "t.json", b'{"meta": {"format": "x"}, "arrays": {}}',
     "could not load trace 't.json': not a TGV-KV trace (format 'x', expected 'tgvkv-trace/1')"),
    ("trace-json-missing-layout", "t.json", b'{"meta": {"format": "tgvkv-trace/1"}, "arrays": {}}',
     "could not load trace 't.json': missing entry 'layout'"),
    ("trace-wrong-suffix", "t.txt", b"{}", "could not load trace 't.txt': trace path must end in .npz or .json, got 't.txt'"),
    ("trace-missing-file", "missing.npz", None, None),
]


@pytest.mark.parametrize("row_id,name,content,message", TRACE_ROWS, ids=[r[0] for r in TRACE_ROWS])
def test_trace_that_fails_to_load(tmp_path, row_id, name, content, message):
    path = tmp_path / name
    if content == "npz-no-meta":
        np.savez(path, x=np.arange(3))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        Trace.load(path)
    if message is not None:
        assert str(info.value) == message
    else:
        assert str(info.value).startswith(f"could not load trace {name!r}: ")


# -- the app: handlers (direct calls) and the HTTP API (gradio_client on 127.0.0.1) -----------------------------------
METHODS_LIST = ("full, h2o, prefixkv, pyramidkv, random, snapkv, streamingllm, text-only, tgv-ablation, tgv-evict-text-first, "
                "tgv-evict-vision-first, tgv-kv, tgv-self-attn, tgv-tv-tt, tgv-tvb-tv-tt, tgv-uniform-window, tgv-vv-tt")
LOCAL_DISABLED = ("local model folders are disabled on this server ({!r}); the operator can enable them with "
                  "`python app.py --allow-local-models`. Choose the bundled demo model or a hub id such as "
                  "'llava-hf/llava-interleave-qwen-0.5b-hf'.")
SPECIAL = "the question contains {!r}, a special token of this model; remove it (images are attached separately, not typed in)"
#: (id, {argument index: value}, exact message from the handler, exact message over the API (None: not sent))
#: arguments of /compare: 0 image, 1 question, 2 model, 3 method, 4 keep %, 5 max new tokens; "file:x" = bad file x
APP_ROWS = [
    ("image-missing", {0: None}, "please upload an image (or click one of the examples)",
     "please upload an image (or click one of the examples)"),
    ("image-not-an-image", {0: "file:text.png"}, "text.png: not a readable image (UnidentifiedImageError)",
     "text.png: not a readable image (UnidentifiedImageError)"),
    ("image-empty-file", {0: "file:empty.png"}, "empty.png: not a readable image (UnidentifiedImageError)",
     "empty.png: not a readable image (UnidentifiedImageError)"),
    ("image-truncated", {0: "file:truncated.png"},
     "truncated.png: the image file is corrupt or truncated (image file is truncated)",
     "truncated.png: the image file is corrupt or truncated (image file is truncated)"),
    ("image-corrupt-jpeg", {0: "file:corrupt.jpg"}, "corrupt.jpg: not a readable image (UnidentifiedImageError)",
     "corrupt.jpg: not a readable image (UnidentifiedImageError)"),
    ("image-html-as-png", {0: "file:html.png"}, "html.png: not a readable image (UnidentifiedImageError)",
     "html.png: not a readable image (UnidentifiedImageError)"),
    ("image-decompression-bomb", {0: "file:bomb.png"}, "bomb.png: not a readable image (DecompressionBombError)",
     "bomb.png: not a readable image (DecompressionBombError)"),
    ("image-72-megapixels", {0: "file:huge.png"},
     "huge.png: image is too large (9000x8000 pixels; the limit is 64 megapixels)",
     "huge.png: image is too large (9000x8000 pixels; the limit is 64 megapixels)"),
    ("image-400x10-strip", {0: "file:strip.png"},
     "image is too elongated (400x10 pixels; the longer side may be at most 20 times the shorter)",
     "image is too elongated (400x10 pixels; the longer side may be at most 20 times the shorter)"),
    ("image-1x1", {0: "file:dot.png"}, "image is too small (1x1 pixels)", "image is too small (1x1 pixels)"),
    ("question-empty", {1: ""}, "please type a question about the image", "please type a question about the image"),
    ("question-whitespace", {1: " \n\t "}, "please type a question about the image",
     "please type a question about the image"),
    ("question-not-text", {1: 42}, "please type a question about the image", None),
    ("question-401-chars", {1: "a" * 401}, "the question is too long (401 characters; the limit is 400)",
     "the question is too long (401 characters; the limit is 400)"),
    ("question-10400-chars-with-spaces", {1: "a " * 5200},  # the length as typed, not after collapsing whitespace
     "the question is too long (10,400 characters; the limit is 400)",
     "the question is too long (10,400 characters; the limit is 400)"),
    ("question-image-placeholder", {1: "what is <image> ?"},
     "the question must not contain the image placeholder '<image>'; the image is added for you",
     "the question must not contain the image placeholder '<image>'; the image is added for you"),
    ("question-eos-token", {1: "what </s> is"}, SPECIAL.format("</s>"), SPECIAL.format("</s>")),
    ("question-pad-token", {1: "<pad> what"}, SPECIAL.format("<pad>"), SPECIAL.format("<pad>")),
    ("question-escape-sequence", {1: "what \x1b[31m is"},
     "the question contains a control character (U+001B at position 5); remove it and try again",
     "the question contains a control character (U+001B at position 5); remove it and try again"),
    ("question-nul", {1: "what\x00 is"},
     "the question contains a control character (U+0000 at position 4); remove it and try again",
     "the question contains a control character (U+0000 at position 4); remove it and try again"),
    ("question-lone-surrogate", {1: "what \ud800 is"},
     "the question contains an invalid character (lone surrogate U+D800 at position 5); remove it and try again",
     None),  # gradio_client cannot even encode it
    ("keep-4-percent", {4: 4}, "the keep ratio must be between 5% and 100%, got 4",
     "the keep ratio must be between 5% and 100%, got 4"),
    ("keep-101-percent", {4: 101}, "the keep ratio must be between 5% and 100%, got 101",
     "the keep ratio must be between 5% and 100%, got 101"),
    ("keep-nan", {4: float("nan")}, "the keep ratio must be between 5% and 100%, got nan", None),
    ("keep-not-a-number", {4: "lots"}, "the keep ratio must be a number of percent, got 'lots'",
     "the keep ratio must be a number of percent, got 'lots'"),
    ("keep-missing", {4: None}, "the keep ratio must be a number of percent, got None",
     "the keep ratio must be a number of percent, got None"),
    ("max-new-tokens-0", {5: 0}, "max new tokens must be a whole number from 1 to 64, got 0",
     "max new tokens must be a whole number from 1 to 64, got 0"),
    ("max-new-tokens-65", {5: 65}, "max new tokens must be a whole number from 1 to 64, got 65",
     "max new tokens must be a whole number from 1 to 64, got 65"),
    ("max-new-tokens-2.5", {5: 2.5}, "max new tokens must be a whole number from 1 to 64, got 2.5",
     "max new tokens must be a whole number from 1 to 64, got 2.5"),
    ("max-new-tokens-text", {5: "many"}, "max new tokens must be a whole number, got 'many'",
     "max new tokens must be a whole number, got 'many'"),
    ("method-unknown", {3: "best"}, f"unknown method 'best'; choose one of: {METHODS_LIST}",
     "Value: best is not in the list of choices: ['tgv-kv', 'full', 'h2o', 'prefixkv', 'pyramidkv', 'random', "
     "'snapkv', 'streamingllm', 'text-only', 'tgv-ablation', 'tgv-evict-text-first', 'tgv-evict-vision-first', 'tgv-self-attn', "
     "'tgv-tv-tt', 'tgv-tvb-tv-tt', 'tgv-uniform-window', 'tgv-vv-tt']"),
    ("method-missing", {3: None}, f"unknown method None; choose one of: {METHODS_LIST}", None),
    ("model-unreachable-hub-id", {2: "nobody/no-such-model"},
     "'nobody/no-such-model' is not available: this server cannot reach the Hugging Face Hub (offline mode) and the "
     "model is not in its local cache. Use the bundled demo model.",
     "'nobody/no-such-model' is not available: this server cannot reach the Hugging Face Hub (offline mode) and the "
     "model is not in its local cache. Use the bundled demo model."),
    ("model-absolute-path", {2: "/etc"}, LOCAL_DISABLED.format("/etc"), LOCAL_DISABLED.format("/etc")),
    ("model-dotdot-path", {2: "../../etc/passwd"}, LOCAL_DISABLED.format("../../etc/passwd"),
     LOCAL_DISABLED.format("../../etc/passwd")),
    ("model-relative-existing-folder", {2: "assets/demo-vlm"}, LOCAL_DISABLED.format("assets/demo-vlm"),
     LOCAL_DISABLED.format("assets/demo-vlm")),
    ("model-malformed-id", {2: "a b"}, "'a b' is neither the demo model nor a hub id of the form owner/name",
     "'a b' is neither the demo model nor a hub id of the form owner/name"),
    ("model-empty", {2: ""}, "no model chosen", None),
]
#: handler-only rows that need the operator's --allow-local-models: (id, model folder key, exact message)
LOCAL_ROWS = [
    ("local-model-without-image-token", "text_only",
     "unsupported model: config of type 'llama' has no `image_token_id` (or `image_token_index`), so image tokens "
     "cannot be located in the prompt"),
    ("local-folder-without-config", "files", "{path!r} is not a model folder (no config.json inside)"),
]
#: per-run views: (id, endpoint, layer, exact message); a 4-layer model (demo) or 3 (tiny) -> {last}
VIEW_ROWS = [
    ("overlay-layer-too-high", "overlay", 99, "layer must be between 0 and {last}, got 99"),
    ("overlay-layer-negative", "overlay", -1, "layer must be between 0 and {last}, got -1"),
    ("overlay-layer-not-a-number", "overlay", "x", "layer must be a whole number, got 'x'"),
    ("attention-layer-too-high", "attention", 99, "layer must be between 0 and {last}, got 99"),
    ("attention-layer-fraction", "attention", 1.5, "layer must be between 0 and {last}, got 1.5"),
]


@pytest.fixture(scope="module")
def app_env(tmp_path_factory):
    """A private copy of the model the app serves (the bundled demo if present, else a tiny random LLaVA), the bad
    files, an example image and question the model knows, and the operator policies."""
    import shutil

    from tgvkv.loading import DEMO_MODEL_DIR
    from analysis.webapp import models as M

    root = tmp_path_factory.mktemp("reliability_app")
    if (DEMO_MODEL_DIR / "model.safetensors").is_file():
        shutil.copytree(DEMO_MODEL_DIR, root / "model")  # training may rewrite assets/demo-vlm meanwhile
        from analysis.webapp.examples import load_examples

        ex = load_examples("scene")[0]
        image, question = ex.path, ex.question
    else:
        model, proc = tiny_llava(seed=2)
        model.save_pretrained(root / "model")
        proc.save_pretrained(root / "model")
        image, question = root / "good.png", GOOD_Q
        random_image(8, (40, 32)).save(image)
    model_dir = str(root / "model")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(root / "text_only")
    tok.save_pretrained(root / "text_only")
    files = write_bad_files(root / "files")
    policy = M.ModelPolicy(default_model=model_dir)
    local = M.ModelPolicy(default_model=model_dir, allow_local=True)
    good = [str(image), question, model_dir, "tgv-kv", 10, 6]
    yield {"root": root, "files": files, "policy": policy, "local": local, "good": good, "model": model_dir}
    M.clear_cache()


def _args(env, overrides: dict, api: bool = False) -> list:
    args = list(env["good"])
    for i, v in overrides.items():
        if isinstance(v, str) and v.startswith("file:"):
            v = str(env["files"][v[5:]])
        args[i] = v
    if api and args[0] is not None:
        from gradio_client import handle_file

        args[0] = handle_file(args[0])
    return args


@pytest.fixture(scope="module")
def handlers(app_env):
    from analysis.webapp import handlers as H

    return H.make_ui_handlers(app_env["policy"])


def _answers(summary: dict) -> str:
    assert summary["full"]["token_ids"] and isinstance(summary["evicted"]["answer"], str)
    return summary["full"]["answer"]


@pytest.mark.parametrize("row_id,overrides,message,api_message", APP_ROWS, ids=[r[0] for r in APP_ROWS])
def test_handler_bad_input(app_env, handlers, row_id, overrides, message, api_message):
    import gradio as gr

    with pytest.raises(gr.Error) as info:
        handlers["run"](*_args(app_env, overrides))
    assert info.value.message == message
    _answers(handlers["run"](*_args(app_env, {})).summary)  # the next good request still answers


@pytest.mark.parametrize("row_id,folder,message", LOCAL_ROWS, ids=[r[0] for r in LOCAL_ROWS])
def test_handler_local_model_rows(app_env, row_id, folder, message):
    import gradio as gr

    from analysis.webapp import handlers as H

    h = H.make_ui_handlers(app_env["local"])
    path = str(app_env["root"] / folder)
    with pytest.raises(gr.Error) as info:
        h["run"](*_args(app_env, {2: path}))
    assert info.value.message == message.format(path=path)
    _answers(h["run"](*_args(app_env, {})).summary)


@pytest.mark.parametrize("row_id,endpoint,layer,message", VIEW_ROWS, ids=[r[0] for r in VIEW_ROWS])
def test_handler_view_bad_layer(app_env, handlers, row_id, endpoint, layer, message):
    import gradio as gr

    run = handlers["run"](*_args(app_env, {})).run_state
    with pytest.raises(gr.Error) as info:
        handlers[endpoint](run, layer, "layer") if endpoint == "overlay" else handlers[endpoint](run, layer)
    assert info.value.message == message.format(last=run.num_layers - 1)
    overlay = handlers["overlay"](run, 0, "layer")
    assert overlay.figure is not None and overlay.caption


@pytest.mark.parametrize("endpoint,message", [("overlay", "run a comparison first"), ("attention", "run a comparison first"),
                                              ("diagnostics", "run a comparison first"),
                                              ("export", "run a comparison first, then export it")])
def test_handler_views_before_any_run(handlers, endpoint, message):
    import gradio as gr

    args = {"overlay": (None, 0, "layer"), "attention": (None, 0)}.get(endpoint, (None,))
    with pytest.raises(gr.Error) as info:
        handlers[endpoint](*args)
    assert info.value.message == message


# -- over the API -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(app_env):
    """The real app (app.build_ui + app.launch, upload limit included) on 127.0.0.1, and a gradio_client session."""
    import socket

    import app
    from gradio_client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.build_ui(app_env["policy"])
    app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True)
    try:
        yield demo.local_url, Client(demo.local_url, verbose=False)
    finally:
        demo.close()


API_ROWS = [r for r in APP_ROWS if r[3] is not None]


@pytest.mark.parametrize("row_id,overrides,message,api_message", API_ROWS, ids=[r[0] for r in API_ROWS])
def test_api_bad_input(app_env, api, row_id, overrides, message, api_message):
    from gradio_client.exceptions import AppError

    _, client = api
    with pytest.raises(AppError) as info:
        client.predict(*_args(app_env, overrides, api=True), api_name="/compare")
    assert str(info.value) == api_message
    _answers(client.predict(*_args(app_env, {}, api=True), api_name="/compare")[-1])


def _raw_call(url: str, data: list) -> str:
    """POST /gradio_api/call/compare with raw JSON (no client-side upload) and return the streamed result."""
    import httpx

    r = httpx.post(f"{url}gradio_api/call/compare", json={"data": data}, timeout=30)
    r.raise_for_status()
    return httpx.get(f"{url}gradio_api/call/compare/{r.json()['event_id']}", timeout=60).text


@pytest.mark.parametrize("path", ["/etc/passwd", "{repo}/tgvkv/__init__.py", "../../../../etc/hostname"])
def test_api_never_reads_a_path_the_visitor_names(app_env, api, path):
    url, client = api
    path = path.format(repo=Path(__file__).resolve().parent.parent)
    data = [{"path": path, "meta": {"_type": "gradio.FileData"}}, *app_env["good"][1:]]
    text = _raw_call(url, data)
    assert "event: error" in text
    shown = str(Path(path).resolve())  # gradio names the absolute path it refused
    assert f"Cannot move {shown} to the gradio cache dir because it was not uploaded by a user." in text
    _answers(client.predict(*_args(app_env, {}, api=True), api_name="/compare")[-1])


def test_api_upload_over_the_size_limit_is_refused(app_env, api):
    import httpx

    url, client = api
    blob = b"\x89PNG" + b"\x00" * (10 * 2**20 + 1)
    r = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", blob, "image/png")}, timeout=60)
    assert r.status_code == 413 and r.text == "File size exceeded maximum allowed size of 10485760 bytes."
    _answers(client.predict(*_args(app_env, {}, api=True), api_name="/compare")[-1])


def test_api_views_before_any_run_in_a_new_session(app_env, api):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, client = api
    with pytest.raises(AppError) as info:
        Client(url, verbose=False).predict(0, "layer", api_name="/overlay")
    assert str(info.value) == "run a comparison first"
    _answers(client.predict(*_args(app_env, {}, api=True), api_name="/compare")[-1])


# -- trust_remote_code: only from an explicit command-line opt-in ------------------------------------------------------
def test_remote_code_is_off_unless_the_operator_opts_in(monkeypatch, cli_setup):
    import app
    import transformers

    from tgvkv.cli import _parser as cli_parser
    from tgvkv.eval.runner import EvalConfig
    from tgvkv.loading import LoadOptions, load_model
    from analysis.webapp.models import ModelPolicy

    assert app._parser().parse_args([]).trust_remote_code is False
    assert app._parser().parse_args(["--trust-remote-code"]).trust_remote_code is True
    assert cli_parser().parse_args(["run", "--image", "x.png", "--question", "q"]).trust_remote_code is False
    assert LoadOptions().trust_remote_code is False and ModelPolicy().trust_remote_code is False
    assert {f.name: f.default for f in __import__("dataclasses").fields(EvalConfig)}["trust_remote_code"] is False
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoProcessor, transformers.AutoModelForImageTextToText):
        original = cls.from_pretrained.__func__

        def spy(klass, *a, _original=original, **kw):
            seen.append((klass.__name__, kw.get("trust_remote_code", "missing")))
            return _original(klass, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    root, _ = cli_setup
    load_model(root / "model")
    assert seen and all(flag is False for _, flag in seen), seen


#: /compare_methods: (id, {argument index: value}, exact message); arguments: 0 image, 1 question, 2 model,
#: 3 method A, 4 method B, 5 keep %, 6 max new tokens, 7 layer
COMPARE_ROWS = [
    ("compare-method-a-unknown", {3: "best"}, f"unknown method 'best'; choose one of: {METHODS_LIST}"),
    ("compare-method-b-missing", {4: None}, f"unknown method None; choose one of: {METHODS_LIST}"),
    ("compare-layer-too-high", {7: 99}, "layer must be between 0 and {last}, got 99"),
    ("compare-layer-not-a-number", {7: "x"}, "layer must be a whole number, got 'x'"),
    ("compare-image-missing", {0: None}, "please upload an image (or click one of the examples)"),
    ("compare-question-bell", {1: "what\x07"},
     "the question contains a control character (U+0007 at position 4); remove it and try again"),
]


@pytest.mark.parametrize("row_id,overrides,message", COMPARE_ROWS, ids=[r[0] for r in COMPARE_ROWS])
def test_handler_compare_methods_bad_input(app_env, handlers, row_id, overrides, message):
    import gradio as gr

    image, question, model, _, keep, n = app_env["good"]
    good = [image, question, model, "tgv-kv", "h2o", keep, n, 0]
    args = list(good)
    for i, v in overrides.items():
        args[i] = v
    with pytest.raises(gr.Error) as info:
        handlers["compare_methods"](*args)
    layers = handlers["run"](*_args(app_env, {})).run_state.num_layers
    assert info.value.message == message.format(last=layers - 1)
    assert "h2o" in handlers["compare_methods"](*good).table


# -- special tokens are read from each family's processor ----------------------------------------------------------
@pytest.mark.parametrize("family,token", [("tiny_llava", "<image>"), ("tiny_qwen2_vl", "<|image_pad|>"),
                                          ("tiny_qwen2_vl", "<|vision_start|>"), ("tiny_gemma3", "<start_of_image>"),
                                          ("tiny_gemma3", "<image_soft_token>"), ("tiny_onevision", "<video>"),
                                          ("tiny_idefics3", "<row_1_col_1>")])
def test_typed_special_tokens_of_every_family_are_refused(family, token):
    import tiny_families
    import tiny_models

    from tgvkv.validation import reserved_tokens, validate_question

    builder = getattr(tiny_models, family, None) or getattr(tiny_families, family)
    _, processor = builder()
    assert token in reserved_tokens(processor)
    with pytest.raises(ValueError) as info:
        validate_question(f"what is {token} here ?", processor)
    assert str(info.value) == SPECIAL.format(token)
    assert validate_question("what is here ?", processor) == "what is here ?"
