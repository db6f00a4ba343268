"""Demo-model training bookkeeping and model card: lr schedules, stage history, eviction tables, stage commands,
export (no training)."""

import json
import os

import pytest

from tgvkv.demo import card, train
from tgvkv.demo.card import EvictionColumn


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
        full = {c: "" for c in SUMMARY_COLUMNS}
        full.update({"protocol": "official", "qtype": "all", "n": "10", "kv_bytes_full": "2048", "kv_bytes_kept": "0",
                     "draws": "1"}, **r)
        lines.append(",".join(str(full[c]) for c in SUMMARY_COLUMNS))
    (folder / "summary.csv").write_text("\n".join(lines) + "\n")


def _eviction_rows(offset, methods=("tgv-kv", "random", "streamingllm"), keeps=(0.05, 0.25),
                   protocols=("official",)):
    rows = [{"method": "full", "keep": 1, "turn": t, "protocol": p, "accuracy": 0.9}
            for t in ("first", "followup") for p in protocols]
    for i, m in enumerate(methods):
        for k in keeps:
            for t in ("first", "followup"):
                for p in protocols:
                    rows.append({"method": m, "keep": k, "turn": t, "protocol": p, "accuracy": round(0.1 * i + k + offset, 3),
                                 "kv_bytes_kept": int(2048 * k)})
    return rows


def test_eviction_table_puts_models_side_by_side_and_bolds_the_best(tmp_path):
    _summary(tmp_path / "v1", _eviction_rows(0.0))
    _summary(tmp_path / "v2", _eviction_rows(0.5))
    cols = [EvictionColumn("v1", str(tmp_path / "v1")), EvictionColumn("v2", str(tmp_path / "v2"))]
    lines = card.eviction_table(cols, "official", "first").splitlines()
    assert lines[0] == "| method | 5% v1 | 5% v2 | 25% v1 | 25% v2 |"
    assert lines[2] == "| full KV | 90.0 | 90.0 | 90.0 | 90.0 |"
    assert lines[3] == "| TGV-KV (text-guided) | 5.0 | 55.0 | 25.0 | 75.0 |"
    # streamingllm (index 2) is the best of every column: bold
    assert lines[4] == "| StreamingLLM (sinks + recent) | **25.0** | **75.0** | **45.0** | **95.0** |"
    assert lines[5].startswith("| random (mean of its draws) | 15.0 | 65.0 |")
    # a folder lacking a cell the other has: refused, not silently blank
    _summary(tmp_path / "v2", [r for r in _eviction_rows(0.5) if not (r["method"] == "random" and r["keep"] == 0.25)])
    with pytest.raises(ValueError, match="no official/first row for random at keep 0.25"):
        card.eviction_table(cols, "official", "first")
    with pytest.raises(FileNotFoundError, match="run python -m tgvkv.eval"):
        card.eviction_table([EvictionColumn("x", str(tmp_path / "missing"))], "official", "first")


def test_random_cells_carry_the_spread_of_their_draws(tmp_path):
    rows = _eviction_rows(0.0, methods=("tgv-kv",))
    rows += [{"method": "random", "keep": k, "turn": t, "accuracy": 0.2, "accuracy_sd": 0.015, "draws": "5"}
             for k in (0.05, 0.25) for t in ("first", "followup")]
    _summary(tmp_path, rows)
    text = card.eviction_table([EvictionColumn("v2", str(tmp_path))], "official", "followup")
    assert "| random (mean of its draws) | **20.0 ± 1.5** | 20.0 ± 1.5 |" in text


def test_eviction_section_has_both_protocols_and_the_text_only_probe(tmp_path):
    rows = _eviction_rows(0.0, protocols=("official", "strict"))
    rows += [{"method": "text-only", "keep": 0.1, "turn": t, "protocol": p, "accuracy": a}
             for t, p, a in (("first", "official", 0.657), ("first", "strict", 0.271),
                             ("followup", "official", 0.386), ("followup", "strict", 0.414))]
    _summary(tmp_path, rows)
    text = card.eviction_section([EvictionColumn("v2 short", str(tmp_path))])
    heads = [line for line in text.splitlines() if line.startswith("**") and "protocol" in line]
    assert [h.split("**")[1] for h in heads] == [
        "first question, official protocol", "follow-up question (second turn on the evicted cache), official protocol",
        "first question, strict protocol", "follow-up question (second turn on the evicted cache), strict protocol"]
    assert "| v2 short | first | 90.0 | 65.7 | 27.1 |" in text
    assert "| v2 short | follow-up | 90.0 | 38.6 | 41.4 |" in text
    assert "5% -> 0 KiB of 2 KiB, 25% -> 0 KiB of 2 KiB" in text


def test_stage_commands_chain_the_stages_through_their_exports():
    stages = [
        {"train_config": {"out": "/somewhere/a", "seed": 0, "lr": 0.0005, "precision": "bf16"}, "step": 3000,
         "weights_dtype": "bfloat16"},
        {"train_config": {"out": "/elsewhere/b", "seed": 1, "init_from": "/gone/stage1", "data_offset": 26816,
                          "type_weights": "color=1.0,exists=1.8", "resume": True}, "step": 3410},
    ]
    lines = card.stage_commands(stages, shipped_from_best=True).splitlines()
    assert lines == [
        "python -m tgvkv.demo.train --out /tmp/demo-vlm-stage1 --lr 0.0005 --precision bf16",
        "python -m tgvkv.demo.export /tmp/demo-vlm-stage1 /tmp/demo-vlm-stage1-bfloat16 --dtype bfloat16",
        "python -m tgvkv.demo.train --out /tmp/demo-vlm-stage2 --seed 1 --init-from /tmp/demo-vlm-stage1-bfloat16 "
        "--data-offset 26816 --type-weights color=1.0,exists=1.8",
        "python -m tgvkv.demo.export /tmp/demo-vlm-stage2/best assets/demo-vlm --dtype float32",
    ]
    stages[0]["weights_dtype"] = "float32"  # continued from the float32 checkpoint itself: no copy
    assert card.stage_commands(stages, shipped_from_best=False).splitlines()[1].startswith(
        "python -m tgvkv.demo.train --out /tmp/demo-vlm-stage2 --seed 1 --init-from /tmp/demo-vlm-stage1 ")
    assert card.stage_commands(stages, shipped_from_best=False).endswith("/tmp/demo-vlm-stage2 assets/demo-vlm --dtype float32")


def test_speed_table_reads_the_training_bench(tmp_path):
    rows = [{"size": "v2", "params": 8269952, "precision": p, "threads": 1, "seconds_per_step": s,
             "steps_per_min": round(60 / s, 1), "speedup_vs_fp32": round(3.0 / s, 2)} for p, s in (("fp32", 3.0), ("bf16", 2.0))]
    (tmp_path / "t.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    assert card.speed_table(str(tmp_path / "t.json")).splitlines()[2] == "| v2 | 8.3M | 1 | 3.00 (20.0) | 2.00 (30.0) | x1.50 |"


def test_model_card_is_written_from_measured_files(tmp_path):
    import shutil

    from tgvkv.demo.evaluate import DEFAULT_MODEL

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        shutil.copy(os.path.join(DEFAULT_MODEL, name), model / name)
    stage1 = {"train_config": {"seed": 0, "lr": 0.0006, "steps": 3000}, "step": 3000, "minutes": 53.0,
              "last_validation": {"step": 3000, "val_overall": 0.84}, "weights_dtype": "float32",
              "curve": [{"step": 3000, "train_loss_ema": 0.1, "val_overall": 0.84}]}
    _state(model, 900, [{"step": 900, "train_loss_ema": 0.05, "val_overall": 0.97}], previous=[stage1],
           init_from="/tmp/gone", data_offset=400000, schedule="time", max_minutes=85.0, type_weights="exists=2.5",
           lr=0.0004, threads=1, data_parallel=2)

    def res(acc):
        return {"n": 7, "overall": acc, "per_type": {"color": {"n": 7, "accuracy": acc}}, "followup_overall": acc,
                "followup_per_type": {"shape": {"n": 7, "accuracy": acc}}}

    (tmp_path / "test.json").write_text(json.dumps({"split": "test", "n_per_type": 7,
                                                    "styles": {"sentence": res(1.0), "short": res(0.5)}}))
    (tmp_path / "v1.json").write_text(json.dumps({**res(0.25), "split": "test", "n_per_type": 300}))
    _summary(tmp_path / "ev", _eviction_rows(0.0, protocols=("official", "strict")))
    inputs = card.CardInputs(model_dir=str(model), test=str(tmp_path / "test.json"),
                             references=(("v1", str(tmp_path / "v1.json")),),
                             eviction=(EvictionColumn("v2", str(tmp_path / "ev")),))
    text = open(card.write_model_card(inputs)).read()
    assert "| question type | n | sentence (test) | short (test) | v1 sentence (test) |" in text
    assert "| color | 7 | 100.0 | 50.0 | 25.0 |" in text
    assert "test split, 7 questions per type; v1: test split, 300 per type." in text
    assert "1. From scratch, seed 0: 3000 steps" in text and "in 53 minutes on 2 CPU threads, fp32;" in text
    assert "2. Continued from the previous stage on unseen scenes (from scene 400000), seed 0: 900 steps" in text
    assert "in 2 minutes on 2 data-parallel processes x 1 CPU thread, fp32; lr 0.0004" in text
    assert "python -m tgvkv.demo.train --out /tmp/demo-vlm-stage2 --init-from /tmp/demo-vlm-stage1 --data-offset 400000 " \
           "--schedule time --max-minutes 85.0 --type-weights exists=2.5 --lr 0.0004 --threads 1 --data-parallel 2\n" in text
    assert "**first question, strict protocol**" in text and "| TGV-KV (text-guided) | 5.0 | 25.0 |" in text
    # the all-stage curve is written next to the card, steps counted from the first stage
    assert (model / "training_curve.png").stat().st_size > 10_000
    assert (model / "training_curve.csv").read_text().splitlines()[1:] == ["3000,0.1,0.84", "3900,0.05,0.97"]


def test_export_stores_the_chosen_dtype_and_leaves_the_optimiser_behind(tmp_path):
    import torch
    from tiny_models import save_tiny_llava
    from transformers import LlavaForConditionalGeneration

    from tgvkv.demo.export import export

    src = tmp_path / "ckpt"
    model, _ = save_tiny_llava(src)
    (src / "resume_state.pt").write_bytes(b"optimiser")
    (src / "best").mkdir()
    _state(src, 10, [], previous=[{"train_config": {"init_from": ""}, "step": 5}], init_from=str(src))
    names = export(str(src), str(tmp_path / "bf16"), "bfloat16")
    assert "resume_state.pt" not in names and "best" not in names and "training_state.json" in names
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    ref = dict(model.named_parameters())
    for name, p in back.named_parameters():
        assert torch.equal(p, ref[name].detach().to(torch.bfloat16).float()), name
    state = json.loads((tmp_path / "bf16" / "training_state.json").read_text())
    assert state["previous_stages"][0]["weights_dtype"] == "float32"  # the config of the folder it named
    with pytest.raises(ValueError, match="expected one of float32, bfloat16"):
        export(str(src), str(tmp_path / "x"), "float16")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        export(str(tmp_path / "nothing"), str(tmp_path / "y"))
