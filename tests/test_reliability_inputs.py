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
from tiny_models import random_image, tiny_llava

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
     "tgv-ablation, tgv-evict-text-first, tgv-evict-vision-first, tgv-kv, tgv-self-attn, tgv-tv-tt, tgv-tvb-tv-tt, "
     "tgv-uniform-window, tgv-vv-tt"),
    ("model-unknown-hub-id", {"--model": "nobody/no-such-model"},
     "could not load model id 'nobody/no-such-model': We couldn't connect to 'https://huggingface.co' to load the "
     "files, and couldn't find them in the cached files. (hub ids need network access; offline, use a local folder "
     "such as assets/demo-vlm)"),
    ("model-dotdot-path", {"--model": "../../etc"},
     "could not load local folder '../../etc': it is not a model folder (no config.json inside)"),
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
    model, proc = tiny_llava(seed=1)
    model.save_pretrained(root / "model")
    proc.save_pretrained(root / "model")
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
