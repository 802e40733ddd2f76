"""Per-choice text, the layer above the token stepper: a choice's sampled tokens → text deltas and its ending.

The scheduler (`scheduler.py`) samples one token per running sequence per step; for each, the sequence's
`ChoiceText` turns the token into the text that became final (incremental detokenizer), cuts at stop strings and
says whether the choice ended and why; the scheduler hands the result on as a `Step`. A `Step` is the seam between
the engine and whoever shows the text (the server's SSE stream, the CLI, the in-process API).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .detokenize import IncrementalDetokenizer
from .sampling import Sample, StopMatcher


@dataclass(frozen=True)
class Step:
    choice: int
    text: str  # text that became final with this token (may be empty: a partial UTF-8 character, a held stop prefix)
    token: int
    sample: Sample
    finish_reason: str | None  # None while running, then "stop" (EOS, a stop string, a complete grammar) or "length"
    completion_tokens: int


class ChoiceText:
    """One choice's detokenizer, stop strings and token limit."""

    def __init__(self, tokenizer, stops: Iterable[str], max_tokens: int, eos_token_ids: Iterable[int]):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = StopMatcher(tuple(stops))
        self.max_tokens = max_tokens
        self.eos = frozenset(eos_token_ids)
        self.tokens = 0

    def feed(self, token: int, *, complete: bool = False) -> tuple[str, str | None]:
        """Take the choice's next token: (final text, finish reason or None).

        `complete`: the choice's grammar can take nothing more, so this token ends it ("stop").
        """
        self.tokens += 1
        if token in self.eos:
            text, stopped = self.stop.feed(self.detokenizer.flush())
            return text + ("" if stopped else self.stop.flush()), "stop"
        text, stopped = self.stop.feed(self.detokenizer.add(token))
        if stopped:
            return text, "stop"
        if complete or self.tokens >= self.max_tokens:
            tail, stopped = self.stop.feed(self.detokenizer.flush())
            text += tail + ("" if stopped else self.stop.flush())
            return text, "stop" if stopped or complete else "length"
        return text, None
