"""Issue 17: every entry point sees the same pixels, and the app's endpoints stand alone.

1. The same odd image files (half-transparent RGBA, 16-bit grey, palette with transparency, CMYK JPEG, EXIF-rotated
   JPEG, animated GIF, WebP; written at test time) through the CLI, the Python API and the app's HTTP API give the
   same pixel hash (recorded in each trace) and the same answers; the hash is the one of `tgvkv.images`' conversion,
   not of a plain `Image.convert("RGB")`.
2. After `/compare`, `/overlay`, `/attention` and `/compare_methods` answer on every layer of the model without a
   `/diagnostics` call (the layer sliders' initial range does not apply), and refuse other layers with our message.

Uses a private copy of the bundled demo model (a missing assets/demo-vlm is a failure, not a skip).
"""
from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tgvkv
from tgvkv.cli import main as cli_main
from tgvkv.images import load_image_file, pixel_sha256
from tgvkv.loading import DEMO_MODEL_DIR

KEEP_PERCENT, NEW_TOKENS = 10, 6


def odd_files(folder: Path, scene: Image.Image) -> dict[str, Path]:
    """The scene in every odd encoding the issue names, by file name."""
    rgb = scene.convert("RGB")
    w, h = rgb.size
    files: dict[str, Path] = {}

    def save(name: str, im: Image.Image, **kw) -> None:
        files[name] = folder / name
        im.save(files[name], **kw)

    # half-transparent: the left half at alpha 128, a fully transparent band whose hidden colour is pure green
    rgba = rgb.convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:, : w // 2, 3] = 128
    a[h // 3: h // 2, :, :3] = (0, 255, 0)
    a[h // 3: h // 2, :, 3] = 0
    save("rgba_half_transparent.png", Image.fromarray(a, "RGBA"))
    grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257  # the full 16-bit range
    save("grey16.png", Image.fromarray(grey))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    save("palette_transparent.png", pal, transparency=0)
    save("cmyk.jpg", rgb.convert("CMYK"), quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    save("exif_rotated.jpg", rgb.transpose(Image.Transpose.ROTATE_90), quality=95, exif=exif)
    frames = [rgb.convert("P", palette=Image.Palette.ADAPTIVE), rgb.rotate(180).convert("P")]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    save("image.webp", rgb, lossless=True)
    return files


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from analysis.webapp.examples import load_examples

    assert (DEMO_MODEL_DIR / "model.safetensors").is_file(), f"the bundled demo model is missing at {DEMO_MODEL_DIR}"
    root = tmp_path_factory.mktemp("intake")
    shutil.copytree(DEMO_MODEL_DIR, root / "model")  # the demo may be retrained meanwhile: one copy for all channels
    example = load_examples("scene")[0]
    with Image.open(example.path) as im:
        files = odd_files(root, im)
    return {"model": str(root / "model"), "files": files, "question": example.question}


@pytest.fixture(scope="module")
def api(env):
    """The real app (app.build_ui + app.launch) serving the model copy, and one gradio_client session."""
    import socket

    import app
    from gradio_client import Client

    from analysis.webapp import models as M

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.build_ui(M.ModelPolicy(default_model=env["model"]))
    app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True)
    try:
        yield Client(demo.local_url, verbose=False)
    finally:
        demo.close()
        M.clear_cache()


@pytest.fixture(scope="module")
def loaded(env):
    return tgvkv.load_model(env["model"], tgvkv.LoadOptions(device="cpu"))


def via_cli(env, path: Path) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli_main(["run", "--model", env["model"], "--image", str(path), "--question", env["question"],
                       "--method", "tgv-kv", "--keep", str(KEEP_PERCENT / 100), "--max-new-tokens", str(NEW_TOKENS),
                       "--device", "cpu", "--json"])
    assert rc == 0, err.getvalue()[-2000:]
    s = json.loads(out.getvalue())
    return {"sha256": s["images"][0]["sha256"], "full": s["full"]["answer"], "evicted": s["evicted"]["answer"]}


def via_python(env, loaded, image: Image.Image) -> dict:
    model, processor = loaded
    cmp = tgvkv.compare(model, processor, [image], env["question"], "tgv-kv", KEEP_PERCENT / 100,
                        options=tgvkv.RunOptions(max_new_tokens=NEW_TOKENS))
    return {"sha256": cmp.evicted.trace.image_sha256[0], "full": cmp.full.text, "evicted": cmp.evicted.text}


def via_app(env, client, path: Path) -> dict:
    from gradio_client import handle_file

    s = client.predict(handle_file(str(path)), env["question"], env["model"], "tgv-kv", KEEP_PERCENT, NEW_TOKENS,
                       api_name="/compare")[-1]
    return {"sha256": s["image"]["sha256"], "full": s["full"]["answer"], "evicted": s["evicted"]["answer"]}


NAMES = ["rgba_half_transparent.png", "grey16.png", "palette_transparent.png", "cmyk.jpg", "exif_rotated.jpg",
         "animated.gif", "image.webp"]


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_point_sees_the_same_pixels_and_answers(env, loaded, api, name):
    path = env["files"][name]
    expected = pixel_sha256(load_image_file(path))
    cli = via_cli(env, path)
    python_loaded = via_python(env, loaded, tgvkv.load_image(path))
    with Image.open(path) as raw:  # a PIL image straight from Image.open: generate applies the same intake
        python_raw = via_python(env, loaded, raw)
    app = via_app(env, api, path)
    assert cli == python_loaded == python_raw == app, (cli, python_loaded, python_raw, app)
    assert cli["sha256"] == expected
    assert cli["full"]  # the model answered


def test_the_intake_composites_alpha_on_white_and_scales_16_bit(env):
    """What the shared hash stands for (the app used to see the first two like a plain convert("RGB"))."""
    files = env["files"]
    rgba = load_image_file(files["rgba_half_transparent.png"])
    with Image.open(files["rgba_half_transparent.png"]) as im:
        plain = im.convert("RGB")
        w, h = im.size
    assert pixel_sha256(rgba) != pixel_sha256(plain)
    band = np.asarray(rgba)[h // 3: h // 2]
    assert (band == 255).all()  # fully transparent pixels are white, not their hidden green
    assert (np.asarray(plain)[h // 3: h // 2] == (0, 255, 0)).all()

    grey = np.asarray(load_image_file(files["grey16.png"]))
    with Image.open(files["grey16.png"]) as im:
        assert im.mode in ("I;16", "I")
        raw = np.asarray(im, dtype=np.float64)
    scaled = (raw - raw.min()) / (raw.max() - raw.min()) * 255  # the file's range onto 0-255, not clipped at 255
    assert raw.max() > 255 and np.array_equal(grey[..., 0], scaled.astype(np.uint8))

    exif = load_image_file(files["exif_rotated.jpg"])
    with Image.open(files["exif_rotated.jpg"]) as im:
        assert exif.size == (im.height, im.width)  # turned upright


def test_intake_is_idempotent(env):
    """generate normalises what it is given: an image that already went through the intake is not changed."""
    from tgvkv.images import normalise_image

    for path in env["files"].values():
        once = load_image_file(path)
        assert pixel_sha256(normalise_image(once)) == pixel_sha256(once)


# -- 2. endpoints that stand alone -------------------------------------------------------------------------------------
def test_views_on_every_layer_without_diagnostics(env, api):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from analysis.webapp import handlers as H
    from analysis.webapp import models as M

    policy = M.ModelPolicy(default_model=env["model"])
    image = env["files"]["image.webp"]
    summary = api.predict(handle_file(str(image)), env["question"], env["model"], "tgv-kv", KEEP_PERCENT, NEW_TOKENS,
                          api_name="/compare")[-1]
    ref = H.run_comparison(str(image), env["question"], env["model"], "tgv-kv", KEEP_PERCENT, NEW_TOKENS, policy)
    L = ref.num_layers
    assert summary["num_layers"] == L >= 2 and summary["evicted"]["token_ids"] == ref.evicted.output_ids.tolist()
    for layer in range(L):
        img, caption = api.predict(layer, "layer", api_name="/overlay")
        ref_img, ref_caption = H.overlay_view(ref, layer, "layer")
        assert caption == ref_caption and caption.startswith(f"**Layer {layer} (tgv-kv) keeps ")
        with Image.open(img) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(ref_img.convert("RGB")))
        fig, caption = api.predict(layer, api_name="/attention")
        assert fig["type"] == "plotly" and caption == H.attention_view(ref, layer)[1]
        assert caption.startswith(f"**Layer {layer}:")
        fig, _, md = api.predict(handle_file(str(image)), env["question"], env["model"], "tgv-kv", "h2o",
                                 KEEP_PERCENT, NEW_TOKENS, layer, api_name="/compare_methods")
        ref_fig = H.compare_methods(str(image), env["question"], env["model"], "tgv-kv", "h2o", KEEP_PERCENT,
                                    NEW_TOKENS, layer, policy)[0]
        assert _images_in(fig) == _images_in(json.loads(ref_fig.to_json())), f"layer {layer}"
    for endpoint, args in (("/overlay", (L, "layer")), ("/attention", (L,)), ("/overlay", (-1, "layer"))):
        with pytest.raises(AppError) as info:
            api.predict(*args, api_name=endpoint)
        assert str(info.value) == f"layer must be between 0 and {L - 1}, got {args[0]}"
    with pytest.raises(AppError) as info:
        api.predict(handle_file(str(image)), env["question"], env["model"], "tgv-kv", "h2o", KEEP_PERCENT,
                    NEW_TOKENS, L, api_name="/compare_methods")
    assert str(info.value) == f"layer must be between 0 and {L - 1}, got {L}"


def _images_in(fig: dict) -> list:
    """The overlay panels (go.Image pixel data) of a plotly figure, as sent over the API or serialised here."""
    doc = json.loads(fig["plot"]) if isinstance(fig.get("plot"), str) else fig
    found = [t.get("z") for t in doc.get("data", []) if t.get("type") == "image"]
    assert found, "no overlay image in the figure"
    return found


def test_image_input_passes_the_file_on_untouched(env, tmp_path):
    """ImageInput's value is the uploaded file itself (no re-encoding); a data: URL is stored byte for byte."""
    import base64

    import gradio as gr
    from gradio.data_classes import ImageData

    from analysis.webapp.components import ImageInput

    component = ImageInput(type="filepath")
    path = env["files"]["rgba_half_transparent.png"]
    assert component.preprocess(ImageData(path=str(path), orig_name=path.name)) == str(path)
    assert component.preprocess(None) is None
    data = path.read_bytes()
    stored = component.preprocess(ImageData(url="data:image/png;base64," + base64.b64encode(data).decode()))
    assert Path(stored).read_bytes() == data and Path(stored).is_relative_to(component.GRADIO_CACHE)
    with pytest.raises(gr.Error) as info:
        component.preprocess(ImageData(url="data:image/png;base64,@@not base64@@"))
    assert info.value.message == "the image data URL is not valid base64 (expected data:image/...;base64,...)"


def test_checked_sliders_describe_their_range_in_the_api(api):
    info = api.view_api(return_format="dict", print_info=False)["named_endpoints"]
    keep = next(p for p in info["/compare"]["parameters"] if p["parameter_name"] == "keep_percent")
    assert keep["type"]["description"] == "percent of the KV cache kept, 5 to 100"
    layer = next(p for p in info["/overlay"]["parameters"] if p["parameter_name"] == "layer")
    assert layer["type"]["description"] == "layer index, 0 to the model's number of layers - 1 (checked against the run)"


def test_checked_slider_gives_the_page_the_same_props_as_a_slider():
    """The browser builds the slider from get_config(): range and value must arrive (not the front-end's defaults)."""
    import gradio as gr

    from analysis.webapp.components import CheckedSlider

    with gr.Blocks():
        checked = CheckedSlider(5, 100, value=10, step=1, label="keep", api_description="percent")
        plain = gr.Slider(5, 100, value=10, step=1, label="keep")
    a, b = checked.get_config(), plain.get_config()
    assert (a["minimum"], a["maximum"], a["value"], a["step"]) == (5, 100, 10, 1)
    assert "api_description" not in a
    assert {k: v for k, v in a.items() if k not in ("_id", "id", "key", "name")} == {
        k: v for k, v in b.items() if k not in ("_id", "id", "key", "name")}
    assert checked.preprocess("lots") == "lots" and checked.preprocess(250) == 250  # the handler decides
