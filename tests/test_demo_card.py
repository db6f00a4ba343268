"""Demo-model training bookkeeping and model card: lr schedules, stage history, eviction table (no training)."""

import json
import os

import pytest

from tgvkv.demo import evaluate, train


def test_lr_schedule_by_steps_matches_warmup_and_decay():
    cfg = train.TrainConfig(steps=1000, warmup=100, lr=1e-3, decay_frac=0.25)
    assert train.lr_at(0, cfg) == pytest.approx(1e-5)
    assert train.lr_at(99, cfg) == pytest.approx(1e-3)
    assert train.lr_at(750, cfg) == pytest.approx(1e-3)
    assert train.lr_at(875, cfg) == pytest.approx(1e-3 * (1 - 0.9 * 0.5))
    assert train.lr_at(1000, cfg) == pytest.approx(1e-4)


def test_lr_schedule_by_time_decays_within_max_minutes():
    cfg = train.TrainConfig(steps=10**6, warmup=10, lr=1e-3, decay_frac=0.5, max_minutes=10, schedule="time")
    assert train.lr_at(500, cfg, elapsed_s=60) == pytest.approx(1e-3)  # 10% of the time: constant
    assert train.lr_at(500, cfg, elapsed_s=450) == pytest.approx(1e-3 * (1 - 0.9 * 0.5))  # 75%: half-way down
    assert train.lr_at(500, cfg, elapsed_s=900) == pytest.approx(1e-4)  # past the budget: floor
    with pytest.raises(ValueError, match="max_minutes > 0"):
        train.lr_at(500, train.TrainConfig(schedule="time"), elapsed_s=1)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        train.lr_at(500, train.TrainConfig(schedule="cosine"))


def _state(folder, step, curve, previous=None, **cfg):
    os.makedirs(folder, exist_ok=True)
    state = {"train_config": {"seed": 0, **cfg}, "step": step, "minutes": 1.5, "curve": curve}
    if previous is not None:
        state["previous_stages"] = previous
    with open(os.path.join(folder, "training_state.json"), "w") as f:
        json.dump(state, f)


def test_stage_history_and_full_curve(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _state(one, 200, [{"step": 100, "val_overall": 0.5}, {"step": 200, "val_overall": 0.6}])
    stages = train._previous_stages(str(one))
    assert [s["step"] for s in stages] == [200]
    assert stages[0]["last_validation"] == {"step": 200, "val_overall": 0.6}
    _state(two, 50, [{"step": 50, "val_overall": 0.9}], previous=stages, init_from=str(one))
    assert [(r["step"], r["val_overall"]) for r in train.full_curve(str(two))] == [(100, 0.5), (200, 0.6), (250, 0.9)]
    # a third stage sees both earlier ones, oldest first
    assert [s["step"] for s in train._previous_stages(str(two))] == [200, 50]


def _summary(folder, rows):
    from tgvkv.eval.runner import SUMMARY_COLUMNS

    os.makedirs(folder, exist_ok=True)
    lines = [",".join(SUMMARY_COLUMNS)]
    for r in rows:
        full = {c: "0" for c in SUMMARY_COLUMNS}
        full.update({"protocol": "official", "qtype": "all", "n": "10", "kv_bytes_full": "2048"}, **r)
        lines.append(",".join(str(full[c]) for c in SUMMARY_COLUMNS))
    (folder / "summary.csv").write_text("\n".join(lines) + "\n")


def test_eviction_table_reads_the_evaluator_summary(tmp_path):
    rows = [{"method": "full", "keep": 1, "turn": t, "accuracy": a} for t, a in (("first", 0.9), ("followup", 0.8))]
    for i, m in enumerate(evaluate.CARD_EVICTION_METHODS):
        for k in (0.05, 0.25):
            for t in ("first", "followup"):
                rows.append({"method": m, "keep": k, "turn": t, "accuracy": round(0.1 * i + k, 3),
                             "kv_bytes_kept": int(2048 * k)})
    _summary(tmp_path, rows)
    text = evaluate.eviction_table(str(tmp_path))
    assert "| method | 5% kept | 25% kept |" in text
    assert "| text-guided selection (TGV-KV) | 5.0 | 25.0 |" in text
    assert "| evict text first | 35.0 | 55.0 |" in text
    assert "n=10; full KV 90.0%" in text and "full KV 80.0%" in text
    assert "5% -> 0 KiB of 2 KiB, 25% -> 0 KiB of 2 KiB" in text
    _summary(tmp_path, [r for r in rows if not (r["method"] == "random" and r["keep"] == 0.25)])
    with pytest.raises(ValueError, match="no row for random at keep 0.25"):
        evaluate.eviction_table(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run python -m tgvkv.eval"):
        evaluate.eviction_table(str(tmp_path / "missing"))


def test_model_card_lists_every_stage_and_the_eviction_table(tmp_path):
    import shutil

    src = evaluate.DEFAULT_MODEL
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        shutil.copy(os.path.join(src, name), model / name)
    stage1 = {"train_config": {"seed": 0, "lr": 0.0006, "steps": 3000}, "step": 3000, "minutes": 53.0,
              "last_validation": {"step": 3200, "val_overall": 0.84}, "curve": []}
    _state(model, 900, [{"step": 900, "val_overall": 0.97}], previous=[stage1], init_from="assets/demo-vlm",
           data_offset=400000, schedule="time", max_minutes=85.0, type_weights="exists=2.5", lr=0.0004)
    rows = [{"method": "full", "keep": 1, "turn": t, "accuracy": 0.97} for t in ("first", "followup")]
    rows += [{"method": m, "keep": 0.1, "turn": t, "accuracy": 0.5} for m in evaluate.CARD_EVICTION_METHODS
             for t in ("first", "followup")]
    _summary(tmp_path / "ev", rows)
    res = {"per_type": {"color": {"n": 3, "accuracy": 1.0}}, "n": 3, "overall": 1.0, "split": "test", "n_per_type": 3}
    text = open(evaluate.write_model_card(str(model), res, eviction_results=str(tmp_path / "ev"))).read()
    assert "1. From scratch, seed 0: 3000 steps" in text
    assert "2. Continued from `assets/demo-vlm` on unseen scenes (from scene 400000), seed 0: 900 steps" in text
    assert "lr 0.0004, 200 warm-up steps, linear decay to 10% over the last 0.25 of the wall-clock budget; question-type sampling weights exists=2.5" in text
    assert "python -m tgvkv.demo.train --out assets/demo-vlm --steps 3000\n" in text
    stage2 = next(line for line in text.splitlines() if "--init-from" in line).split()
    assert stage2[:5] == ["python", "-m", "tgvkv.demo.train", "--out", "assets/demo-vlm"]
    assert {" ".join(stage2[i : i + 2]) for i in range(5, len(stage2), 2)} == {
        "--init-from assets/demo-vlm", "--data-offset 400000", "--schedule time", "--max-minutes 85.0",
        "--type-weights exists=2.5", "--lr 0.0004"}
    assert "| text-guided selection (TGV-KV) | 50.0 |" in text and "## Under KV eviction" in text
