"""Image intake shared by the CLI, the app, the Python API and the figures command: open, validate, normalise to RGB.

Every entry point hands the file (path or bytes) to `load_image_file` / `load_image_bytes`, and `generate` passes
every image through `normalise_image`, so a file gives the model the same pixels whichever way it arrives
(`pixel_sha256` is recorded in each trace to show it).
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_SIDE = 2048  # longer side above this is downscaled (aspect kept) before preprocessing
MAX_PIXELS = 64_000_000  # refuse anything larger outright (decompression-bomb guard)
MIN_SIDE = 2
MAX_ASPECT = 20  # longer side / shorter side: processors that resize the short edge would blow up a 2048x2 strip
MAX_FILE_BYTES = 10 * 2**20  # image files above this are refused before reading (the app's upload limit, "10mb")


def pixel_sha256(image: Image.Image) -> str:
    """SHA-256 of an image's mode, size and raw pixels: equal hashes mean the model was given the same pixels."""
    h = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def normalise_image(image: Image.Image) -> Image.Image:
    """RGB, EXIF-rotated, transparent areas composited on white, 16-bit scaled to 8-bit, longer side <= MAX_SIDE."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected an image, got {type(image).__name__}")
    w, h = image.size
    if w * h > MAX_PIXELS:
        raise ValueError(f"image is too large ({w}x{h} pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels)")
    if min(w, h) < MIN_SIDE:
        raise ValueError(f"image is too small ({w}x{h} pixels)")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ValueError(
            f"image is too elongated ({w}x{h} pixels; the longer side may be at most {MAX_ASPECT} times the shorter)"
        )
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        image = Image.fromarray(a.astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        scale = MAX_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    return image


def _open(source: io.BytesIO | Path, name: str) -> Image.Image:
    """Open, refuse by the header's size before decoding, decode, normalise; every failure is a ValueError."""
    try:
        with Image.open(source) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ValueError(f"{name}: image is too large ({w}x{h} pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels)")
            im.load()
            return normalise_image(im)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: not a readable image ({type(e).__name__})") from e
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{name}: the image file is corrupt or truncated ({e})") from e


def load_image_bytes(data: bytes, name: str = "upload") -> Image.Image:
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(_too_many_bytes(name, len(data)))
    return _open(io.BytesIO(data), name)


def load_image_file(path: str | Path) -> Image.Image:
    """The image in `path` as normalised RGB; files above MAX_FILE_BYTES are refused before anything is read."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(_too_many_bytes(path.name, size))
    return _open(path, path.name)


def _too_many_bytes(name: str, size: int) -> str:
    return (f"{name}: the file is too large ({size / 2**20:.1f} MiB; the limit is {MAX_FILE_BYTES // 2**20} MiB, as "
            "for uploads to the app); downscale or recompress it first")
