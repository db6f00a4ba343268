"""Latency of one full + evicted comparison with every diagnostic, after the model is loaded.

    python -m analysis.webapp.bench_app [--repeats 3] [--no-api] [--no-browser]  ->  results/app_latency.json

Three views of the same work, each over the 7 example scenes (demo model, tgv-kv at 10%, 32 new tokens):
- handlers: `run_comparison` + `diagnostics` called directly (model time + figure building);
- api: `/compare` then `/diagnostics` through gradio_client against the app on 127.0.0.1 (adds queueing,
  pre/post-processing and JSON transport);
- browser: click "Run" in headless Chromium until every pending event has finished and the page has drawn
  (adds plotly rendering in the page).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Callable

from PIL import Image

from tgvkv.loading import REPO_ROOT
from . import models as M
from .examples import load_examples
from .state import run_comparison
from .ui import build_ui, launch
from .views import diagnostics

OUT = REPO_ROOT / "results" / "app_latency.json"
KEEP, MAX_NEW, METHOD = 10, 32, "tgv-kv"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"n": len(xs), "median_s": statistics.median(xs), "p90_s": xs[min(len(xs) - 1, int(0.9 * len(xs)))],
            "max_s": xs[-1], "min_s": xs[0]}


def _timed(fn: Callable[[], object], repeats: int, items: list) -> list[float]:
    out = []
    for _ in range(repeats):
        for it in items:
            t = time.perf_counter()
            fn(it)
            out.append(time.perf_counter() - t)
    return out


def bench_handlers(examples, repeats: int) -> dict:
    def one(e):
        run = run_comparison(Image.open(e.path), e.question, M.DEMO, METHOD, KEEP, MAX_NEW)
        diagnostics(run)

    one(examples[0])  # warm-up: imports, first figures
    return _stats(_timed(one, repeats, examples))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_api_and_browser(examples, repeats: int, browser: bool) -> dict:
    from gradio_client import Client, handle_file

    demo = build_ui()  # the app's own page and limits, as app.py serves them
    launch(demo, "127.0.0.1", _free_port(), prevent_thread_lock=True)
    out: dict = {}
    try:
        client = Client(demo.local_url, verbose=False)

        def one(e):
            client.predict(handle_file(str(e.path)), e.question, M.DEMO, METHOD, KEEP, MAX_NEW, api_name="/compare")
            client.predict(api_name="/diagnostics")

        one(examples[0])
        out["api"] = _stats(_timed(one, repeats, examples))
        if browser:
            out["browser"] = _stats(_browser(demo.local_url, examples, repeats))
    finally:
        demo.close()
    return out


def _browser(url: str, examples, repeats: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    idle = ("() => [...document.querySelectorAll('[data-testid=status-tracker]')].every(e => e.classList.contains('hide'))"
            " && document.querySelector('#overlay-image img') !== null")
    times = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = b.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.wait_for_selector("#run")
        for i in range(repeats * len(examples) + 1):
            e = examples[i % len(examples)]
            page.locator("#image input[type=file]").set_input_files(str(e.path))
            page.locator("#question textarea, #question input").first.fill(e.question)
            page.wait_for_timeout(300)
            t = time.perf_counter()
            page.locator("#run").click()
            page.wait_for_timeout(50)
            page.wait_for_function(idle)
            page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
            if i:  # the first click is the warm-up
                times.append(time.perf_counter() - t)
        b.close()
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-api", action="store_true")
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    import torch

    examples = load_examples("scene")
    t = time.perf_counter()
    loaded = M.get_model(M.DEMO, M.ModelPolicy())
    load_s = time.perf_counter() - t
    result = {
        "what": "one full + evicted comparison (3 generations: full, evicted, teacher-forced KL) with every diagnostic "
                "figure and the Explain walkthrough, after the model is loaded",
        "setup": {"model": "demo (assets/demo-vlm)", "method": METHOD, "keep_percent": KEEP, "max_new_tokens": MAX_NEW,
                  "examples": len(examples), "repeats": args.repeats, "device": loaded.device, "dtype": loaded.dtype,
                  "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                  "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                  "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "load_average_1_5_15_at_start": list(os.getloadavg())},
        "model_load_s": load_s,
        "handlers": bench_handlers(examples, args.repeats),
    }
    if not args.no_api:
        result.update(bench_api_and_browser(examples, args.repeats, not args.no_browser))
    result["setup"]["load_average_1_5_15_at_end"] = list(os.getloadavg())  # the machine is shared: read with this
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
