"""TGV-KV Explorer, the Gradio app: `python app.py` (bundled demo model), `python app.py --help` for options.

The launcher: command-line options, the operator's checks, then the page that `analysis.webapp.ui.build_ui` lays out
and wires (every event a named API endpoint callable with gradio_client), served by `analysis.webapp.ui.launch`.
"""
from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:  # Hugging Face ZeroGPU: `spaces` must be imported before torch initialises CUDA
    import spaces  # type: ignore[import-not-found]  # noqa: F401
except ImportError:
    pass

from analysis.webapp import models  # noqa: E402
from analysis.webapp.ui import build_ui, launch  # noqa: E402
from tgvkv.loading import resolve_device  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="TGV-KV Explorer (Gradio app)")
    p.add_argument("--model", default=models.DEMO, help="default model: 'demo' (bundled), a hub id or a folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 inside containers / Spaces)")
    p.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    p.add_argument("--allow-local-models", action="store_true",
                   help="let visitors load model folders from this machine's disk (off by default; keep it off on Spaces)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow hub models to run their own code (off)")
    p.add_argument("--concurrency", type=int, default=1, help="model runs at the same time (default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--preload", action="store_true", help="load the default model before serving")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    on_spaces = bool(os.environ.get("SPACE_ID"))
    policy = models.ModelPolicy(default_model=args.model, allow_local=args.allow_local_models,
                                trust_remote_code=args.trust_remote_code, device=args.device, dtype=args.dtype)
    try:  # the operator's settings are checked before serving: exit 2 with the reason, no traceback
        resolve_device(args.device)
        if args.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {args.concurrency}")
        if args.preload or on_spaces:
            models.get_model(args.model, policy)  # ZeroGPU wants weights placed at start-up, outside GPU functions
    except ValueError as e:
        parser.error(str(e))
    demo = build_ui(policy, args.concurrency)
    launch(demo, "0.0.0.0" if on_spaces else args.host, args.port, args.share, args.concurrency)


if __name__ == "__main__":
    main()
