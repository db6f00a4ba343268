"""Benchmark plumbing: the bandwidth bound, measured KV bytes at 5%, and the CLI writing its files (no timing asserts)."""
from __future__ import annotations

import json

import pytest
from tiny_models import random_image, tiny_llava

from tgvkv.bench import bound
from tgvkv.bench.__main__ import main
from tgvkv.generation import CaptureOptions, RunOptions, generate


def test_bound_on_the_issue_example():
    rows = {r.batch: r for r in bound.llava15_7b_example(prompt_tokens=2048, keep=0.05)}
    assert bound.kv_bytes_per_token(32, 32, 128, 2) == 512 * 1024
    assert rows[1].kv_bytes_per_seq == 2**30  # 2k tokens x 512 KiB
    assert 1.06 <= rows[1].bound <= 1.09  # "about 1.07x at batch 1"
    assert 2.0 <= rows[16].bound <= 2.2  # "about 2.1x at batch 16"
    assert rows[1].bound < rows[4].bound < rows[16].bound


def test_bound_formula_limits():
    assert bound.speedup_bound(10.0, 5.0, 4, 1.0) == 1.0
    assert bound.speedup_bound(0.0, 5.0, 4, 0.25) == pytest.approx(4.0)  # no weights: 1 / k
    assert bound.speedup_bound(10.0, 5.0, 2, 0.5) == pytest.approx(20 / 15)
    assert bound.bytes_per_token(10.0, 5.0, 2, 0.5) == pytest.approx(7.5)
    assert bound.max_batch(100.0, 20.0, 7.0) == 11
    with pytest.raises(ValueError):
        bound.speedup_bound(1.0, 1.0, 0, 0.5)


def test_decode_weight_bytes_counts_the_lm_and_head_once():
    model, _ = tiny_llava(seed=0)
    lm, head, emb = model.get_decoder(), model.get_output_embeddings(), model.get_input_embeddings()
    expected = sum(p.numel() for p in lm.parameters()) + head.weight.numel()
    if head.weight is not emb.weight:
        expected -= emb.weight.numel()
    assert bound.decode_weight_bytes(model) == 4 * expected


def test_kv_bytes_at_5_percent_within_6_percent_on_an_image_dominated_prompt():
    model, proc = tiny_llava(seed=2, image_size=128)  # 256 image tokens, ~12 text tokens
    res = generate(model, proc, [random_image(3, (128, 128))], "what is the colour of the circle ?", "tgv-kv", 0.05,
                   options=RunOptions(max_new_tokens=2), capture=CaptureOptions(diagnostics=False, hidden_states=False))
    layout = res.trace.layout
    assert layout.n_vision / layout.seq_len > 0.9
    ratio = res.trace.kv_bytes_kept.sum() / res.trace.kv_bytes_full.sum()
    assert ratio <= 0.06
    # measured from storages: exactly the kept slots, K and V, fp32, 2 kv heads x 16 dims
    assert res.trace.kv_bytes_kept.sum() == 2 * 2 * 16 * 4 * res.trace.budgets.sum()


def test_cli_writes_files(tmp_path):
    out = str(tmp_path)
    main(["bound", "--out", out])
    main(["prefill", "--out", out, "--lengths", "96", "--reps", "1", "--hidden", "64", "--heads", "4", "--kv-heads",
          "2", "--intermediate", "128", "--diagnostics"])
    main(["decode", "--out", out, "--model", "synth", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
          "--intermediate", "128", "--layers", "2", "--grid", "8", "--methods", "tgv-kv", "--keeps", "0.1",
          "--batches", "1", "2", "--batch-keeps", "0.1", "--new-tokens", "3", "--reps", "1"])
    main(["plot", "--out", out])
    main(["report", "--out", out])
    ref = json.loads((tmp_path / "bound_reference.json").read_text())
    assert [r["batch"] for r in ref["rows"]] == [1, 4, 16]
    pre = json.loads((tmp_path / "prefill.json").read_text())["rows"]
    assert {r["variant"] for r in pre} == {"sdpa", "tgvkv", "tgvkv+diag", "eager"}
    dec = json.loads((tmp_path / "decode.json").read_text())["rows"]
    batch = [r for r in dec if r["mode"] == "batch"]
    assert {(r["method"], r["batch"]) for r in batch} == {("full", 1), ("tgv-kv", 1), ("full", 2), ("tgv-kv", 2)}
    assert all(r["bound"] >= 1.0 and r["kv_bytes_kept"] <= r["kv_bytes_full"] for r in dec)
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert (tmp_path / "decode.csv").read_text().startswith("mode,")
    checks = json.loads((tmp_path / "summary.json").read_text())
    assert set(checks["batched_5pct"]) == set() and "kv_kept_fraction_at_5pct" in checks  # keeps were 0.1 only
    assert "| B | method |" in (tmp_path / "summary.md").read_text()
