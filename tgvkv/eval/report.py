"""Markdown tables and the paper's claims checked against an evaluation's rows: `python -m tgvkv.eval.report DIR`.

Claims (arXiv 2606.03075) checked on the rows of DIR (the evaluator's output folder), per protocol and turn:
1. TGV-KV at 5% keeps >= 95% of full-KV accuracy.
2. TGV-KV beats random, StreamingLLM and H2O at 5% and at 10%.
3. Ablation ordering: full TGV-KV >= TV+TT >= VV+TT, and evicting text first is the worst variant (at 5%, the
   paper's ablation budget; other budgets are listed too).
Comparisons between two methods are paired (same examples): the difference of mean scores, a 95% bootstrap
interval of that difference (2000 resamples of examples, fixed seed), and a two-sided exact sign test (McNemar's
test for 0/1 scores) on the examples where the two differ. "Holds" means the point estimate satisfies the claim;
"significant" additionally needs p < 0.05 for strict claims ("beats").
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Sequence

from .runner import FULL, ROWS, SUMMARY_JSON, keep_str, load_all_rows, method_sort_key

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


def _scores(rows: dict, method: str, keep: float, protocol: str, turn: str) -> dict[str, float]:
    if method == FULL:
        keep, protocol = 1.0, "official"
    k = keep_str(keep)
    return {r["example_id"]: r["score"] for r in rows.values()
            if r["method"] == method and keep_str(r["keep"]) == k and r["protocol"] == protocol and r["turn"] == turn}


def sign_test(diffs: Sequence[float]) -> float:
    """Two-sided exact sign test p-value on paired differences (zeros dropped)."""
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = pos + neg
    if n == 0:
        return 1.0
    k = min(pos, neg)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * p)


def bootstrap_ci(diffs: Sequence[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    if not diffs:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    m = len(diffs)
    means = sorted(sum(diffs[rng.randrange(m)] for _ in range(m)) / m for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def paired(rows: dict, a: str, b: str, keep: float, protocol: str, turn: str) -> dict | None:
    sa, sb = _scores(rows, a, keep, protocol, turn), _scores(rows, b, keep, protocol, turn)
    ids = sorted(set(sa) & set(sb))
    if not ids:
        return None
    diffs = [sa[i] - sb[i] for i in ids]
    lo, hi = bootstrap_ci(diffs)
    return {"n": len(ids), "a": sum(sa[i] for i in ids) / len(ids), "b": sum(sb[i] for i in ids) / len(ids),
            "diff": sum(diffs) / len(ids), "ci": (lo, hi), "p": sign_test(diffs),
            "a_only": sum(d > 0 for d in diffs), "b_only": sum(d < 0 for d in diffs)}


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
    for m in methods:
        cells = []
        for k in keeps:
            r = next((r for r in table if r["method"] == m and r["keep"] == k), None)
            if r is None:
                cells.append("")
                continue
            rel = r["relative_to_full"]
            cell = f"{_pct(r['accuracy'])} ({_pct(rel)})" if rel is not None else _pct(r["accuracy"])
            cells.append(f"**{cell}**" if m == "tgv-kv" else cell)
        label = m if m not in ABLATION_LABEL else f"{m} ({ABLATION_LABEL[m]})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def qtype_table(summary: dict, protocol: str, turn: str, keep: float, methods: Sequence[str]) -> str:
    table = [r for r in summary["table"] if r["protocol"] == protocol and r["turn"] == turn]
    qtypes = sorted({r["qtype"] for r in table if r["qtype"] != "all"})
    if not qtypes:
        return ""
    lines = ["| method | " + " | ".join(qtypes) + " |", "|---|" + "---|" * len(qtypes)]
    for m in [FULL, *methods]:
        k = 1.0 if m == FULL else keep
        cells = [next((_pct(r["accuracy"]) for r in table if r["method"] == m and r["keep"] == k and r["qtype"] == q), "")
                 for q in qtypes]
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


def claims(rows: dict, summary: dict, protocol: str, turn: str) -> list[str]:
    """Bullet lines, one per claim, with the numbers behind the verdict."""
    out = []
    tab = {(r["method"], r["keep"]): r for r in summary["table"]
           if r["protocol"] == protocol and r["turn"] == turn and r["qtype"] == "all"}
    methods = {m for m, _ in tab}
    keeps = sorted({k for m, k in tab if m != FULL})
    # 1
    r = tab.get(("tgv-kv", 0.05))
    if r is not None:
        rel = r["relative_to_full"]
        ok = rel is not None and rel >= 0.95
        rel_txt = f"relative {_pct(rel)}%" if rel is not None else "relative undefined (full KV scores 0)"
        out.append(f"1. TGV-KV at 5% keeps >= 95% of full-KV accuracy: **{'holds' if ok else 'does not hold'}** "
                   f"({_pct(r['accuracy'])}% vs full {_pct(r['full_accuracy'])}%, {rel_txt}; answers identical "
                   f"to full KV on {_pct(r['agree_full'])}% of examples).")
    # 2
    for keep in (0.05, 0.1):
        parts, all_ok, all_sig = [], True, True
        for b in ("random", "streamingllm", "h2o"):
            if b not in methods or ("tgv-kv", keep) not in tab:
                continue
            c = paired(rows, "tgv-kv", b, keep, protocol, turn)
            if c is None:
                continue
            ok, sig = c["diff"] > 0, c["diff"] > 0 and c["p"] < 0.05
            all_ok &= ok
            all_sig &= sig
            parts.append(f"{b}: {_pct(c['a'])} vs {_pct(c['b'])}, diff {100 * c['diff']:+.1f} pts "
                         f"[95% CI {100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}], sign test p={c['p']:.2g} "
                         f"({c['a_only']} examples only TGV-KV right, {c['b_only']} only {b})")
        if parts:
            verdict = "holds" if all_ok and all_sig else ("holds in the point estimates, not all significant" if all_ok
                                                          else "does not hold")
            out.append(f"2. TGV-KV beats random, StreamingLLM and H2O at {keep * 100:g}%: **{verdict}**. "
                       + "; ".join(parts) + ".")
    # 3
    for keep in keeps:
        order = ["tgv-kv", "tgv-tv-tt", "tgv-vv-tt"]
        if not all((m, keep) in tab for m in order):
            continue
        accs = [tab[(m, keep)]["accuracy"] for m in order]
        chain = accs[0] >= accs[1] >= accs[2]
        tests = [paired(rows, order[i], order[i + 1], keep, protocol, turn) for i in range(2)]
        ablations = sorted((m for m in methods if m.startswith("tgv-") and m != "tgv-kv"), key=method_sort_key)
        if "tgv-evict-text-first" in ablations:
            worst = min(ablations, key=lambda m: (tab[(m, keep)]["accuracy"], m != "tgv-evict-text-first"))
            w = tab[("tgv-evict-text-first", keep)]["accuracy"]
            ties = [m for m in ablations if tab[(m, keep)]["accuracy"] == w and m != "tgv-evict-text-first"]
            verdict = "does not hold" if worst != "tgv-evict-text-first" else ("tied for worst" if ties else "holds")
            worst_txt = (f"evict-text-first is the worst variant: **{verdict}**"
                         f" ({_pct(w)}%; lowest: {worst} {_pct(tab[(worst, keep)]['accuracy'])}%"
                         + (f"; tied with {', '.join(ties)}" if ties else "") + ")")
        else:
            worst_txt = "evict-text-first not evaluated"
        out.append(
            f"3. at {keep * 100:g}%: full TGV-KV >= TV+TT >= VV+TT: **{'holds' if chain else 'does not hold'}** "
            f"({' / '.join(_pct(a) for a in accs)}; TGV-KV - TV+TT {100 * tests[0]['diff']:+.1f} pts p={tests[0]['p']:.2g}, "
            f"TV+TT - VV+TT {100 * tests[1]['diff']:+.1f} pts p={tests[1]['p']:.2g}); {worst_txt}."
        )
    return out


def report(folder: str | Path) -> str:
    folder = Path(folder)
    summary = json.loads((folder / SUMMARY_JSON).read_text())
    n = summary["n_examples"]  # the task's examples are a prefix (index < n) of what the rows may hold
    rows = {k: r for k, r in load_all_rows(folder).items() if r["example_index"] < n}
    parts = [f"Model `{summary['model']}`, task `{summary['task']}`, {summary['n_examples']} examples, "
             f"max {summary['max_new_tokens']} new tokens, greedy. Cells: accuracy % (relative to full KV %)."]
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
        parts.append(f"\n### Claims, {turn} turn, {protocol} protocol\n\n" + "\n".join(claims(rows, summary, protocol, turn)))
    return "\n".join(parts) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    args = ap.parse_args(argv)
    if not (Path(args.folder) / SUMMARY_JSON).exists() or not load_all_rows(Path(args.folder)):
        raise SystemExit(f"no {SUMMARY_JSON} or no rows ({ROWS}, {ROWS}.gz, rows.rank*.jsonl) in {args.folder}")
    print(report(args.folder))


if __name__ == "__main__":
    main()
