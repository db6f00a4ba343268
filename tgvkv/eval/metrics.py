"""Answer scoring: exact match, VQA accuracy over several reference answers, ANLS.

- ``exact``: 1 if the normalised prediction equals any normalised reference, else 0.
- ``vqa``: min(#references equal to the prediction / 3, 1) after VQA normalisation. This is the *simple form* that
  VizWiz/TextVQA papers state; the official evaluation scripts additionally average this over the 10 leave-one-out
  subsets of 9 references (``vqa10`` here), which differs only when exactly 3 references match (simple: 1.0,
  official: 0.9) and in a few similar boundary cases.
- ``anls``: Average Normalized Levenshtein Similarity (DocVQA): max over references of 1 - NL(pred, ref) where
  NL = edit distance / max(len) of the lower-cased, whitespace-collapsed strings; 0 when NL >= 0.5 (threshold 0.5).
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

METRICS = ("exact", "vqa", "vqa10", "anls")
ANLS_THRESHOLD = 0.5

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
    "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's", "shouldnt": "shouldn't", "thats": "that's",
    "theres": "there's", "theyre": "they're", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
    "wont": "won't", "wouldnt": "wouldn't", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # official list
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")


def normalise_vqa(answer: str) -> str:
    """The official VQA answer normalisation: lower case, punctuation, digits for number words, no articles,
    canonical contractions, single spaces."""
    s = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    out = s
    for p in _PUNCT:
        if (p + " " in s or " " + p in s) or re.search(_COMMA_DIGITS, s) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = []
    for w in out.lower().split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalise_basic(answer: str) -> str:
    """Lower case, punctuation split off as separate tokens, single spaces (the demo task's `normalise`)."""
    s = re.sub(r"<[^>]*>", " ", answer.lower())
    s = re.sub(r"([.,?!:;])", r" \1 ", s)
    return " ".join(s.split())


def exact_match(prediction: str, references: Sequence[str], normalise: Callable[[str], str] = normalise_vqa) -> float:
    p = normalise(prediction)
    return 1.0 if any(p == normalise(r) for r in references) else 0.0


def vqa_accuracy(prediction: str, references: Sequence[str], normalise: Callable[[str], str] = normalise_vqa) -> float:
    """Simple form: min(#matching references / 3, 1)."""
    if not references:
        raise ValueError("vqa accuracy needs at least one reference answer")
    p = normalise(prediction)
    matches = sum(p == normalise(r) for r in references)
    return min(matches / 3.0, 1.0)


def vqa_accuracy_official(prediction: str, references: Sequence[str], normalise: Callable[[str], str] = normalise_vqa) -> float:
    """Official averaging: mean over the leave-one-out subsets of min(#matches in the subset / 3, 1)."""
    refs = list(references)
    if len(refs) < 2:
        return vqa_accuracy(prediction, refs, normalise)
    p = normalise(prediction)
    hits = [p == normalise(r) for r in refs]
    total = sum(hits)
    return sum(min((total - h) / 3.0, 1.0) for h in hits) / len(refs)


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """max over references of 1 - NL (0 when NL >= threshold); strings lower-cased and whitespace-collapsed."""
    if not references:
        raise ValueError("ANLS needs at least one reference answer")
    p = " ".join(prediction.lower().split())
    best = 0.0
    for r in references:
        r = " ".join(str(r).lower().split())
        n = max(len(p), len(r))
        nl = levenshtein(p, r) / n if n else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def score(metric: str, prediction: str, references: Sequence[str], normalise: Callable[[str], str] | None = None) -> float:
    """Score one prediction; `normalise` overrides the metric's normaliser for exact / vqa (ANLS has its own)."""
    if metric == "exact":
        return exact_match(prediction, references, normalise or normalise_vqa)
    if metric == "vqa":
        return vqa_accuracy(prediction, references, normalise or normalise_vqa)
    if metric == "vqa10":
        return vqa_accuracy_official(prediction, references, normalise or normalise_vqa)
    if metric == "anls":
        return anls(prediction, references)
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
