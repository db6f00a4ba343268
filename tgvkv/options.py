"""What a run is asked to do (`RunOptions`) and what its trace records (`CaptureOptions`). No torch here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .trace import MAX_THUMBNAIL_SIDE

MAX_NEW_TOKENS_LIMIT = 1024


@dataclass
class CaptureOptions:
    """What the trace records beyond what the policy needs (diagnostics cost extra attention passes)."""

    diagnostics: bool = True  # rows of every text query + column sums over all keys -> block sums, accumulated attention
    max_map_tokens: int = 768  # store full (L, T, T) attention maps only for prompts up to this length
    hidden_states: bool = True  # store prefill hidden states (cosine-neighbour plots)
    max_hidden_bytes: int = 64 * 2**20
    thumbnail_side: int = 384  # px: store a copy of each image this small in the trace (overlay figures); 0: none

    def __post_init__(self) -> None:
        if not isinstance(self.thumbnail_side, int) or not 0 <= self.thumbnail_side <= MAX_THUMBNAIL_SIDE:
            raise ValueError(
                f"thumbnail_side must be an integer in [0, {MAX_THUMBNAIL_SIDE}], got {self.thumbnail_side!r}")


#: the least a run can record: what the policy needs, nothing for diagnostics (batched path, teacher forcing)
MINIMAL_CAPTURE = CaptureOptions(diagnostics=False, hidden_states=False, thumbnail_side=0)


@dataclass
class RunOptions:
    max_new_tokens: int = 32
    protocol: Literal["official", "strict"] = "official"
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    followup: str | None = None  # a second user turn appended to the (evicted) cache
    followup_max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or not (1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT):
            raise ValueError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens!r}")
        if self.protocol not in ("official", "strict"):
            raise ValueError(f"protocol must be 'official' or 'strict', got {self.protocol!r}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError("sampling needs temperature > 0 and 0 < top_p <= 1")
