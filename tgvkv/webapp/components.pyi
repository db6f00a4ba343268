"""An image input that turns unreadable uploads into a clear message instead of a generic processing error."""
from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image, UnidentifiedImageError

from gradio.events import Dependency

class ImageInput(gr.Image):
    """`gr.Image(type="filepath")` whose preprocessing reports non-images and decompression bombs as gr.Error.

    The handler then opens the file itself (tgvkv.images: mode conversion, size limits); the path always points into
    Gradio's upload cache, never at a location a visitor chose.
    """

    def get_block_name(self) -> str:  # use the built-in image front-end
        return "image"

    def preprocess(self, payload: Any) -> Any:
        try:
            return super().preprocess(payload)
        except (UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise gr.Error(f"the upload is not a readable image ({type(e).__name__}); use PNG, JPEG, WebP or GIF") from e
        except (OSError, SyntaxError) as e:
            raise gr.Error("the image file is corrupt or truncated") from e
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component