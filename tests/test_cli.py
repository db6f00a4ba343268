"""CLI: `python -m tgvkv run` prints both answers, KV bytes and timings, and writes a loadable trace."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models import random_image, tiny_llava

import tgvkv
from tgvkv.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    model, proc = tiny_llava(seed=1)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    random_image(4).save(path / "image.png")
    return path


def test_cli_run_json_and_trace(tiny_folder, tmp_path, capsys):
    trace_path = tmp_path / "t.npz"
    rc = main(["run", "--model", str(tiny_folder), "--image", str(tiny_folder / "image.png"), "--question",
               "what is the colour of the circle ?", "--keep", "0.2", "--max-new-tokens", "6", "--json",
               "--trace", str(trace_path)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    trace = tgvkv.Trace.load(trace_path)
    assert summary["evicted"]["answer"] == trace.output_text
    assert summary["evicted"]["kv_bytes"] == int(trace.kv_bytes_kept.sum())
    assert summary["evicted"]["kept_tokens_per_layer"] == trace.budgets.tolist()
    assert summary["full"]["kv_bytes"] == int(trace.kv_bytes_full.sum())
    assert summary["evicted"]["kv_bytes"] < summary["full"]["kv_bytes"]
    assert len(summary["step_kl"]) >= 1 and summary["step_kl"][0] == 0.0  # official: token 1 from the full cache
    assert trace.method == "tgv-kv" and trace.keep_ratio == 0.2
    assert np.all(trace.budgets <= trace.seq_len)


def test_cli_text_output(tiny_folder, capsys):
    rc = main(["run", "--model", str(tiny_folder), "--image", str(tiny_folder / "image.png"), "--question",
               "what is the colour of the circle ?", "--keep", "0.5", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "full KV   :" in out and "evicted KV:" in out and "KV bytes  :" in out and "tokens/s" in out


def test_cli_errors_are_reported_not_raised(tiny_folder, tmp_path, capsys):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    assert main(["run", "--model", str(tiny_folder), "--image", str(bad), "--question", "what ?"]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert main(["run", "--model", str(tiny_folder), "--image", str(tiny_folder / "image.png"), "--question", "what ?", "--keep", "1.5"]) == 2
    assert "keep_ratio must be in (0, 1]" in capsys.readouterr().err
    assert main(["run", "--model", str(tmp_path / "missing"), "--image", str(tiny_folder / "image.png"), "--question", "what ?"]) == 2
    assert "could not load" in capsys.readouterr().err
