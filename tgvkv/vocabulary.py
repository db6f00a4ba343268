"""Closed-vocabulary models (the bundled demo VLM): name the words of a question the model does not know, before
running it.

A model with a word-level tokenizer (what ``tgvkv.demo.build`` makes) reads a word it was not trained on as
``<unk>`` or as a vocabulary entry no training sentence used, and answers nonsense without any error. The demo build
records the words its model was trained on under the ``known_words`` key of ``tokenizer_config.json`` (kept in the
tokenizer's ``init_kwargs``); a word-level tokenizer with an unknown token and that key is checked, any other model
is not (subword vocabularies read every string; word-level test models without the key are left alone).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

#: the tokenizer_config.json key (kept in the tokenizer's ``init_kwargs``) listing the words the model was trained on
KNOWN_WORDS_KEY = "known_words"


@dataclass(frozen=True)
class ClosedVocabulary:
    """The words a closed-vocabulary model knows, and the tokenizer's own normaliser + word splitter."""

    words: frozenset[str]
    backend: Any  # tokenizers.Tokenizer: normalizer and pre_tokenizer split a question into the words it looks up

    def split(self, text: str) -> list[str]:
        """`text` cut into the words the tokenizer looks up (lower-cased, punctuation split off, for the demo)."""
        if self.backend.normalizer is not None:
            text = self.backend.normalizer.normalize_str(text)
        if self.backend.pre_tokenizer is None:
            return text.split()
        return [w for w, _ in self.backend.pre_tokenizer.pre_tokenize_str(text)]

    def unknown(self, text: str) -> list[str]:
        """Words of `text` the model does not know, each once, in order of appearance."""
        out: list[str] = []
        for w in self.split(text):
            if w not in self.words and w not in out:
                out.append(w)
        return out

    def listing(self) -> str:
        """The known words for a message: words alphabetically, then punctuation."""
        words = sorted(w for w in self.words if any(c.isalnum() for c in w))
        marks = sorted(w for w in self.words if not any(c.isalnum() for c in w))
        return ", ".join(words + [repr(m) for m in marks])


def closed_vocabulary(processor: Any) -> ClosedVocabulary | None:
    """The words the model knows when its tokenizer is word-level with an unknown token and records them, else None."""
    tokenizer = getattr(processor, "tokenizer", processor)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    unk = getattr(tokenizer, "unk_token", None)
    if backend is None or unk is None or type(backend.model).__name__ != "WordLevel":
        return None
    recorded = (getattr(tokenizer, "init_kwargs", None) or {}).get(KNOWN_WORDS_KEY)
    if not recorded:
        return None
    return ClosedVocabulary(words=frozenset(str(w) for w in recorded), backend=backend)


def unknown_words_message(vocab: ClosedVocabulary, unknown: list[str], what: str = "question") -> str:
    """"the demo model knows these words: ...; 'colour' is not one of them; did you mean 'color'?" (one sentence)."""
    where = "" if what == "question" else f" (in the {what})"
    if len(unknown) == 1:
        head = f"{unknown[0]!r} is not one of them{where}"
    else:
        head = f"{_join([repr(w) for w in unknown])} are not among them{where}"
    guesses = [(w, difflib.get_close_matches(w, sorted(vocab.words), n=1)) for w in unknown]
    guesses = [(w, m[0]) for w, m in guesses if m]
    if not guesses:
        hint = "."
    elif len(unknown) == 1:
        hint = f"; did you mean {guesses[0][1]!r}?"
    else:
        hint = "; did you mean " + _join([f"{m!r} for {w!r}" for w, m in guesses]) + "?"
    return f"the demo model knows these words: {vocab.listing()}; {head}{hint}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def check_known_words(text: str, processor: Any, what: str = "question") -> str:
    """Return `text` unchanged, or raise ValueError naming the words a closed-vocabulary model does not know."""
    vocab = closed_vocabulary(processor)
    if vocab is None:
        return text
    unknown = vocab.unknown(text)
    if unknown:
        raise ValueError(unknown_words_message(vocab, unknown, what))
    return text
