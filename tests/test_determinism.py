"""Determinism: the same input, options and seed give bit-identical traces, within a process and in a fresh one.

Compared: kept masks, budgets, scores, captured attention rows / column sums, selection info, prompt and output
token ids, output text, decode evictions, KV byte counts. Same machine, same torch thread count, same versions
(the conditions docs/reliability.md states); timings are excluded.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import random_image, tiny_llava

from tgvkv import RunOptions, Trace, generate
from tgvkv.loading import LoadOptions, load_model

REPO = Path(__file__).resolve().parent.parent
CASES = [  # (method, keep, run options)
    ("tgv-kv", 0.2, {}),
    ("h2o", 0.3, {"protocol": "strict"}),
    ("random", 0.25, {}),
    ("snapkv", 0.5, {"followup": "where is the circle ?"}),
    ("tgv-kv", 0.5, {"do_sample": True, "temperature": 1.3, "top_p": 0.9, "seed": 7}),
]
QUESTION = "what is the colour of the circle ?"
ARRAY_FIELDS = ["prompt_ids", "budgets", "kept_mask", "scores", "query_positions", "query_rows", "column_sums",
                "block_sums", "output_ids", "decode_evictions", "followup_ids", "kv_bytes_full", "kv_bytes_kept",
                "kv_bytes_final", "cache_len_final"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("det_model")
    model, proc = tiny_llava(seed=3, layers=3)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    random_image(11, (48, 40)).save(path / "image.png")
    return path


def _run(model, proc, image, method, keep, opts) -> Trace:
    return generate(model, proc, [image], QUESTION, method, keep, options=RunOptions(max_new_tokens=6, **opts),
                    model_name="tiny").trace


def _assert_same(a: Trace, b: Trace, label: str) -> None:
    for name in ARRAY_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, f"{label}: {name} present in one run only"
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, f"{label}: {name} {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), f"{label}: {name} differs"
    assert sorted(a.selection_info) == sorted(b.selection_info)
    for k in a.selection_info:
        x, y = np.asarray(a.selection_info[k]), np.asarray(b.selection_info[k])
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), f"{label}: selection_info[{k}] differs"
    assert (a.output_text, a.followup_text, a.layout.image_spans) == (b.output_text, b.followup_text, b.layout.image_spans)
    assert a.policy == b.policy and a.seed == b.seed


def test_same_input_same_trace_in_process(folder):
    model, proc = load_model(folder, LoadOptions(device="cpu"))
    image = random_image(11, (48, 40))
    for method, keep, opts in CASES:
        first = _run(model, proc, image, method, keep, opts)
        torch.manual_seed(12345)  # global RNG state must not matter
        np.random.seed(999)
        second = _run(model, proc, image, method, keep, opts)
        _assert_same(first, second, f"{method} {keep} {opts}")
        assert first.kept_mask is not None and first.output_ids is not None and len(first.output_ids) >= 1


def test_different_seed_changes_sampled_answer_only_through_the_seed(folder):
    """Sanity check that the seed is used: random eviction with another seed keeps other positions."""
    model, proc = load_model(folder, LoadOptions(device="cpu"))
    image = random_image(11, (48, 40))
    a = generate(model, proc, [image], QUESTION, "random", 0.25, options=RunOptions(max_new_tokens=2),
                 policy_options={"seed": 0}).trace
    b = generate(model, proc, [image], QUESTION, "random", 0.25, options=RunOptions(max_new_tokens=2),
                 policy_options={"seed": 1}).trace
    assert not np.array_equal(a.kept_mask, b.kept_mask)


SCRIPT = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    from tiny_models import random_image
    from tgvkv import RunOptions, generate
    from tgvkv.loading import LoadOptions, load_model
    torch.set_num_threads({threads})
    model, proc = load_model({folder!r}, LoadOptions(device="cpu"))
    image = random_image(11, (48, 40))
    for i, (method, keep, opts) in enumerate({cases!r}):
        res = generate(model, proc, [image], {question!r}, method, keep, options=RunOptions(max_new_tokens=6, **opts),
                       model_name="tiny")
        res.trace.save({out!r} + f"/trace{{i}}.npz")
""")


def test_fresh_process_gives_the_same_traces(folder, tmp_path):
    model, proc = load_model(folder, LoadOptions(device="cpu"))
    image = random_image(11, (48, 40))
    script = SCRIPT.format(tests=str(REPO / "tests"), threads=torch.get_num_threads(), folder=str(folder),
                           cases=CASES, question=QUESTION, out=str(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1",
           "PYTHONHASHSEED": "random", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    for i, (method, keep, opts) in enumerate(CASES):
        here = _run(model, proc, image, method, keep, opts)
        there = Trace.load(tmp_path / f"trace{i}.npz")
        _assert_same(here, there, f"fresh process: {method} {keep} {opts}")
