"""Input components that hand the handlers what the visitor sent, so the handlers' own checks decide (and explain).

Gradio's stock components convert or range-check values in ``preprocess``, before a handler runs: ``gr.Image``
re-encodes uploads in ``image_mode`` (RGBA loses its alpha to the hidden colour, 16-bit grey is clipped to white),
and ``gr.Slider`` refuses values outside the range it was built with (a layer slider built with maximum 1 refuses
layer 3 of a 4-layer model until the page updates it). Here the image is passed on as the uploaded file, untouched,
for ``tgvkv.images`` (the CLI's intake); sliders pass their raw value to the handler, which checks it against the run.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from pathlib import Path
from typing import Any

import gradio as gr

DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*;base64,(?P<data>.*)$", re.DOTALL)

from gradio.events import Dependency

class ImageInput(gr.Image):
    """`gr.Image` whose value is the uploaded file's path, bytes unchanged (no decoding, no mode conversion).

    The path always points into Gradio's upload cache (or the served examples): Gradio refuses any other path
    before ``preprocess``. A ``data:`` URL sent over the API is written to the cache as it is.
    """

    def get_block_name(self) -> str:  # use the built-in image front-end
        return "image"

    def preprocess(self, payload: Any) -> str | None:
        if payload is None:
            return None
        url = getattr(payload, "url", None) or ""
        if url.startswith("data:"):
            return self._save_data_url(url)
        if not getattr(payload, "path", None):
            raise gr.Error("the upload arrived without a file; please upload the image again")
        return str(payload.path)

    def _save_data_url(self, url: str) -> str:
        match = DATA_URL.match(url)
        try:
            data = base64.b64decode(match["data"], validate=True) if match else None
        except (binascii.Error, ValueError):
            data = None
        if data is None:
            raise gr.Error("the image data URL is not valid base64 (expected data:image/...;base64,...)")
        folder = Path(self.GRADIO_CACHE) / hashlib.sha256(data).hexdigest()[:20]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "upload"
        path.write_bytes(data)
        return str(path)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class CheckedSlider(gr.Slider):
    """`gr.Slider` whose value reaches the handler unchecked: the handler validates it (with its own message) against
    what it refers to, e.g. a layer index against the run's number of layers, whatever range the page shows."""

    def __init__(self, minimum: float = 0, maximum: float = 100, value: float | None = None, *,
                 api_description: str | None = None, **kwargs: Any):
        self.api_description = api_description  # replaces "numeric value between <min> and <max>" in the API docs
        super().__init__(minimum, maximum, value, **kwargs)

    def get_block_name(self) -> str:  # use the built-in slider front-end
        return "slider"

    def get_config(self, cls: type | None = None) -> dict[str, Any]:
        # Gradio reads the page's props from the signature of the class's __init__: use gr.Slider's (value, minimum,
        # maximum, ...), not this one's (*args, **kwargs), or the page gets a slider at its defaults
        return super().get_config(cls or gr.Slider)

    def preprocess(self, payload: Any) -> Any:
        return payload

    def api_info(self) -> dict[str, Any]:
        info = super().api_info()
        if self.api_description:
            info["description"] = self.api_description
        return info
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component