"""Markdown tables and the paper's claims checked against an evaluation's rows: `python -m tgvkv.eval.report DIR`.

Claims (arXiv 2606.03075) checked on the rows of DIR (the evaluator's output folder), per protocol and turn:
1. TGV-KV at 5% keeps >= 95% of full-KV accuracy.
2. TGV-KV beats random, StreamingLLM and H2O at 5% and at 10%.
3. Ablation ordering: full TGV-KV >= TV+TT >= VV+TT, and evicting text first is the worst variant (at 5%, the
   paper's ablation budget; other budgets are listed too).
Comparisons between two methods are paired (same examples): the difference of mean scores, a 95% percentile
bootstrap interval of that difference (10,000 resamples of the examples, seeded, numpy), and a two-sided exact sign
test (McNemar's test for 0/1 scores) on the examples where the two differ. A seeded method evaluated with several
draws (`--seeds N`) enters with its per-example mean over the draws. Every claim is a difference that should be
positive (A beats B; TGV-KV minus 95% of full KV), and its verdict is read from the interval: **holds** when the
whole interval is above zero, **does not hold** when it is below zero, **not distinguishable** when it contains zero.
Tables: bold marks the best method of a column (every tied best); full KV is the reference and is not ranked.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..policies import method_kind, method_sort_key
from .runner import FULL, ROWS, SUMMARY_JSON, keep_str, load_all_rows

PAPER_ABLATION = {  # LLaVA-1.5, 5%: ChartQA / TextVQA-lite accuracy (paper's ablation table)
    "full KV": ("18.0", "47.9"), "tgv-uniform-window": ("0.4", "8.7"), "tgv-self-attn": ("4.8", "23.5"),
    "tgv-vv-tt": ("4.6", "22.8"), "tgv-tv-tt": ("11.0", "37.3"), "tgv-tvb-tv-tt": ("14.3", "36.4"),
    "tgv-evict-text-first": ("0.2", "4.4"), "tgv-evict-vision-first": ("10.0", "31.0"),
}
ABLATION_LABEL = {
    "tgv-uniform-window": "uniform budget + observation window", "tgv-self-attn": "pure self-attention score",
    "tgv-vv-tt": "VV + TT", "tgv-tv-tt": "TV + TT", "tgv-tvb-tv-tt": "TV budget + TV + TT",
    "tgv-evict-text-first": "evict text first", "tgv-evict-vision-first": "evict vision first",
}


HOLDS, FAILS, UNCLEAR = "holds", "does not hold", "not distinguishable"
N_RESAMPLES = 10_000


def _scores(rows: dict, method: str, keep: float, protocol: str, turn: str) -> dict[str, float]:
    """example id -> score (the mean over the draws of a seeded method evaluated several times)."""
    if method == FULL:
        keep, protocol = 1.0, "official"
    k = keep_str(keep)
    per: dict[str, list[float]] = {}
    for r in rows.values():
        if r["method"] == method and keep_str(r["keep"]) == k and r["protocol"] == protocol and r["turn"] == turn:
            per.setdefault(r["example_id"], []).append(r["score"])
    return {i: sum(v) / len(v) for i, v in per.items()}


def sign_test(diffs: Sequence[float]) -> float:
    """Two-sided exact sign test p-value on paired differences (zeros dropped)."""
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = pos + neg
    if n == 0:
        return 1.0
    k = min(pos, neg)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * p)


def bootstrap_ci(diffs: Sequence[float], n: int = N_RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences: resample the examples (with replacement)
    `n` times with numpy's generator seeded by `seed`; (nan, nan) for no examples."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for start in range(0, n, 1000):  # bounded memory: 1000 x m indices at a time
        idx = rng.integers(0, d.size, size=(min(1000, n - start), d.size))
        means[start : start + idx.shape[0]] = d[idx].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def verdict(ci: tuple[float, float]) -> str:
    """A claim "difference > 0" from its interval: above zero holds, below zero does not, containing zero (or an
    interval of a single point at zero, e.g. two methods that both score 0 everywhere) is not distinguishable."""
    lo, hi = ci
    if lo != lo or hi != hi:
        return UNCLEAR
    if lo > 0:
        return HOLDS
    if hi < 0:
        return FAILS
    return UNCLEAR


def combine(verdicts: Sequence[str]) -> str:
    """A claim made of parts (A beats B and C): holds if every part holds, does not hold if any part does not."""
    if not verdicts:
        return UNCLEAR
    if FAILS in verdicts:
        return FAILS
    return HOLDS if all(v == HOLDS for v in verdicts) else UNCLEAR


def paired_diffs(sa: dict[str, float], sb: dict[str, float], weight_b: float = 1.0) -> dict | None:
    """Paired comparison of two per-example score maps on their common examples: a - weight_b * b."""
    ids = sorted(set(sa) & set(sb))
    if not ids:
        return None
    diffs = [sa[i] - weight_b * sb[i] for i in ids]
    ci = bootstrap_ci(diffs)
    return {"n": len(ids), "a": sum(sa[i] for i in ids) / len(ids), "b": sum(sb[i] for i in ids) / len(ids),
            "diff": sum(diffs) / len(ids), "ci": ci, "p": sign_test(diffs), "verdict": verdict(ci),
            "a_only": sum(d > 0 for d in diffs), "b_only": sum(d < 0 for d in diffs)}


def paired(rows: dict, a: str, b: str, keep: float, protocol: str, turn: str, weight_b: float = 1.0) -> dict | None:
    """Paired comparison of methods a and b at one budget (b = "full" compares with the full-KV reference)."""
    return paired_diffs(_scores(rows, a, keep, protocol, turn), _scores(rows, b, keep, protocol, turn), weight_b)


def _ci_txt(c: dict) -> str:
    return (f"diff {100 * c['diff']:+.1f} pts [95% CI {100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}], "
            f"sign test p={c['p']:.2g}")


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}"


def accuracy_table(summary: dict, protocol: str, turn: str, qtype: str = "all") -> str:
    table = [r for r in summary["table"] if r["protocol"] == protocol and r["turn"] == turn and r["qtype"] == qtype]
    if not table:
        return ""
    keeps = sorted({r["keep"] for r in table if r["method"] != FULL})
    full = next((r for r in table if r["method"] == FULL), None)
    head = "| method | " + " | ".join(f"{k * 100:g}%" for k in keeps) + " |"
    lines = [head, "|---|" + "---|" * len(keeps)]
    if full:
        lines.append(f"| full KV (n={full['n']}) | " + " | ".join(f"{_pct(full['accuracy'])}" for _ in keeps) + " |")
    methods = sorted({r["method"] for r in table if r["method"] != FULL}, key=method_sort_key)
    best = {k: max((round(100 * r["accuracy"], 1) for r in table if r["method"] != FULL and r["keep"] == k
                    and r["accuracy"] is not None), default=None) for k in keeps}
    for m in methods:
        cells = []
        for k in keeps:
            r = next((r for r in table if r["method"] == m and r["keep"] == k), None)
            if r is None:
                cells.append("")
                continue
            rel = r["relative_to_full"]
            acc = _pct(r["accuracy"])
            if (r.get("draws") or 1) > 1 and r.get("accuracy_sd") is not None:
                acc += f" ± {100 * r['accuracy_sd']:.1f}"
            cell = f"{acc} ({_pct(rel)})" if rel is not None else acc
            top = r["accuracy"] is not None and round(100 * r["accuracy"], 1) == best[k]
            cells.append(f"**{cell}**" if top else cell)
        label = m if m not in ABLATION_LABEL else f"{m} ({ABLATION_LABEL[m]})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def qtype_table(summary: dict, protocol: str, turn: str, keep: float, methods: Sequence[str]) -> str:
    table = [r for r in summary["table"] if r["protocol"] == protocol and r["turn"] == turn]
    qtypes = sorted({r["qtype"] for r in table if r["qtype"] != "all"})
    if not qtypes:
        return ""
    lines = ["| method | " + " | ".join(qtypes) + " |", "|---|" + "---|" * len(qtypes)]
    acc = {(r["method"], r["qtype"]): _pct(r["accuracy"]) for r in table
           if (r["method"] == FULL and r["keep"] == 1.0) or (r["method"] in methods and r["keep"] == keep)}
    best = {q: max((float(acc[(m, q)]) for m in methods if acc.get((m, q), "n/a") != "n/a"), default=None)
            for q in qtypes}
    for m in [FULL, *methods]:
        cells = []
        for q in qtypes:
            v = acc.get((m, q), "")
            top = m != FULL and v not in ("", "n/a") and float(v) == best[q]
            cells.append(f"**{v}**" if top else v)
        lines.append(f"| {'full KV' if m == FULL else m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(summary: dict, protocol: str, turn: str, keep: float = 0.05) -> str:
    """Our ablation rows at `keep` next to the paper's (LLaVA-1.5, 5%, ChartQA / TextVQA-lite)."""
    tab = {r["method"]: r for r in summary["table"] if r["protocol"] == protocol and r["turn"] == turn
           and r["qtype"] == "all" and (r["keep"] == keep or r["method"] == FULL)}
    if "tgv-kv" not in tab:
        return ""
    lines = [f"| row | ours, {keep * 100:g}% (relative to full) | paper ChartQA | paper TextVQA-lite |", "|---|---|---|---|"]
    order = ["full KV", "tgv-uniform-window", "tgv-self-attn", "tgv-vv-tt", "tgv-tv-tt", "tgv-tvb-tv-tt", "tgv-kv",
             "tgv-evict-text-first", "tgv-evict-vision-first"]
    paper = {**PAPER_ABLATION, "tgv-kv": ("n/a", "n/a")}
    for m in order:
        r = tab.get(FULL if m == "full KV" else m)
        if r is None:
            continue
        label = m if m == "full KV" else f"{ABLATION_LABEL.get(m, 'full TGV-KV')} (`{m}`)"
        ours = _pct(r["accuracy"]) + (f" ({_pct(r['relative_to_full'])})" if r["relative_to_full"] is not None else "")
        lines.append(f"| {label} | {ours} | {paper[m][0]} | {paper[m][1]} |")
    return "\n".join(lines)


#: the budgets at which the paper states claims 1 and 2
CLAIM1_KEEPS = (0.05,)
CLAIM2_KEEPS = (0.05, 0.1)


def claims(rows: dict, summary: dict, protocol: str, turn: str, also_at: Sequence[float] = ()) -> list[str]:
    """Bullet lines, one per claim, each with its verdict read from paired bootstrap intervals and the numbers.

    Claims 1 and 2 are checked at the paper's budgets and, when `also_at` names more, at those too (on a model with
    fewer image tokens than the paper's, the budget that keeps as many tokens per layer as the paper's 5% is larger).
    """
    out = []
    tab = {(r["method"], r["keep"]): r for r in summary["table"]
           if r["protocol"] == protocol and r["turn"] == turn and r["qtype"] == "all"}
    methods = {m for m, _ in tab}
    keeps = sorted({k for m, k in tab if m != FULL})
    asked = sorted(set(also_at))
    # 1. TGV-KV at 5% >= 95% of full KV: per example, tgv-kv score - 0.95 x full-KV score
    for keep in (*CLAIM1_KEEPS, *(k for k in asked if k not in CLAIM1_KEEPS)):
        c = paired(rows, "tgv-kv", FULL, keep, protocol, turn, weight_b=0.95) if ("tgv-kv", keep) in tab else None
        if c is None:
            continue
        r = tab[("tgv-kv", keep)]
        rel = r["relative_to_full"]
        rel_txt = f"relative {_pct(rel)}%" if rel is not None else "relative undefined (full KV scores 0)"
        out.append(f"1. TGV-KV at {keep * 100:g}% keeps >= 95% of full-KV accuracy: **{c['verdict']}** "
                   f"({_pct(c['a'])}% vs full {_pct(c['b'])}%, {rel_txt}; TGV-KV - 0.95 x full: "
                   f"{100 * c['diff']:+.1f} pts [95% CI {100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}]; answers "
                   f"identical to full KV on {_pct(r['agree_full'])}% of examples).")
    # 2. TGV-KV beats random, StreamingLLM and H2O at 5% and at 10%
    for keep in (*CLAIM2_KEEPS, *(k for k in asked if k not in CLAIM2_KEEPS)):
        parts, verdicts = [], []
        for b in ("random", "streamingllm", "h2o"):
            if b not in methods or ("tgv-kv", keep) not in tab:
                continue
            c = paired(rows, "tgv-kv", b, keep, protocol, turn)
            if c is None:
                continue
            verdicts.append(c["verdict"])
            draws = tab.get((b, keep), {}).get("draws") or 1
            label = f"{b} (mean of {draws} draws)" if draws > 1 else b
            parts.append(f"{label}: {_pct(c['a'])} vs {_pct(c['b'])}, {_ci_txt(c)}: {c['verdict']} "
                         f"({c['a_only']} examples better with TGV-KV, {c['b_only']} better with {b})")
        if parts:
            out.append(f"2. TGV-KV beats random, StreamingLLM and H2O at {keep * 100:g}%: **{combine(verdicts)}**. "
                       + "; ".join(parts) + ".")
    # 3. ablation ordering
    for keep in keeps:
        order = ["tgv-kv", "tgv-tv-tt", "tgv-vv-tt"]
        if not all((m, keep) in tab for m in order):
            continue
        accs = [tab[(m, keep)]["accuracy"] for m in order]
        tests = [paired(rows, order[i], order[i + 1], keep, protocol, turn) for i in range(2)]
        chain = combine([t["verdict"] for t in tests])
        ablations = sorted((m for m in methods if method_kind(m) == "tgv-ablation" and (m, keep) in tab),
                           key=method_sort_key)
        if "tgv-evict-text-first" in ablations:
            others = [m for m in ablations if m != "tgv-evict-text-first"]
            worst = [paired(rows, m, "tgv-evict-text-first", keep, protocol, turn) for m in others]
            worst_verdict = combine([w["verdict"] for w in worst])
            below = [m for m, w in zip(others, worst) if w["verdict"] == FAILS]
            unclear = [m for m, w in zip(others, worst) if w["verdict"] == UNCLEAR]
            w_acc = tab[("tgv-evict-text-first", keep)]["accuracy"]
            detail = (f"significantly below it: {', '.join(below)}" if below
                      else f"not distinguishable from: {', '.join(unclear)}" if unclear
                      else "every other variant is above it")
            worst_txt = f"evict-text-first is the worst variant: **{worst_verdict}** ({_pct(w_acc)}%; {detail})"
        else:
            worst_txt = "evict-text-first not evaluated"
        out.append(
            f"3. at {keep * 100:g}%: full TGV-KV >= TV+TT >= VV+TT: **{chain}** "
            f"({' / '.join(_pct(a) for a in accs)}; TGV-KV - TV+TT {_ci_txt(tests[0])}; "
            f"TV+TT - VV+TT {_ci_txt(tests[1])}); {worst_txt}."
        )
    return out


def report(folder: str | Path, also_at: Sequence[float] = ()) -> str:
    """The whole markdown report of an evaluator folder; `also_at`: more budgets for claims 1 and 2."""
    folder = Path(folder)
    summary = json.loads((folder / SUMMARY_JSON).read_text())
    n = summary["n_examples"]  # the task's examples are a prefix (index < n) of what the rows may hold
    rows = {k: r for k, r in load_all_rows(folder).items() if r["example_index"] < n}
    parts = [f"Model `{summary['model']}`, task `{summary['task']}`, {summary['n_examples']} examples, "
             f"max {summary['max_new_tokens']} new tokens, greedy. Cells: accuracy % (relative to full KV %); "
             "'± sd' over the draws of a seeded method run with several seeds; bold: the best method of the column "
             "(ties all bold; full KV is the reference, not ranked)."]
    combos = list(dict.fromkeys((r["protocol"], r["turn"]) for r in summary["table"]))
    for protocol, turn in combos:
        what = "first question" if turn == "first" else "follow-up question (second turn on the evicted cache)"
        parts.append(f"\n### {what}, {protocol} protocol\n\n" + accuracy_table(summary, protocol, turn))
    baselines = [m for m in ("tgv-kv", "random", "streamingllm", "h2o", "snapkv", "pyramidkv", "prefixkv")
                 if m in summary["methods"]]
    for protocol, turn in combos:
        for keep in (0.05, 0.1):
            t = qtype_table(summary, protocol, turn, keep, baselines)
            if t and keep in summary["keeps"]:
                parts.append(f"\n### Per question type at {keep * 100:g}%, {turn} turn, {protocol} protocol\n\n" + t)
    for protocol, turn in combos:
        parts.append(f"\n### Ablations at 5% next to the paper's, {turn} turn, {protocol} protocol\n\n"
                     + ablation_table(summary, protocol, turn))
    for protocol, turn in combos:
        parts.append(f"\n### Claims, {turn} turn, {protocol} protocol\n\n" + "\n".join(claims(rows, summary, protocol, turn, also_at)))
    return "\n".join(parts) + "\n"


def curve_table(labelled: Sequence[tuple[str, dict]], method: str, protocol: str = "official",
                turn: str = "first") -> str:
    """One method's accuracy against the budget in several evaluations (e.g. one seed before, several seeds after):
    a row per evaluation, cells "mean ± sd [min-max]" over its draws (just the accuracy for a single draw)."""
    keeps = sorted({r["keep"] for _, s in labelled for r in s["table"] if r["method"] == method})
    if not keeps:
        return ""
    lines = ["| evaluation | draws | " + " | ".join(f"{k * 100:g}%" for k in keeps) + " |",
             "|---|---|" + "---|" * len(keeps)]
    for label, summary in labelled:
        tab = {r["keep"]: r for r in summary["table"] if r["method"] == method and r["protocol"] == protocol
               and r["turn"] == turn and r["qtype"] == "all"}
        draws = max((r.get("draws") or 1 for r in tab.values()), default=1)
        cells = []
        for k in keeps:
            r = tab.get(k)
            if r is None:
                cells.append("")
            elif (r.get("draws") or 1) > 1:
                cells.append(f"{_pct(r['accuracy'])} ± {100 * r['accuracy_sd']:.1f} "
                             f"[{_pct(r['accuracy_min'])}-{_pct(r['accuracy_max'])}]")
            else:
                cells.append(_pct(r["accuracy"]))
        lines.append(f"| {label} | {draws} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _keeps(text: str) -> tuple[float, ...]:
    try:
        keeps = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected budgets like 0.25,0.5, got {text!r}") from None
    if not keeps or not all(0 < k <= 1 for k in keeps):
        raise argparse.ArgumentTypeError(f"budgets are shares in (0, 1], got {text!r}")
    return keeps


def _check_folder(folder: str) -> None:
    if not (Path(folder) / SUMMARY_JSON).exists() or not load_all_rows(Path(folder)):
        raise SystemExit(f"no {SUMMARY_JSON} or no rows ({ROWS}, {ROWS}.gz, rows.rank*.jsonl) in {folder}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", metavar="folder", help="evaluator output folder(s)")
    ap.add_argument("--curve", metavar="METHOD", help="instead of the report: METHOD's accuracy per budget in each "
                    "folder, one row per folder (mean, sd and range over the draws of a seeded method)")
    ap.add_argument("--also-at", type=_keeps, default=(), metavar="KEEPS",
                    help="also check claims 1 and 2 at these budgets, e.g. 0.25,0.5 (the paper states them at 5%% "
                         "and 10%%; a model with fewer image tokens keeps fewer tokens per layer at the same share)")
    args = ap.parse_args(argv)
    for folder in args.folders:
        _check_folder(folder)
    if args.curve:
        labelled = [(f, json.loads((Path(f) / SUMMARY_JSON).read_text())) for f in args.folders]
        combos = list(dict.fromkeys((r["protocol"], r["turn"]) for _, s in labelled for r in s["table"]))
        for protocol, turn in combos:
            table = curve_table(labelled, args.curve, protocol, turn)
            print(f"\n### {args.curve}, {turn} turn, {protocol} protocol\n\n" + table)
        return
    for folder in args.folders:
        print(report(folder, args.also_at))


if __name__ == "__main__":
    main()
