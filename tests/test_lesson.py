"""The lesson's texts (values computed from a trace), its files, and the rule that picks the lesson examples."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

import analysis.lesson as AL
from analysis.synthetic import synthetic_trace
from analysis.webapp.lesson_examples import RegionKept, load_lesson_examples, pick_examples, write_examples


def _with_answer(t, ids, tokens, text, followup=None):
    return dataclasses.replace(t, output_ids=np.asarray(ids, dtype=np.int64), output_tokens=list(tokens),
                               output_text=text, **(followup or {}))


@pytest.fixture(scope="module")
def lesson_input():
    t = synthetic_trace(num_layers=6, keep_ratio=0.1)
    full = dataclasses.replace(synthetic_trace(num_layers=6, keep_ratio=1.0), method="full")
    full = _with_answer(full, [5, 6, 7, 8], ["▁the", "▁cat", "▁is", "▁red"], "the cat is red",
                        dict(followup_question="is there a dog ?", followup_ids=np.asarray([1, 2]),
                             followup_text="no dog"))
    official = _with_answer(t, [5, 6, 9, 8], ["▁the", "▁cat", "▁was", "▁red"], "the cat was red",
                            dict(followup_question="is there a dog ?", followup_ids=np.asarray([1, 3]),
                                 followup_text="no cat"))
    strict = _with_answer(t, [5, 6, 7, 8], ["▁the", "▁cat", "▁is", "▁red"], "the cat is red")
    return AL.LessonInput(full, AL.ProtocolRun("official", official, np.array([0.0, 0.01, 2.5, 0.3])),
                          AL.ProtocolRun("strict", strict, np.array([0.02, 0.01, 0.0, 0.0])),
                          followup_probe=full)


def test_first_divergence_counts_like_compare():
    assert AL.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert AL.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert AL.first_divergence([1, 2, 3], [1, 2]) == 2  # a shorter answer departs where it stops
    assert AL.first_divergence([], []) is None


def test_nearest_same_modality_on_separated_clusters():
    rng = np.random.default_rng(0)
    vis = np.array([False] * 4 + [True] * 6)
    h = np.where(vis[:, None], [[0.0, 1.0]], [[1.0, 0.0]]) + rng.normal(0, 0.01, (10, 2))
    assert AL.nearest_same_modality(h, vis) == {"text": 1.0, "vision": 1.0}
    h[4] = [1.0, 0.0]  # one image token sitting among the text tokens
    assert AL.nearest_same_modality(h, vis)["vision"] == pytest.approx(5 / 6)


def test_budget_step_names_the_layers_and_budgets_of_the_trace(lesson_input):
    t = lesson_input.trace
    step = AL.step_budgets(lesson_input)
    share = t.selection_info["tvb_mass"] / t.selection_info["tvb_mass"].sum()
    hi, lo = int(np.argmax(share)), int(np.argmin(share))
    assert f"**layer {hi}** carries **{share[hi]:.0%}**" in step.text
    assert f"keeps **{t.budgets[hi]}** of {t.seq_len} tokens" in step.text
    assert f"layer {lo} carries {share[lo]:.0%} and keeps {t.budgets[lo]}" in step.text
    assert f"uniform split would keep {0.1 * t.seq_len:.0f}" in step.text
    assert step.png.startswith(b"\x89PNG") and json.loads(step.plotly_json)["data"][1]["y"]


def test_retention_step_lists_layers_that_lost_text(lesson_input):
    t = lesson_input.trace
    n_text = int((~t.layout.is_vision).sum())
    text_kept = t.kept_mask[:, ~t.layout.is_vision].sum(axis=1)
    step = AL.step_retention(lesson_input)
    assert f"All {n_text} text tokens survive in **{int((text_kept == n_text).sum())} of 6** layers" in step.text
    lost = np.flatnonzero(text_kept < n_text)
    if len(lost):
        assert step.failure.startswith(f"Layer{'s' if len(lost) > 1 else ''} {lost[0]}")
    else:
        assert step.failure is None
    # a hand-made mask where layer 2 keeps only half the text
    mask = t.kept_mask.copy()
    mask[2, np.flatnonzero(~t.layout.is_vision)[: n_text // 2]] = False
    li = dataclasses.replace(lesson_input, official=AL.ProtocolRun("official", dataclasses.replace(t, kept_mask=mask)))
    step = AL.step_retention(li)
    assert "Layer 2 lost text" in step.failure or re.search(r"Layers [\d, and]*2", step.failure)


def test_answer_step_says_where_each_protocol_departed(lesson_input):
    step = AL.step_answer(lesson_input)
    assert step.text.startswith("Full KV cache: “the cat is red”; TGV-KV keeps 10% of it.")
    assert "Official protocol (first token from the full cache): “the cat was red”, departs at token 2: “was” " \
           "instead of “is”; largest per-step KL 2.50 nats at “is”." in step.text
    assert "Strict protocol (first token from the evicted cache too): “the cat is red”, identical; largest " \
           "per-step KL 0.02 nats at “the”." in step.text
    assert step.failure == "The answer changed under the official protocol from token 2 (“was” instead of “is”)."
    assert [d["name"] for d in json.loads(step.plotly_json)["data"]] == ["official", "strict"]


def test_followup_step_measures_the_region_the_followup_needs(lesson_input):
    step = AL.step_followup(lesson_input)
    assert step.text.startswith("Follow-up **is there a dog ?** Full KV: “no dog”; after the first question's "
                                "eviction: “no cat” (different).")
    t = lesson_input.trace
    region = AL.followup_region(lesson_input.followup_probe)
    assert len(region) == AL.TOP_PATCHES
    grids = __import__("analysis.arrays", fromlist=["x"]).view_position_grids(t.layout)
    pos = [int(grids[v][r, c]) for v, r, c in region]
    share = t.kept_mask[:, pos].mean()
    assert f"{share:.0%} of their entries over all layers" in step.text
    assert step.failure.startswith("The follow-up answer changed")
    # without a follow-up the step says so and draws nothing
    none = AL.step_followup(dataclasses.replace(lesson_input, official=AL.ProtocolRun(
        "official", dataclasses.replace(t, followup_question=None))))
    assert none.png is None and none.text.startswith("No follow-up question was asked")


def test_ranking_step_flags_a_template_token_on_top(lesson_input):
    t = lesson_input.trace
    q = t.layout.text_query_positions
    w = np.zeros((t.num_layers, len(q)))
    w[:, 0] = 1.0  # all weight on the first text query after the image
    top_tok = AL.token_text(t.layout.tokens[q[0]])
    li = dataclasses.replace(lesson_input, official=AL.ProtocolRun("official", dataclasses.replace(
        t, selection_info={**t.selection_info, "text_weights": w}, question="zzz")))
    step = AL.step_ranking(li)
    assert step.text.startswith(f"The heaviest text tokens are “{top_tok}” (1.00)")
    assert step.failure.startswith(f"The heaviest text token is “{top_tok}”, not a content word")


def test_lesson_html_is_self_contained_and_pdf_has_a_page_per_step(lesson_input, tmp_path):
    lesson = AL.build_lesson(lesson_input)
    assert [s.key for s in lesson.steps] == ["modality-gap", "uneven-attention", "budgets", "ranking", "retention",
                                             "answer", "followup"]
    assert lesson.meta["failed_steps"] == [s.key for s in lesson.steps if s.failure]
    page = AL.write_html(lesson, tmp_path / "l.html").read_text()
    markup = re.sub(r"<script>.*?</script>", "", page, flags=re.S)  # plotly.js itself holds link strings
    assert not re.search(r"""(src|href)=["']https?:""", markup)  # nothing fetched from the network
    assert markup.count('src="data:image/png;base64,') == sum(s.png is not None for s in lesson.steps)
    assert page.count('class="lesson-step') == 7 and "Plotly.newPlot" in page and "lessonInit(" in page
    pdf = AL.write_pdf(lesson, tmp_path / "l.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page\b", pdf)) == 8


def test_cli_writes_html_and_pdf(lesson_input, tmp_path):
    paths = {}
    for name, t in (("off", lesson_input.trace), ("full", lesson_input.full)):
        paths[name] = t.save(tmp_path / f"{name}.npz")
    out = tmp_path / "lesson.html"
    assert AL.main(["--trace", str(paths["off"]), "--full", str(paths["full"]), "--out", str(out),
                    "--pdf", str(tmp_path / "lesson.pdf")]) == 0
    assert "departs at token 2" in out.read_text() and (tmp_path / "lesson.pdf").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="must end in .html or .pdf"):
        AL.main(["--trace", str(paths["off"]), "--out", str(tmp_path / "x.txt")])


# -- the example-picking rule ---------------------------------------------------------------------------------------
def _rows(eid, idx, scores, keep=0.1, followup=None):
    """scores: method -> score (first turn); followup: method -> score (follow-up turn); lists give several rows."""
    out = []
    for turn, table in (("first", scores), ("followup", followup or {})):
        for m, s in table.items():
            for v in (s if isinstance(s, list) else [s]):
                out.append({"example_id": eid, "example_index": idx, "method": m, "keep": 1.0 if m == "full" else keep,
                            "protocol": "official", "turn": turn,
                            "question": f"q{idx}" if turn == "first" else f"f{idx}",
                            "prediction": f"{m}-{turn}", "score": v})
    return out


def test_pick_rule_on_synthetic_rows():
    rows = (_rows("e0", 0, {"full": 0, "tgv-kv": 1, "random": 0})  # full wrong: never used
            + _rows("e1", 1, {"full": 1, "tgv-kv": 0, "random": 0})  # (b)
            + _rows("e2", 2, {"full": 1, "tgv-kv": 1, "random": [0, 1]})  # random seeds disagree: not (a)
            + _rows("e3", 3, {"full": 1, "tgv-kv": 1, "random": [0, 0]})  # (a)
            + _rows("e4", 4, {"full": 1, "tgv-kv": 1, "random": 1}, followup={"full": 1, "tgv-kv": 0})  # region kept
            + _rows("e5", 5, {"full": 1, "tgv-kv": 1, "random": 1}, followup={"full": 1, "tgv-kv": 0})  # same cells
            + _rows("e8", 8, {"full": 1, "tgv-kv": 1, "random": 1}, followup={"full": 1, "tgv-kv": 0})  # (c)
            + _rows("e6", 6, {"full": 1, "tgv-kv": 1, "random": 0}, keep=0.05)  # (a) but at a budget tried later
            + [dict(r, protocol="strict") for r in _rows("e7", 7, {"full": 1, "tgv-kv": 1, "random": 0})])
    asked = []

    def region(row, keep):
        asked.append((row["example_id"], keep))
        return {"e4": RegionKept(0.9, 0.8), "e5": RegionKept(0.75, 0.25, shared_cells=1)}.get(
            row["example_id"], RegionKept(0.75, 0.25))

    chosen = pick_examples(rows, region_kept=region)
    assert {k: (c.example_id, c.keep) for k, c in chosen.items()} == {
        "keeps": ("e3", 0.1), "both-lose": ("e1", 0.1), "followup-lost": ("e8", 0.1)}
    assert asked == [("e4", 0.1), ("e5", 0.1), ("e8", 0.1)]
    assert chosen["keeps"].reason == ("at 10% of the KV cache the full-KV answer is right, tgv-kv's is right and "
                                      "random's is wrong (2 rows)")
    assert "kept 25% of the follow-up's evidence patches over all layers (against 75%" in chosen["followup-lost"].reason
    assert chosen["followup-lost"].followup_question == "f8"
    assert chosen["keeps"].predictions["random/first"] == "random-first"
    # without the model check, (c) is left out; with another preferred budget, (a) comes from 5%
    assert "followup-lost" not in pick_examples(rows)
    assert pick_examples(rows, prefer_keep=0.05)["keeps"].example_id == "e6"


def test_written_index_loads_back(tmp_path):
    rows = _rows("test-00001-s1", 1, {"full": 1, "tgv-kv": 0, "random": 0}, followup={"full": 1})
    chosen = pick_examples(rows)
    index = write_examples(chosen, "test", 2, tmp_path, {"rows": "x"})
    doc = json.loads(index.read_text())
    assert [e["example_id"] for e in doc["examples"]] == ["test-00001-s1"] and doc["rule"].startswith("The rule")
    (ex,) = load_lesson_examples(tmp_path)
    assert (ex.kind, ex.question, ex.followup, ex.keep_percent) == ("both-lose", "q1", "f1", 10)
    assert ex.path.is_file() and ex.label == "(b) TGV-KV and random both lose it · 10%"


def test_rewriting_the_index_removes_images_of_the_earlier_pick(tmp_path):
    first = pick_examples(_rows("test-00001-s1", 1, {"full": 1, "tgv-kv": 0, "random": 0}, followup={"full": 1}))
    write_examples(first, "test", 3, tmp_path, {"rows": "x"})
    (tmp_path / "notes.png").write_bytes(b"not ours")
    second = pick_examples(_rows("test-00002-s2", 2, {"full": 1, "tgv-kv": 0, "random": 0}, followup={"full": 1}))
    write_examples(second, "test", 3, tmp_path, {"rows": "x"})
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["both-lose_test-00002-s2.png", "notes.png"]
