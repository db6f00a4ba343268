"""Statistics of the evaluator on synthetic rows with known outcomes: per-example seeds, draws and their spread,
paired bootstrap intervals, claim verdicts, and tables whose bold marks the best of a column."""
from __future__ import annotations

import numpy as np
import pytest

from tgvkv.eval import report
from tgvkv.eval.runner import example_seed, policy_options, row_key, summarise


def _row(ex: int, method: str, keep: float, score: float, draw: int | None = None, turn: str = "first") -> dict:
    r = {"example_id": f"e{ex:03d}", "example_index": ex, "method": method, "keep": keep, "protocol": "official",
         "turn": turn, "qtype": "ab"[ex % 2], "prediction": f"{method}{score}", "score": float(score),
         "kv_bytes_kept": 10, "kv_bytes_full": 100, "kv_fraction": 0.1, "new_tokens": 3, "tokens_per_s": 1.0,
         "prefill_s": 0.1, "decode_s": 0.1, "followup_s": 0.0}
    if draw is not None:
        r["draw"] = draw
    return r


def _rows(*lists: list[dict]) -> dict:
    return {row_key(r): r for rows in lists for r in rows}


# -- seeds ---------------------------------------------------------------------------------------------------------
def test_example_seed_is_per_example_and_reproducible():
    seeds = [example_seed(0, f"test-{i:05d}") for i in range(200)]
    assert len(set(seeds)) == 200 and all(0 <= s < 2**32 for s in seeds)
    assert example_seed(0, "test-00001") == example_seed(0, "test-00001")
    assert example_seed(1, "test-00001") != example_seed(0, "test-00001")
    # sha256("0:test-00001")[:4], little endian: pinned so that a run's draws stay reproducible across versions
    import hashlib

    assert example_seed(0, "test-00001") == int.from_bytes(hashlib.sha256(b"0:test-00001").digest()[:4], "little")
    # draw d of run seed s is draw 0 of run seed s + d; deterministic methods get no seed at all
    assert policy_options("random", 3, "x", draw=2) == {"seed": example_seed(5, "x")}
    assert policy_options("tgv-kv", 3, "x", draw=0) == {} and policy_options("full", 3, "x") == {}


def test_random_keeps_different_positions_for_prompts_of_one_length():
    """The bug this fixes: one shared seed gave every prompt of a length the same kept positions."""
    from tgvkv import run_selection

    T = 40
    attn = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    kept = {tuple(run_selection("random", [attn] * 2, [(4, 30)], 0.25, **policy_options("random", 0, f"e{i}")).kept[0])
            for i in range(8)}
    assert len(kept) == 8


def test_summary_of_several_draws_reports_mean_and_spread():
    # 4 examples, 3 draws: per-draw accuracies 0.25, 0.5, 0.75 -> mean 0.5, sd 0.25, range 0.25-0.75
    scores = {0: [1, 0, 0, 0], 1: [1, 1, 0, 0], 2: [1, 1, 1, 0]}
    rows = [_row(e, "full", 1.0, 1.0) for e in range(4)]
    rows += [_row(e, "random", 0.1, scores[d][e], draw=d) for d in range(3) for e in range(4)]
    rows += [_row(e, "tgv-kv", 0.1, e % 2) for e in range(4)]
    table = summarise(rows, ["tgv-kv", "random"], [0.1], ["official"])
    r = next(t for t in table if t["method"] == "random" and t["qtype"] == "all")
    assert (r["n"], r["draws"]) == (4, 3)
    assert r["accuracy"] == pytest.approx(0.5) and r["accuracy_sd"] == pytest.approx(0.25)
    assert (r["accuracy_min"], r["accuracy_max"]) == (0.25, 0.75)
    assert r["relative_to_full"] == pytest.approx(0.5)
    # ci95 on the per-example means over draws: 1, 2/3, 1/3, 0
    m = np.array([1, 2 / 3, 1 / 3, 0])
    assert r["ci95"] == pytest.approx(1.96 * m.std(ddof=1) / 2)
    t = next(t for t in table if t["method"] == "tgv-kv" and t["qtype"] == "all")
    assert (t["draws"], t["accuracy_min"], t["accuracy_max"]) == (1, 0.5, 0.5) and t["accuracy_sd"] != t["accuracy_sd"]


# -- bootstrap and verdicts ----------------------------------------------------------------------------------------
def test_bootstrap_interval_hand_cases():
    assert report.bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    # two examples with differences 0 and 1: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    lo, hi = report.bootstrap_ci([0.0, 1.0])
    assert (lo, hi) == (0.0, 1.0)
    assert report.bootstrap_ci([0.0, 1.0, 1.0, -1.0], seed=3) == report.bootstrap_ci([0.0, 1.0, 1.0, -1.0], seed=3)
    lo, hi = report.bootstrap_ci([])
    assert lo != lo and hi != hi
    # 200 examples, 30 better with A and 10 better with B: mean 0.1, se ~0.031 -> interval ~[0.04, 0.16]
    d = [1.0] * 30 + [-1.0] * 10 + [0.0] * 160
    lo, hi = report.bootstrap_ci(d)
    assert 0.03 < lo < 0.05 and 0.15 < hi < 0.17


@pytest.mark.parametrize("ci, expected", [((0.01, 0.2), "holds"), ((-0.2, -0.01), "does not hold"),
                                          ((-0.1, 0.1), "not distinguishable"), ((0.0, 0.0), "not distinguishable"),
                                          ((0.0, 0.3), "not distinguishable")])
def test_verdict_from_interval(ci, expected):
    assert report.verdict(ci) == expected


def _summary(rows: list[dict], methods: list[str], keeps: list[float]) -> dict:
    return {"table": summarise(rows, methods, keeps, ["official"]), "methods": methods, "keeps": keeps}


def test_claims_read_holds_fails_and_not_distinguishable_from_intervals():
    n = 100
    full = [_row(e, "full", 1.0, 1.0) for e in range(n)]
    tgv = [_row(e, "tgv-kv", k, 1.0 if (k == 0.05 or e < 50) else 0.0) for e in range(n) for k in (0.05, 0.1)]
    # 5%: random never right, streamingllm right on 98 -> tgv-kv (100) vs streamingllm: the interval starts at 0
    # (no resampled example among the 2 differing ones has probability 0.98^100 = 13% > 2.5%)
    rnd = [_row(e, "random", k, 0.0, draw=d) for e in range(n) for k in (0.05, 0.1) for d in range(2)]
    stream = [_row(e, "streamingllm", 0.05, 1.0 if e < 98 else 0.0) for e in range(n)]
    stream += [_row(e, "streamingllm", 0.1, 1.0) for e in range(n)]  # 10%: streamingllm always right, tgv-kv on 50
    h2o = [_row(e, "h2o", k, 0.0) for e in range(n) for k in (0.05, 0.1)]
    rows = full + tgv + rnd + stream + h2o
    lines = report.claims(_rows(rows), _summary(rows, ["tgv-kv", "random", "streamingllm", "h2o"], [0.05, 0.1]),
                          "official", "first")
    c1, c2_5, c2_10 = lines
    # 1: tgv-kv right everywhere at 5%: 1 - 0.95 = +5 pts on every example -> interval [5, 5]
    assert c1.startswith("1. TGV-KV at 5% keeps >= 95% of full-KV accuracy: **holds**") and "[95% CI +5.0, +5.0]" in c1
    assert c2_5.startswith("2. TGV-KV beats random, StreamingLLM and H2O at 5%: **not distinguishable**")
    assert "random (mean of 2 draws): 100.0 vs 0.0, diff +100.0 pts [95% CI +100.0, +100.0], sign test p=1.6e-30: holds" in c2_5
    assert "streamingllm: 100.0 vs 98.0, diff +2.0 pts [95% CI +0.0, +5.0], sign test p=0.5: not distinguishable" in c2_5
    assert c2_10.startswith("2. TGV-KV beats random, StreamingLLM and H2O at 10%: **does not hold**")
    assert "streamingllm: 50.0 vs 100.0, diff -50.0 pts" in c2_10


def test_claims_also_at_more_budgets():
    """--also-at checks claims 1 and 2 at more budgets; each claim's own budgets stay first and are not repeated."""
    n = 40
    rows = [_row(e, "full", 1.0, 1.0) for e in range(n)]
    for k, right in ((0.05, 0), (0.1, 0), (0.25, 39)):  # tgv-kv right on `right` examples; the baselines never
        rows += [_row(e, "tgv-kv", k, 1.0 if e < right else 0.0) for e in range(n)]
        rows += [_row(e, b, k, 0.0) for e in range(n) for b in ("random", "streamingllm", "h2o")]
    summary = _summary(rows, ["tgv-kv", "random", "streamingllm", "h2o"], [0.05, 0.1, 0.25])
    paper = report.claims(_rows(rows), summary, "official", "first")
    assert [line[:30] for line in paper] == [
        "1. TGV-KV at 5% keeps >= 95% o", "2. TGV-KV beats random, Stream", "2. TGV-KV beats random, Stream"]
    lines = report.claims(_rows(rows), summary, "official", "first", also_at=(0.25, 0.1))
    # claim 1 gains 10% and 25%; claim 2 already has 10%, so it gains 25% only
    assert len(lines) == 6 and lines[:1] == paper[:1] and lines[3:5] == paper[1:]
    assert lines[1].startswith("1. TGV-KV at 10% keeps >= 95% of full-KV accuracy: **does not hold** (0.0% vs")
    # 25%: 39 of 40 right: 97.5% vs full 100%; per example 1 - 0.95 = +0.05 on 39 and -0.95 on one: mean +2.5 pts
    assert lines[2].startswith("1. TGV-KV at 25% keeps >= 95% of full-KV accuracy: **not distinguishable** (97.5% vs "
                               "full 100.0%")
    assert lines[5].startswith("2. TGV-KV beats random, StreamingLLM and H2O at 25%: **holds**")
    with pytest.raises(SystemExit):
        report.main(["--also-at", "0,2", "unused"])


def test_ablation_claim_and_worst_variant():
    n = 60
    acc = {"tgv-kv": 50, "tgv-tv-tt": 30, "tgv-vv-tt": 10, "tgv-evict-text-first": 0, "tgv-self-attn": 0}
    rows = [_row(e, "full", 1.0, 1.0) for e in range(n)]
    rows += [_row(e, m, 0.05, 1.0 if e < a else 0.0) for m, a in acc.items() for e in range(n)]
    lines = report.claims(_rows(rows), _summary(rows, list(acc), [0.05]), "official", "first")
    c3 = next(line for line in lines if line.startswith("3."))
    assert c3.startswith("3. at 5%: full TGV-KV >= TV+TT >= VV+TT: **holds** (83.3 / 50.0 / 16.7;")
    assert "evict-text-first is the worst variant: **not distinguishable** (0.0%; not distinguishable from: tgv-self-attn)" in c3


# -- tables --------------------------------------------------------------------------------------------------------
def test_bold_marks_the_best_method_of_each_column_not_tgv_kv():
    n = 10
    acc = {("tgv-kv", 0.05): 0, ("snapkv", 0.05): 2, ("h2o", 0.05): 1,
           ("tgv-kv", 0.5): 8, ("snapkv", 0.5): 8, ("h2o", 0.5): 3}
    rows = [_row(e, "full", 1.0, 1.0) for e in range(n)]
    rows += [_row(e, m, k, 1.0 if e < a else 0.0) for (m, k), a in acc.items() for e in range(n)]
    text = report.accuracy_table(_summary(rows, ["tgv-kv", "snapkv", "h2o"], [0.05, 0.5]), "official", "first")
    lines = text.splitlines()
    assert lines[2] == "| full KV (n=10) | 100.0 | 100.0 |"  # the reference is never bold
    assert lines[3] == "| tgv-kv | 0.0 (0.0) | **80.0 (80.0)** |"
    assert "| h2o | 10.0 (10.0) | 30.0 (30.0) |" in lines
    assert "| snapkv | **20.0 (20.0)** | **80.0 (80.0)** |" in lines  # ties: every best is bold


def test_table_shows_the_spread_of_seeded_draws_and_the_curve_table():
    rows = [_row(e, "full", 1.0, 1.0) for e in range(4)]
    rows += [_row(e, "random", 0.1, float(e < d + 1), draw=d) for d in range(3) for e in range(4)]
    summary = _summary(rows, ["random"], [0.1])
    assert "| random | **50.0 ± 25.0 (50.0)** |" in report.accuracy_table(summary, "official", "first")
    old = _summary([_row(e, m, k, 0.0) for e in range(4) for m, k in (("full", 1.0), ("random", 0.1))], ["random"], [0.1])
    curve = report.curve_table([("one seed", old), ("3 seeds", summary)], "random").splitlines()
    assert curve[0] == "| evaluation | draws | 10% |"
    assert curve[2:] == ["| one seed | 1 | 0.0 |", "| 3 seeds | 3 | 50.0 ± 25.0 [25.0-75.0] |"]
