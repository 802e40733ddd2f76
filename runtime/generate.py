"""The decode loop: prefill once, then one decoder step per token for every choice still running.

`generate` yields one `Step` per sampled token (and per choice): the seam between the engine and whoever shows the
text (the server's SSE stream, the CLI). The n choices of a request share one prefill; their caches are rows of one
batch, so a decode step costs one decoder run whatever n is. A choice leaves the batch when it finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .detokenize import IncrementalDetokenizer
from .engine import Engine
from .errors import ContextLengthError
from .grammar import Grammar, GrammarState
from .sampling import Sample, SamplingParams, StopMatcher, make_samplers


@dataclass(frozen=True)
class Step:
    choice: int
    text: str  # text that became final with this token (may be empty: a partial UTF-8 character, a held stop prefix)
    token: int
    sample: Sample
    finish_reason: str | None  # None while running, then "stop" (EOS or a stop string) or "length"
    completion_tokens: int


@dataclass
class _Choice:
    index: int
    detokenizer: IncrementalDetokenizer
    stop: StopMatcher
    grammar: GrammarState | None = None
    tokens: int = 0


def generate(engine: Engine, tokenizer, prompt_ids: Sequence[int], image_features: np.ndarray | None,
             params: SamplingParams, *, max_tokens: int, eos_token_ids: Sequence[int],
             cancelled: Callable[[], bool] = lambda: False, grammar: Grammar | None = None) -> Iterator[Step]:
    """Sample up to `max_tokens` tokens for each of `params.n` choices after the prompt.

    With a `grammar` each choice samples only tokens it allows (EOS only where it accepts), and a choice whose
    grammar is complete ends at once with "stop", without another decoder step.

    `cancelled` is checked before the prefill and before every decoder step: a client that went away stops the
    work within one step. A cancelled generation simply ends: the choices it cut have no `finish_reason`, which is
    how the caller tells a cut answer from a finished one.
    """
    vocab = engine.package.text["vocab_size"]
    if len(prompt_ids) >= engine.context_length:
        raise ContextLengthError(
            f"the prompt is {len(prompt_ids)} tokens; the model's context of {engine.context_length} tokens "
            "leaves no room for an answer", param="messages")
    max_tokens = min(max_tokens, engine.context_length - len(prompt_ids))
    if cancelled():
        return
    logits, cache = engine.prefill(np.asarray(prompt_ids), image_features, reserve=max_tokens)
    logits = logits[:, -1]
    samplers = make_samplers(params, vocab)
    choices = [_Choice(i, IncrementalDetokenizer(tokenizer), StopMatcher(params.stop),
                       grammar.start() if grammar is not None else None) for i in range(params.n)]
    if len(choices) > 1:
        cache = cache.take([0] * len(choices))
        logits = np.repeat(logits, len(choices), axis=0)
    eos = set(eos_token_ids)

    while choices and max_tokens > 0 and not cancelled():  # checked here too: a long prefill may be cancelled
        running, next_tokens = [], []
        for row, choice in enumerate(choices):
            state = choice.grammar
            sample = samplers[choice.index].sample(logits[row], state.apply if state is not None else None)
            choice.tokens += 1
            if state is not None:
                state.advance(sample.token)
            text, finish = _advance(choice, sample.token, eos, max_tokens,
                                    complete=state is not None and state.is_finished())
            yield Step(choice.index, text, sample.token, sample, finish, choice.tokens)
            if finish is None:
                running.append(row)
                next_tokens.append(sample.token)
        if not running or cancelled():
            return
        if len(running) < len(choices):
            cache = cache.take(running)
            choices = [choices[row] for row in running]
        embeds = engine.embed(np.array(next_tokens, dtype=np.int64)[:, None])
        logits, cache = engine.forward(embeds, cache)
        logits = logits[:, -1]


def _advance(choice: _Choice, token: int, eos: set[int], max_tokens: int, *, complete: bool = False
             ) -> tuple[str, str | None]:
    """Feed one token through the detokenizer and stop matcher: (final text, finish reason or None).

    `complete`: the choice's grammar can take nothing more, so this token ends it ("stop").
    """
    if token in eos:
        text, stopped = choice.stop.feed(choice.detokenizer.flush())
        return text + ("" if stopped else choice.stop.flush()), "stop"
    text, stopped = choice.stop.feed(choice.detokenizer.add(token))
    if stopped:
        return text, "stop"
    if complete:
        tail, stopped = choice.stop.feed(choice.detokenizer.flush())
        return text + tail + ("" if stopped else choice.stop.flush()), "stop"
    if choice.tokens >= max_tokens:
        tail, stopped = choice.stop.feed(choice.detokenizer.flush())
        return text + tail + ("" if stopped else choice.stop.flush()), "stop" if stopped else "length"
    return text, None
