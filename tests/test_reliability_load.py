"""Load test: `python app.py` in a subprocess on 127.0.0.1, 8 concurrent gradio_client sessions x 5 requests.

Every request has its own image (a test-split demo scene, or a random image for the tiny fallback model), question,
method and keep ratio. Each answer must equal the engine's answer for that same input computed in this process
(token ids of the full and the evicted run), each session's follow-up /overlay call must describe its own last
run, no request may fail, and the server's resident memory (psutil, process + children, sampled every 0.2 s) must
stay bounded. The figures go to load_test.json in the artifacts_dir fixture (a temporary folder; the committed
results/load_test.json that docs/reliability.md quotes is refreshed by `python -m analysis.webapp.refresh_figures`).

Runs in the normal suite (about a minute on 2 shared CPU cores with the demo model).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from tiny_models import random_image, tiny_llava

REPO = Path(__file__).resolve().parent.parent
SESSIONS, REQUESTS = 8, 5
METHODS = ["tgv-kv", "h2o", "snapkv", "streamingllm", "random", "pyramidkv", "tgv-vv-tt", "prefixkv"]
KEEPS = [5, 10, 20, 35, 50]
MAX_NEW = 8
RSS_GROWTH_LIMIT = 1024 * 2**20  # peak - start (bytes): 40 runs must not accumulate
STARTUP_TIMEOUT_S = 120
REPORT_NAME = "load_test.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class RssSampler(threading.Thread):
    def __init__(self, pid: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.proc, self.period, self.samples, self.stop = psutil.Process(pid), period, [], threading.Event()

    def run(self) -> None:
        t0 = time.time()
        while not self.stop.is_set():
            try:
                self.samples.append((round(time.time() - t0, 2), _rss(self.proc)))
            except psutil.NoSuchProcess:
                return
            time.sleep(self.period)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """Model folder (private copy), 40 distinct (image file, question, method, keep %) requests, model kind."""
    from tgvkv.loading import DEMO_MODEL_DIR

    root = tmp_path_factory.mktemp("load")
    requests = []
    if (DEMO_MODEL_DIR / "model.safetensors").is_file():
        shutil.copytree(DEMO_MODEL_DIR, root / "model")  # training may rewrite assets/demo-vlm meanwhile
        from tgvkv.demo import dataset

        kind = "demo"
        for i, qa in enumerate(dataset("test", SESSIONS * REQUESTS, start=100)):
            path = root / f"scene_{i}.png"
            qa.scene.render().save(path)
            requests.append((path, qa.question, qa.answer))
    else:
        kind = "tiny-random"
        model, proc = tiny_llava(seed=5)
        model.save_pretrained(root / "model")
        proc.save_pretrained(root / "model")
        for i in range(SESSIONS * REQUESTS):
            path = root / f"random_{i}.png"
            random_image(1000 + i, (40 + i % 7, 32 + i % 5)).save(path)
            requests.append((path, "what is the colour of the circle ?", None))
    jobs = [[(*requests[s * REQUESTS + r], METHODS[s], KEEPS[r]) for r in range(REQUESTS)] for s in range(SESSIONS)]
    return root / "model", jobs, kind


def _expected(model_dir: Path, jobs) -> dict[Path, dict]:
    """The engine's answers for every request, in this process (same intake, options and seed as the app)."""
    from tgvkv import CaptureOptions, RunOptions, compare
    from tgvkv.images import load_image_file
    from tgvkv.loading import LoadOptions, load_model

    model, processor = load_model(model_dir, LoadOptions(device="cpu", dtype="float32"))
    out = {}
    for session in jobs:
        for path, question, _, method, keep in session:
            cmp = compare(model, processor, [load_image_file(path)], question, method, keep / 100, MAX_NEW,
                          options=RunOptions(max_new_tokens=MAX_NEW, protocol="official", seed=0),
                          capture=CaptureOptions())
            out[path] = {"full": cmp.full.token_ids.tolist(), "evicted": cmp.evicted.token_ids.tolist(),
                         "full_text": cmp.full.text, "evicted_text": cmp.evicted.text}
    return out


def _start_server(model_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "app.py"), "--host", "127.0.0.1", "--port", str(port), "--model", str(model_dir),
           "--device", "cpu", "--preload"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)


def _wait_ready(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    import httpx

    deadline = time.time() + STARTUP_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "config", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"app not ready after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


def _session(url: str, model: str, jobs, results: list, errors: list) -> None:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    for path, question, _, method, keep in jobs:
        t0 = time.perf_counter()
        try:
            summary = client.predict(handle_file(str(path)), question, model, method, keep, MAX_NEW,
                                     api_name="/compare")[-1]
            _, caption = client.predict(0, "layer", api_name="/overlay")
        except Exception as e:  # noqa: BLE001 - every failure is recorded and fails the test below
            errors.append(f"{path.name} {method}: {type(e).__name__}: {e}")
            continue
        results.append({"path": path, "question": question, "method": method, "keep": keep, "summary": summary,
                        "overlay_caption": caption, "latency_s": time.perf_counter() - t0})


def _pass(url: str, model_dir: Path, jobs) -> tuple[list[dict], list[str], float]:
    """One round: SESSIONS new client sessions in parallel threads, REQUESTS requests each."""
    results: list[dict] = []
    errors: list[str] = []
    t0 = time.time()
    threads = [threading.Thread(target=_session, args=(url, str(model_dir), jobs[s], results, errors))
               for s in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results, errors, time.time() - t0


def test_eight_sessions_five_requests_each(workload, artifacts_dir):
    """Pass 1 is the measured load; pass 2 repeats it with 8 new sessions to show memory levels off (every
    session keeps its last run in gr.State until its time-to-live)."""
    model_dir, jobs, kind = workload
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = model_dir.parent / "app.log"
    t_start = time.time()
    server = _start_server(model_dir, port, log_path)
    try:
        _wait_ready(url, server, log_path)
        startup_s = time.time() - t_start
        sampler = RssSampler(server.pid)
        sampler.start()
        time.sleep(0.5)
        proc = psutil.Process(server.pid)
        rss_start = _rss(proc)
        results, errors, wall_s = _pass(url, model_dir, jobs)
        time.sleep(0.5)
        rss_end = _rss(proc)
        results2, errors2, wall2_s = _pass(url, model_dir, jobs)
        time.sleep(0.5)
        rss_end2 = _rss(proc)
        sampler.stop.set()
        sampler.join()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    expected = _expected(model_dir, jobs)

    mismatches = []
    for r in results + results2:
        want, got = expected[r["path"]], r["summary"]
        if (got["full"]["token_ids"], got["evicted"]["token_ids"]) != (want["full"], want["evicted"]):
            mismatches.append(f"{r['path'].name} {r['method']}: got {got['evicted']['answer']!r}, "
                              f"expected {want['evicted_text']!r}")
        if got["question"] != r["question"] or got["method"] != r["method"] or got["keep_ratio"] != r["keep"] / 100:
            mismatches.append(f"{r['path'].name}: the summary describes another request ({got['question']!r})")
        if f"({r['method']})" not in r["overlay_caption"]:
            mismatches.append(f"{r['path'].name}: overlay of another session's run: {r['overlay_caption'][:120]!r}")
    lat = sorted(r["latency_s"] for r in results)
    rss = [b for _, b in sampler.samples] or [rss_start]
    peak = max(rss + [rss_start, rss_end])
    refs = [r for r in results if expected[r["path"]]["full_text"] is not None]
    report = {
        "model": kind, "sessions": SESSIONS, "requests_per_session": REQUESTS, "requests": SESSIONS * REQUESTS,
        "completed": len(results), "errors": len(errors), "mismatches": len(mismatches),
        "request": "/compare (full KV + evicted + teacher-forced, 8 new tokens) then /overlay, same session",
        "server": "python app.py --device cpu --preload (default concurrency 1, queue max 32), OMP_NUM_THREADS=1",
        "startup_s": round(startup_s, 2), "wall_s": round(wall_s, 2),
        "latency_s": {"p50": round(statistics.median(lat), 3) if lat else None,
                      "p95": round(lat[min(len(lat) - 1, int(np.ceil(0.95 * len(lat))) - 1)], 3) if lat else None,
                      "max": round(lat[-1], 3) if lat else None},
        "throughput_rps": round(len(results) / wall_s, 3) if wall_s else None,
        "rss_mib": {"start": round(rss_start / 2**20, 1), "peak": round(peak / 2**20, 1),
                    "end": round(rss_end / 2**20, 1)},
        "rss_growth_limit_mib": RSS_GROWTH_LIMIT // 2**20,
        "second_pass": {"sessions": SESSIONS, "requests": SESSIONS * REQUESTS, "completed": len(results2),
                        "errors": len(errors2), "wall_s": round(wall2_s, 2), "rss_end_mib": round(rss_end2 / 2**20, 1),
                        "rss_growth_over_pass_mib": round((rss_end2 - rss_end) / 2**20, 1)},
        "rss_samples_mib": [(t, round(b / 2**20, 1)) for t, b in sampler.samples[:: max(1, len(sampler.samples) // 60)]],
        "full_answers_equal_to_scene_reference": (sum(r["summary"]["full"]["answer"] == r_ref for r, r_ref in
                                                      ((r, next(j[2] for s in jobs for j in s if j[0] == r["path"]))
                                                       for r in refs)) if kind == "demo" else None),
        "error_messages": errors[:10], "mismatch_messages": mismatches[:10],
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "cpu_count": os.cpu_count(),
    }
    (artifacts_dir / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    assert not errors and not errors2, (errors + errors2)[:5]
    assert len(results) == len(results2) == SESSIONS * REQUESTS
    assert not mismatches, mismatches[:5]
    assert peak - rss_start < RSS_GROWTH_LIMIT, report["rss_mib"]
    assert rss_end2 - rss_end < (rss_end - rss_start) / 2 + 64 * 2**20, report["second_pass"]  # levels off
