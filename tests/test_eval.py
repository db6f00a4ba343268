"""The evaluator (tgvkv.eval): metrics, tasks, CLI outputs, resume after a kill, data-parallel merge, determinism."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tgvkv.eval import metrics
from tgvkv.eval.__main__ import main as eval_main
from tgvkv.eval.runner import (
    SUMMARY_COLUMNS, TIMING_COLUMNS, TIMING_FIELDS, available_methods, read_rows, resolve_methods, summarise,
)
from tgvkv.eval.tasks import load_task

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["what is the colour of the shape ?", "where is the circle ?", "what is the shape ?"]
N_EXAMPLES = 6
METHODS = "tgv-kv,h2o,random"
KEEPS = "0.1,0.5"
N_UNITS = N_EXAMPLES * (1 + 3 * 2 * 2)  # full KV once per example + 3 methods x 2 budgets x 2 protocols
N_FOLLOWUP = N_EXAMPLES // 2  # examples 0, 2, 4 have a follow-up
N_ROWS = N_UNITS + N_FOLLOWUP * (1 + 3 * 2 * 2)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _args(model: Path, task: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--task", str(task), "--methods", METHODS, "--keep", KEEPS,
            "--protocols", "official,strict", "--max-new-tokens", "5", "--threads", "1", "--no-progress",
            "--out", str(out)]


def _deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def _summary(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny LLaVA saved as a local folder, a 6-example JSONL folder task, and one uninterrupted reference run.

    Half of the reference answers are the tiny model's own full-KV answers, so scores are not all zero."""
    import torch
    from tiny_models import random_image, tiny_llava

    from tgvkv.generation import CaptureOptions, RunOptions, generate

    root = tmp_path_factory.mktemp("eval")
    model, proc = tiny_llava()
    model.save_pretrained(root / "tiny")
    proc.save_pretrained(root / "tiny")
    task = root / "task"
    (task / "img").mkdir(parents=True)
    lines = []
    torch.set_num_threads(1)
    for i in range(N_EXAMPLES):
        img = random_image(i)
        img.save(task / "img" / f"{i}.png")
        d = {"image": f"img/{i}.png", "question": QUESTIONS[i % 3], "answers": ["red"], "qtype": "ab"[i % 2]}
        if i % 2 == 0:
            d.update(followup_question="and where ?", followup_answers=["left"])
        if i < 3:  # the model's own answer (as it will be decoded by the evaluator) as a reference
            res = generate(model, proc, [img], d["question"], None, 1.0, options=RunOptions(max_new_tokens=5),
                           capture=CaptureOptions(diagnostics=False, hidden_states=False))
            d["answers"] = [res.text] * 3 + ["x"]  # >= 3 references -> VQA metric under --metric auto; 3 matches = 1.0
        lines.append(json.dumps(d))
    (task / "data.jsonl").write_text("\n".join(lines) + "\n")
    ref = root / "ref"
    assert eval_main(_args(root / "tiny", task, ref)) == 0
    return root, root / "tiny", task, ref


# -- metrics -------------------------------------------------------------------------------------------------------
def test_exact_match_normalises():
    assert metrics.exact_match("Two dogs.", ["2 dogs"]) == 1.0
    assert metrics.exact_match("The cat", ["a cat", "dog"]) == 1.0
    assert metrics.exact_match("cat", ["dog"]) == 0.0
    assert metrics.exact_match("the circle is red .", ["The circle is red."], metrics.normalise_basic) == 1.0
    assert metrics.exact_match("the circle is red", ["the circle is red ."], metrics.normalise_basic) == 0.0


def test_vqa_accuracy_simple_and_official():
    refs = ["yes"] * 2 + ["no"] * 8
    assert metrics.vqa_accuracy("yes", refs) == pytest.approx(2 / 3)
    assert metrics.vqa_accuracy("no", refs) == 1.0
    assert metrics.vqa_accuracy("maybe", refs) == 0.0
    three = ["2"] * 3 + ["x"] * 7
    assert metrics.vqa_accuracy("two", three) == 1.0  # simple form: min(3/3, 1)
    assert metrics.vqa_accuracy_official("two", three) == pytest.approx(0.9)  # (3 * 2/3 + 7 * 1) / 10
    assert metrics.vqa_accuracy_official("2", ["2"] * 10) == 1.0
    assert metrics.score("vqa", "Yes!", refs) == pytest.approx(2 / 3)


def test_anls_threshold():
    assert metrics.anls("hello", ["hello"]) == 1.0
    assert metrics.anls("helo", ["hello"]) == pytest.approx(0.8)  # 1 edit / 5
    assert metrics.anls("Hello  World", ["hello world"]) == 1.0
    assert metrics.anls("abc", ["xyz"]) == 0.0
    assert metrics.anls("abcd", ["abxy"]) == 0.0  # NL = 0.5 is not < 0.5
    assert metrics.anls("abcde", ["abxde", "zzzzz"]) == pytest.approx(0.8)  # best reference
    assert metrics.levenshtein("kitten", "sitting") == 3
    with pytest.raises(ValueError):
        metrics.score("bleu", "a", ["a"])


# -- tasks ---------------------------------------------------------------------------------------------------------
def test_folder_task_parsing(setup, tmp_path):
    _, _, task, _ = setup
    t = load_task(str(task))
    assert len(t.examples) == N_EXAMPLES
    ex = t.examples[0]
    assert ex.metric == "vqa" and ex.followup_question == "and where ?" and ex.followup_answers == ("left",)
    assert t.examples[3].metric == "exact" and t.examples[1].followup_question is None
    assert ex.load_images()[0].size == (40, 32)
    assert len(load_task(str(task / "data.jsonl"), limit=2).examples) == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data.jsonl").write_text(json.dumps({"image": "missing.png", "question": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="image file not found"):
        load_task(str(bad))
    (bad / "data.jsonl").write_text(json.dumps({"image": "missing.png", "question": "", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="question"):
        load_task(str(bad))
    with pytest.raises(ValueError, match="neither"):
        load_task(str(tmp_path / "nope"))


def test_demo_task_is_balanced():
    pytest.importorskip("tgvkv.demo.scenes")
    from tgvkv.demo import scenes

    t = load_task("demo", limit=14)
    assert [e.qtype for e in t.examples] == list(scenes.QUESTION_TYPES) * 2
    assert all(e.metric == "exact" and e.followup_question for e in t.examples)
    assert t.normalise("The circle is red.") == "the circle is red ."
    assert len({e.id for e in t.examples}) == 14


def test_methods_come_from_the_registry():
    from tgvkv.policies import POLICIES

    names = available_methods()
    assert names[0] == "tgv-kv" and "full" not in names and "tgv-ablation" not in names
    # every other registered policy, including baselines that others subclass (pyramidkv subclasses snapkv)
    assert set(names) == set(POLICIES) - {"full", "tgv-ablation"} and {"snapkv", "pyramidkv"} <= set(names)
    assert resolve_methods(["tgv-kv", "full", "all"]) == names
    with pytest.raises(ValueError, match="unknown method"):
        resolve_methods(["nope"])


# -- CLI outputs ---------------------------------------------------------------------------------------------------
def test_cli_writes_rows_summary_and_plots(setup):
    _, _, task, ref = setup
    for name in ("rows.jsonl", "summary.csv", "summary.json", "accuracy_vs_budget.png", "accuracy_vs_budget.html", "run.json"):
        assert (ref / name).stat().st_size > 0, name
    assert not list(ref.glob("rows.rank*.jsonl"))  # folded into rows.jsonl
    assert (ref / "accuracy_vs_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plotly" in (ref / "accuracy_vs_budget.html").read_text()

    rows = read_rows(ref / "rows.jsonl")
    assert len(rows) == N_ROWS
    t = load_task(str(task))
    by_id = {e.id: e for e in t.examples}
    for r in rows:
        ex = by_id[r["example_id"]]
        refs = ex.answers if r["turn"] == "first" else ex.followup_answers
        assert r["references"] == list(refs)
        assert r["score"] == metrics.score(ex.metric, r["prediction"], refs)
        assert 0 < r["kv_bytes_kept"] <= r["kv_bytes_full"]
        if r["method"] == "full":
            assert r["kv_bytes_kept"] == r["kv_bytes_full"] and r["keep"] == 1.0
    full_first = [r for r in rows if r["method"] == "full" and r["turn"] == "first"]
    assert [r["score"] for r in full_first] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # own answers as references

    with open(ref / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == SUMMARY_COLUMNS
    top = {(r["method"], r["keep"], r["protocol"], r["turn"]): r for r in table if r["qtype"] == "all"}
    assert set(top) == {("full", "1", p, t) for p in ("official", "strict") for t in ("first", "followup")} | {
        (m, k, p, t) for m in ("tgv-kv", "h2o", "random") for k in ("0.1", "0.5") for p in ("official", "strict")
        for t in ("first", "followup")}
    f = top[("full", "1", "official", "first")]
    assert (f["n"], float(f["accuracy"]), float(f["relative_to_full"]), float(f["agree_full"])) == ("6", 0.5, 1.0, 1.0)
    assert top[("full", "1", "official", "followup")]["n"] == "3"
    for key, r in top.items():
        assert float(r["full_accuracy"]) == (0.5 if key[3] == "first" else 0.0)
        if key[0] != "full":
            assert float(r["kv_fraction"]) < 1.0
    assert float(top[("random", "0.1", "official", "first")]["kv_fraction"]) < float(top[("random", "0.5", "official", "first")]["kv_fraction"])
    per_type = [r for r in table if r["method"] == "full" and r["protocol"] == "official" and r["turn"] == "first"]
    assert [(r["qtype"], r["n"]) for r in per_type] == [("all", "6"), ("a", "3"), ("b", "3")]

    summary = json.loads((ref / "summary.json").read_text())
    assert summary["columns"] == list(SUMMARY_COLUMNS) and len(summary["table"]) == len(table)
    assert summary["methods"] == ["tgv-kv", "h2o", "random"] and summary["keeps"] == [0.1, 0.5]

    # the summary is a pure function of the rows
    again = summarise(rows, ["tgv-kv", "h2o", "random"], [0.1, 0.5], ["official", "strict"])
    assert [round(r["accuracy"], 6) for r in again] == [r["accuracy"] for r in summary["table"]]


def test_rerun_resumes_without_recomputing_and_summary_only(setup, capsys):
    root, model, task, ref = setup
    before = (ref / "rows.jsonl").read_bytes()
    csv_before = (ref / "summary.csv").read_text()
    assert eval_main(_args(model, task, ref)) == 0
    assert "runs to do" not in capsys.readouterr().err  # nothing recomputed, model not even loaded
    assert (ref / "rows.jsonl").read_bytes() == before
    assert (ref / "summary.csv").read_text() == csv_before
    assert eval_main(_args(model, task, ref) + ["--summary-only"]) == 0
    assert (ref / "summary.csv").read_text() == csv_before


def test_other_configuration_is_refused(setup, capsys):
    _, model, task, ref = setup
    args = _args(model, task, ref)
    args[args.index("--max-new-tokens") + 1] = "7"
    assert eval_main(args) == 2
    assert "max_new_tokens" in capsys.readouterr().err


def test_rows_of_unknown_origin_are_refused_and_overwrite_clears_the_gzip_copy(setup, tmp_path, capsys):
    """Rows without run.json (e.g. a committed rows.jsonl.gz from another model) are never mixed into a new run."""
    import gzip

    _, model, task, ref = setup
    out = tmp_path / "gz"
    out.mkdir()
    stale = [json.loads(line) for line in (ref / "rows.jsonl").read_text().splitlines()]
    for r in stale:
        r["prediction"], r["score"] = "stale answer", -1.0
    (out / "rows.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in stale).encode()))
    assert eval_main(_args(model, task, out)) == 2
    assert "holds result rows but no run.json" in capsys.readouterr().err
    assert eval_main(_args(model, task, out) + ["--overwrite"]) == 0
    assert not (out / "rows.jsonl.gz").exists()
    fresh = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(fresh) == len(stale) and all(r["score"] >= 0 and r["prediction"] != "stale answer" for r in fresh)
    assert _summary(out / "summary.csv") == _summary(ref / "summary.csv")


def test_subset_of_methods_extends_without_recomputing(setup, tmp_path):
    """A later run with fewer methods/budgets summarises only those, from rows already on disk."""
    _, model, task, ref = setup
    out = tmp_path / "sub"
    out.mkdir()
    for name in ("rows.jsonl", "run.json"):
        (out / name).write_bytes((ref / name).read_bytes())
    args = _args(model, task, out)
    args[args.index("--methods") + 1] = "tgv-kv"
    args[args.index("--keep") + 1] = "0.5"
    assert eval_main(args) == 0
    table = _summary(out / "summary.csv")
    assert {r["method"] for r in table} == {"full", "tgv-kv"} and {r["keep"] for r in table} == {"1", "0.5"}
    assert (out / "rows.jsonl").read_bytes() == (ref / "rows.jsonl").read_bytes()


# -- reliability: kill and resume ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_run_resumes_to_the_same_results(setup, tmp_path):
    _, model, task, ref = setup
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tgvkv.eval", *_args(model, task, out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    rank_file = out / "rows.rank0.jsonl"
    deadline = time.time() + 120
    n = 0
    while time.time() < deadline and proc.poll() is None:
        n = rank_file.read_bytes().count(b"\n") if rank_file.exists() else 0
        if n >= 12:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    n = rank_file.read_bytes().count(b"\n")
    assert 12 <= n < N_ROWS  # killed midway
    assert not (out / "summary.csv").exists()
    with open(rank_file, "ab") as f:  # a torn line, as from a kill in the middle of a write
        f.write(b'{"example_id": "000004", "method": "tgv')

    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=REPO, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "already on disk" in res.stderr and "(0 already on disk)" not in res.stderr
    rows = read_rows(out / "rows.jsonl")
    assert len(rows) == N_ROWS
    assert _deterministic(rows) == _deterministic(read_rows(ref / "rows.jsonl"))
    assert _summary(out / "summary.csv") == _summary(ref / "summary.csv")
    assert (out / "accuracy_vs_budget.png").read_bytes() == (ref / "accuracy_vs_budget.png").read_bytes()


# -- data parallel with accelerate ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_accelerate_data_parallel_equals_single_process(setup, tmp_path):
    _, model, task, ref = setup
    out = tmp_path / "dp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           "-m", "tgvkv.eval", *_args(model, task, out), "--device", "cpu"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=REPO, timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stderr
    assert "rank 1:" in res.stderr and "rank 0:" in res.stderr
    assert not list(out.glob("rows.rank*.jsonl"))
    assert _deterministic(read_rows(out / "rows.jsonl")) == _deterministic(read_rows(ref / "rows.jsonl"))
    assert _summary(out / "summary.csv") == _summary(ref / "summary.csv")


# -- report --------------------------------------------------------------------------------------------------------
def test_report_statistics_and_markdown(setup):
    from tgvkv.eval import report

    assert report.sign_test([1, 1, 1, 1, 1]) == pytest.approx(2 / 32)
    assert report.sign_test([1, -1, 0, 0]) == 1.0
    assert report.sign_test([]) == 1.0
    lo, hi = report.bootstrap_ci([1.0] * 10)
    assert lo == hi == 1.0
    _, _, _, ref = setup
    text = report.report(ref)
    assert "| full KV (n=6) | 50.0 | 50.0 |" in text
    assert "### Claims, first turn, official protocol" in text and "2. TGV-KV beats random" in text


def test_summary_from_gzipped_rows(setup, tmp_path):
    import gzip

    _, model, task, ref = setup
    out = tmp_path / "gz"
    out.mkdir()
    (out / "rows.jsonl.gz").write_bytes(gzip.compress((ref / "rows.jsonl").read_bytes()))
    (out / "run.json").write_bytes((ref / "run.json").read_bytes())
    assert eval_main(_args(model, task, out) + ["--summary-only"]) == 0
    assert _summary(out / "summary.csv") == _summary(ref / "summary.csv")


def test_seeds_evaluate_draws_per_example_and_extend(setup, tmp_path, capsys):
    """--seeds N: random is run N times with a seed per example and draw; more seeds later add only the new draws."""
    from tgvkv.eval.runner import example_seed

    _, model, task, _ = setup
    out = tmp_path / "seeds"
    args = _args(model, task, out)
    args[args.index("--methods") + 1] = "random,tgv-kv"
    args[args.index("--keep") + 1] = "0.5"
    args[args.index("--protocols") + 1] = "official"
    assert eval_main(args + ["--seeds", "2"]) == 0
    err = capsys.readouterr().err
    assert f"= {N_EXAMPLES * 4} runs" in err and "(3 method draws" in err  # full + random x 2 + tgv-kv per example
    rows = read_rows(out / "rows.jsonl")
    first = [r for r in rows if r["turn"] == "first"]
    rnd = [r for r in first if r["method"] == "random"]
    assert sorted((r["example_id"], r["draw"]) for r in rnd) == sorted((f"{i:06d}", d) for i in range(N_EXAMPLES) for d in (0, 1))
    assert all(r["policy_seed"] == example_seed(r["draw"], r["example_id"]) for r in rnd)
    assert all("draw" not in r for r in first if r["method"] != "random")
    top = {r["method"]: r for r in _summary(out / "summary.csv") if r["qtype"] == "all" and r["turn"] == "first"}
    assert top["random"]["draws"] == "2" and top["tgv-kv"]["draws"] == "1" and top["random"]["n"] == str(N_EXAMPLES)
    accs = [sum(r["score"] for r in rnd if r["draw"] == d) / N_EXAMPLES for d in (0, 1)]
    assert float(top["random"]["accuracy"]) == pytest.approx(sum(accs) / 2, abs=1e-6)
    assert float(top["random"]["accuracy_min"]) == pytest.approx(min(accs), abs=1e-6)
    assert eval_main(args + ["--seeds", "3"]) == 0
    err = capsys.readouterr().err
    assert f"rank 0: {N_EXAMPLES} runs to do" in err  # only draw 2 of random
    assert eval_main(args + ["--seeds", "0"]) == 2 and "--seeds must be >= 1" in capsys.readouterr().err
