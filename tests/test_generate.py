"""The decode loop through a real package: n choices, seeds, stop strings, limits, bias, cancellation."""

from __future__ import annotations

import pytest

from edgevlm.runtime.errors import ContextLengthError
from edgevlm.runtime.sampling import SamplingParams
from edgevlm.runtime.vlm import VisionLanguageModel

MESSAGES = [{"role": "user", "content": "Tell me about the weather today."}]


@pytest.fixture(scope="module")
def vlm(tiny_package):
    return VisionLanguageModel.load(tiny_package)


def by_choice(steps):
    out = {}
    for step in steps:
        out.setdefault(step.choice, []).append(step)
    return out


def prefilled(vlm) -> float:
    return vlm.metrics.prefill_tokens._value.get()


def test_n_choices_share_one_prefill_and_a_seed_reproduces_them(vlm):
    params = SamplingParams(temperature=1.0, n=3, seed=1234)
    prompt = vlm.prepare(MESSAGES)
    before = prefilled(vlm)
    first = by_choice(vlm.generate(prompt, params, max_tokens=12))
    once = prefilled(vlm) - before
    second = by_choice(vlm.generate(prompt, params, max_tokens=12))
    # The prompt ran through the decoder once for three choices (or all but a prefix an earlier test left
    # cached); the second time its KV was reused from a slot, all but the last token.
    assert 1 <= once <= len(prompt.input_ids) and prefilled(vlm) - before - once == 1
    assert sorted(first) == [0, 1, 2]
    tokens = {c: [s.token for s in steps] for c, steps in first.items()}
    assert tokens == {c: [s.token for s in steps] for c, steps in second.items()}
    assert len({tuple(t) for t in tokens.values()}) == 3  # the choices differ from one another
    for steps in first.values():
        assert [s.completion_tokens for s in steps] == list(range(1, len(steps) + 1))
        assert steps[-1].finish_reason in ("stop", "length")
        assert all(s.finish_reason is None for s in steps[:-1])
    other_seed = by_choice(vlm.generate(prompt, SamplingParams(temperature=1.0, n=3, seed=99), max_tokens=12))
    assert {c: [s.token for s in steps] for c, steps in other_seed.items()} != tokens


def test_max_tokens_finishes_with_length(vlm):
    steps = list(vlm.generate(vlm.prepare(MESSAGES), SamplingParams(temperature=0), max_tokens=7))
    assert len(steps) == 7 and steps[-1].finish_reason == "length"


def test_stop_string_spanning_tokens_is_cut_from_the_text(vlm):
    prompt = vlm.prepare(MESSAGES)
    steps = list(vlm.generate(prompt, SamplingParams(temperature=0), max_tokens=20))
    pieces = [s.text for s in steps]
    full = "".join(pieces)
    # A stop string that starts inside the 3rd token's text and ends inside the 4th's.
    start = len("".join(pieces[:2])) + len(pieces[2]) // 2
    stop = full[start:start + len(pieces[2]) // 2 + 2]
    assert stop and full.index(stop) == start
    stopped = list(vlm.generate(prompt, SamplingParams(temperature=0, stop=(stop,)), max_tokens=20))
    assert "".join(s.text for s in stopped) == full[:start]
    assert stopped[-1].finish_reason == "stop"
    assert len(stopped) < len(steps)


def test_logit_bias_is_applied_in_the_loop(vlm):
    token = vlm.tokenizer.token_to_id("ocean")
    steps = list(vlm.generate(vlm.prepare(MESSAGES), SamplingParams(temperature=0, logit_bias={token: 100}),
                              max_tokens=5))
    assert [s.token for s in steps] == [token] * 5
    assert "".join(s.text for s in steps) == "ocean" * 5


def test_cancelled_generation_stops_within_one_step(vlm):
    seen = []
    steps = vlm.generate(vlm.prepare(MESSAGES), SamplingParams(temperature=0), max_tokens=50,
                         cancelled=lambda: len(seen) >= 3)
    for step in steps:
        seen.append(step)
    assert len(seen) == 3


def test_prompt_longer_than_the_context_is_refused_before_generation(vlm):
    words = " ".join(["weather"] * (vlm.engine.context_length + 10))
    with pytest.raises(ContextLengthError, match="context of 2048 tokens"):
        vlm.prepare([{"role": "user", "content": words}])
