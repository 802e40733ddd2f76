"""Sampling: parameters and their validation, logit processing, seeded draws against analytic probabilities, stops."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from edgevlm.runtime.errors import InvalidRequestError
from edgevlm.runtime.sampling import (
    LOGPROB_FLOOR,
    ChoiceSampler,
    SamplingParams,
    StopMatcher,
    apply_logit_bias,
    apply_penalties,
    bias_arrays,
    log_softmax,
    make_samplers,
    softmax,
    top_logprobs,
    top_p_ids,
)


def sampler(vocab: int, index: int = 0, **params) -> ChoiceSampler:
    return ChoiceSampler(SamplingParams(**params), vocab, index)


def draw(s: ChoiceSampler, logits, times: int) -> np.ndarray:
    return np.array([s.sample(logits).token for _ in range(times)])


def frequencies(tokens: np.ndarray, vocab: int) -> np.ndarray:
    return np.bincount(tokens, minlength=vocab) / tokens.size


def chi_square(tokens: np.ndarray, expected_probs: np.ndarray) -> float:
    observed = np.bincount(tokens, minlength=expected_probs.size)
    support = expected_probs > 0
    expected = expected_probs[support] * tokens.size
    return float((((observed[support] - expected) ** 2) / expected).sum())


# ------------------------------------------------------------------------------------------ reproducibility


STEP_LOGITS = np.random.default_rng(1234).standard_normal((50, 300)).astype(np.float32)


def sequence(**params) -> list[int]:
    index = params.pop("index", 0)
    s = sampler(300, index, **params)
    return [s.sample(row).token for row in STEP_LOGITS]


def test_same_seed_same_sequence_over_50_steps():
    first = sequence(seed=42, temperature=1.0, top_p=0.9, presence_penalty=0.3, frequency_penalty=0.2)
    again = sequence(seed=42, temperature=1.0, top_p=0.9, presence_penalty=0.3, frequency_penalty=0.2)
    assert first == again
    assert len(set(first)) > 10  # it really sampled, it did not collapse onto one token


def test_different_seed_or_choice_index_gives_a_different_sequence():
    base = sequence(seed=42)
    assert sequence(seed=43) != base
    assert sequence(seed=42, index=1) != base
    assert sequence(seed=42, index=1) == sequence(seed=42, index=1)
    assert sequence(seed=-7) == sequence(seed=-7) != base  # negative seeds are valid too


def test_n_choices_are_distinct_and_reproducible():
    params = SamplingParams(seed=5, n=3)
    runs = []
    for _ in range(2):
        samplers = make_samplers(params, 300)
        assert [s.index for s in samplers] == [0, 1, 2]
        runs.append([[s.sample(row).token for row in STEP_LOGITS] for s in samplers])
    assert runs[0] == runs[1]
    a, b, c = runs[0]
    assert a != b and b != c and a != c


def test_without_seed_each_sampler_gets_fresh_entropy():
    assert sequence() != sequence()


def test_greedy_picks_argmax_and_breaks_ties_by_lowest_id():
    logits = np.array([1.0, 5.0, 3.0, 5.0, 5.0], dtype=np.float32)
    for seed in (None, 1, 2):
        s = sampler(5, temperature=0, top_p=0.01, seed=seed)
        assert draw(s, logits, 5).tolist() == [1] * 5


def test_greedy_ignores_top_p_and_never_touches_the_generator():
    s = sampler(4, temperature=0.0, top_p=0.1, seed=3)
    before = s.rng.bit_generator.state
    assert s.sample(np.array([0.0, 2.0, 1.9, -1.0])).token == 1
    assert s.rng.bit_generator.state == before


# ------------------------------------------------------------------------------------------ distributions

FIXED = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
DRAWS = 20_000
# Chi-square critical value for 5 degrees of freedom at p = 0.001.
CHI2_DF5_999 = 20.515


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_temperature_matches_analytic_probabilities(temperature):
    scaled = np.exp(FIXED / temperature)
    expected = scaled / scaled.sum()
    tokens = draw(sampler(6, seed=7, temperature=temperature), FIXED, DRAWS)
    assert np.abs(frequencies(tokens, 6) - expected).max() < 0.015
    assert chi_square(tokens, expected) < CHI2_DF5_999


def test_lower_temperature_concentrates_mass():
    cold = frequencies(draw(sampler(6, seed=1, temperature=0.3), FIXED, 5000), 6)
    hot = frequencies(draw(sampler(6, seed=1, temperature=2.0), FIXED, 5000), 6)
    assert cold[0] > 0.9 > hot[0]
    assert hot[5] > cold[5]


# probabilities 0.5, 0.25, 0.15, 0.07, 0.03 placed at scattered ids of an 8-token vocabulary (3 ids impossible)
NUCLEUS_PROBS = {6: 0.5, 2: 0.25, 7: 0.15, 0: 0.07, 4: 0.03}
NUCLEUS_LOGITS = np.full(8, -np.inf)
for _id, _p in NUCLEUS_PROBS.items():
    NUCLEUS_LOGITS[_id] = math.log(_p)


@pytest.mark.parametrize(
    "top_p, nucleus",
    [
        (1.0, [6, 2, 7, 0, 4]),
        (0.95, [6, 2, 7, 0]),   # 0.5 + 0.25 + 0.15 = 0.90 < 0.95 → needs token 0
        (0.8, [6, 2, 7]),       # 0.75 < 0.8 ≤ 0.90
        (0.75, [6, 2]),         # exactly reached by 0.5 + 0.25
        (0.6, [6, 2]),
        (0.3, [6]),             # the top token alone already covers it
        (1e-6, [6]),            # the top token is always kept
    ],
)
def test_top_p_never_samples_outside_the_hand_computed_nucleus(top_p, nucleus):
    assert top_p_ids(softmax(NUCLEUS_LOGITS), top_p).tolist() == nucleus
    tokens = draw(sampler(8, seed=11, top_p=top_p), NUCLEUS_LOGITS, DRAWS)
    assert set(tokens.tolist()) == set(nucleus)
    kept = np.array([NUCLEUS_PROBS[i] for i in nucleus])
    expected = np.zeros(8)
    expected[nucleus] = kept / kept.sum()
    assert np.abs(frequencies(tokens, 8) - expected).max() < 0.015
    if len(nucleus) > 1:
        assert chi_square(tokens, expected) < 20.515


def test_top_p_is_applied_after_temperature():
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    # at temperature 1 the top token alone (0.6) covers top_p=0.55; at temperature 2 probabilities flatten to
    # ∝ sqrt(p) = (0.775, 0.548, 0.316) / 1.639 = (0.473, 0.334, 0.193), so the nucleus needs two tokens
    assert set(draw(sampler(3, seed=2, top_p=0.55), logits, 2000).tolist()) == {0}
    flat = np.sqrt([0.6, 0.3])
    tokens = draw(sampler(3, seed=2, top_p=0.55, temperature=2.0), logits, DRAWS)
    assert set(tokens.tolist()) == {0, 1}
    assert abs(frequencies(tokens, 3)[0] - flat[0] / flat.sum()) < 0.015


def test_top_p_ties_at_the_boundary_go_to_the_lower_id():
    assert top_p_ids(np.full(4, 0.25), 0.5).tolist() == [0, 1]
    assert top_p_ids(np.array([0.1, 0.3, 0.3, 0.3]), 0.5).tolist() == [1, 2]
    ties = np.full(4000, 1 / 4000)  # large enough to go through the partial (argpartition) path
    assert top_p_ids(ties, 0.01).tolist() == list(range(40))


def test_top_p_reached_up_to_rounding_counts_as_reached():
    assert 0.6 + 0.3 < 0.9  # float64: 0.8999999999999999
    assert top_p_ids(np.array([0.6, 0.3, 0.1]), 0.9).tolist() == [0, 1]


def test_top_p_on_a_large_vocabulary_matches_a_full_sort():
    vocab = 49_152
    logits = np.random.default_rng(0).standard_normal(vocab) * 0.5  # flat: the nucleus holds thousands of tokens
    probs = softmax(logits)
    order = np.argsort(-probs, kind="stable")
    size = int(np.searchsorted(np.cumsum(probs[order]), 0.9)) + 1
    nucleus = order[:size]
    assert size > 1000
    got = top_p_ids(probs, 0.9)
    assert got.tolist() == nucleus.tolist()
    tokens = draw(sampler(vocab, seed=3, top_p=0.9), logits.astype(np.float32), 100)
    assert np.isin(tokens, nucleus).all()
    peaked = logits.copy()
    peaked[[10, 20000, 49151]] += 20.0  # the nucleus is three tokens: found without sorting the vocabulary
    assert sorted(top_p_ids(softmax(peaked), 0.9).tolist()) == [10, 20000, 49151]


# ---------------------------------------------------------------------------------- penalties and logit_bias


def test_penalties_follow_openais_formula_on_hand_computed_values():
    logits = np.array([1.0, 2.0, 3.0, 0.5])
    counts = np.array([0, 2, 1, 0])
    out = apply_penalties(logits.copy(), counts, presence_penalty=0.5, frequency_penalty=0.25)
    np.testing.assert_allclose(out, [1.0, 2.0 - 0.5 - 0.5, 3.0 - 0.25 - 0.5, 0.5])
    negative = apply_penalties(logits.copy(), counts, presence_penalty=-1.0, frequency_penalty=-0.5)
    np.testing.assert_allclose(negative, [1.0, 2.0 + 1.0 + 1.0, 3.0 + 0.5 + 1.0, 0.5])


def test_sampler_keeps_completion_counts_incrementally():
    s = sampler(4, presence_penalty=0.5, frequency_penalty=0.25)
    for token in (1, 2, 1):
        s.record(token)
    assert s.counts == {1: 2, 2: 1}
    logits = np.array([1.0, 2.0, 3.0, 0.5], dtype=np.float32)
    np.testing.assert_allclose(s.process(logits), [1.0, 1.0, 2.25, 0.5])
    assert logits.tolist() == [1.0, 2.0, 3.0, 0.5]  # the caller's array is left alone


def test_frequency_penalty_steers_greedy_decoding_step_by_step():
    # logits (3.0, 2.5, 0): token 0 is picked until 3.0 - 0.4*c0 drops below 2.5 - 0.4*c1
    s = sampler(3, temperature=0, frequency_penalty=0.4)
    logits = np.array([3.0, 2.5, 0.0])
    assert draw(s, logits, 6).tolist() == [0, 0, 1, 0, 1, 0]
    assert s.counts == {0: 4, 1: 2}


def test_presence_penalty_applies_once_per_token():
    s = sampler(3, temperature=0, presence_penalty=1.0)
    # 0: 3.0 → picked, then 2.0 forever; 1: 2.5 → picked, then 1.5; then 0 (2.0) beats 1 (1.5) and 2 (0.0) forever
    assert draw(s, np.array([3.0, 2.5, 0.0]), 5).tolist() == [0, 1, 0, 0, 0]


def test_logit_bias_is_added_and_minus_100_bans():
    ids, amounts = bias_arrays({1: 3.0, 2: -100.0, 0: -2.5})
    out = apply_logit_bias(np.array([1.0, 2.0, 3.0, 0.5]), ids, amounts)
    assert out.tolist() == [-1.5, 5.0, -np.inf, 0.5]
    s = sampler(4, logit_bias={"1": 3.0, "2": -100, "0": -2.5}, presence_penalty=1.0)
    s.record(1)
    assert s.process(np.array([1.0, 2.0, 3.0, 0.5])).tolist() == [-1.5, 4.0, -np.inf, 0.5]


def test_a_banned_token_is_never_sampled_even_when_it_was_the_favourite():
    logits = np.array([10.0, 0.0, 0.0])
    tokens = draw(sampler(3, seed=9, logit_bias={"0": -100}, temperature=2.0), logits, 2000)
    assert 0 not in tokens and set(tokens.tolist()) == {1, 2}
    assert sampler(3, temperature=0, logit_bias={0: -100}).sample(logits).token == 1


def test_logit_bias_shifts_the_distribution_by_the_hand_computed_amount():
    logits = np.zeros(3)
    tokens = draw(sampler(3, seed=4, logit_bias={"2": math.log(2.0)}), logits, DRAWS)
    assert np.abs(frequencies(tokens, 3) - [0.25, 0.25, 0.5]).max() < 0.015


# ------------------------------------------------------------------------------------------------- logprobs


def test_log_softmax_is_stable_and_handles_bans():
    logits = np.array([1000.0, 999.0, -np.inf, 998.0])
    out = log_softmax(logits)
    z = math.log(1 + math.exp(-1) + math.exp(-2))
    np.testing.assert_allclose(out[[0, 1, 3]], [-z, -1 - z, -2 - z], rtol=1e-12)
    assert out[2] == -np.inf
    assert np.isfinite(softmax(np.array([1e308, 1e308])).sum())


def test_top_logprobs_sorted_with_ties_to_the_lower_id_and_capped_at_20():
    lp = log_softmax(np.array([0.0, 2.0, 1.0, 2.0, -1.0]))
    ids, values = top_logprobs(lp, 3)
    assert ids.tolist() == [1, 3, 2]
    np.testing.assert_allclose(values, lp[[1, 3, 2]])
    assert top_logprobs(lp, 0)[0].size == 0
    assert top_logprobs(np.zeros(100), 50)[0].tolist() == list(range(20))
    assert top_logprobs(np.zeros(5000), 7)[0].tolist() == list(range(7))
    many = np.random.default_rng(0).standard_normal(5000)
    assert top_logprobs(many, 20)[0].tolist() == np.argsort(-many, kind="stable")[:20].tolist()


def test_sample_reports_logprobs_after_bias_and_penalties_at_temperature_one():
    s = sampler(4, temperature=0.3, seed=1, logprobs=True, top_logprobs=3, logit_bias={"3": -100},
                frequency_penalty=1.0)
    logits = np.array([2.0, 1.0, 0.0, 5.0])
    first = s.sample(logits)
    expected = log_softmax(np.array([2.0, 1.0, 0.0, -np.inf]))
    assert first.logprob == pytest.approx(expected[first.token])
    assert [i for i, _ in first.top_logprobs] == [0, 1, 2]
    np.testing.assert_allclose([v for _, v in first.top_logprobs], expected[:3])
    second = s.sample(logits)  # the first token now carries a frequency penalty of 1.0
    processed = np.array([2.0, 1.0, 0.0, -np.inf])
    processed[first.token] -= 1.0
    assert second.logprob == pytest.approx(log_softmax(processed)[second.token])
    banned_in_top = sampler(2, temperature=0, logprobs=True, top_logprobs=2, logit_bias={1: -100})
    assert banned_in_top.sample(np.zeros(2)).top_logprobs == ((0, 0.0), (1, LOGPROB_FLOOR))
    plain = sampler(2, temperature=0).sample(np.zeros(2))
    assert plain.logprob is None and plain.top_logprobs == ()


# --------------------------------------------------------------------------------------------- StopMatcher


def stream(matcher: StopMatcher, deltas) -> tuple[list[str], bool]:
    out = []
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        out.append(text)
        if stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_inside_one_delta():
    assert stream(StopMatcher(["###"]), ["Hello", " world### and more"]) == (["Hello", " world"], True)


def test_stop_across_two_deltas_holds_back_only_the_possible_start():
    m = StopMatcher(["world"])
    assert m.feed("Hello wo") == ("Hello ", False)
    assert m.held == "wo"
    assert m.feed("rld! more") == ("", True)
    assert m.feed("anything") == ("", True)
    assert m.flush() == ""


def test_stop_across_three_deltas():
    assert stream(StopMatcher(["<end>"]), ["abc<e", "n", "d>tail"]) == (["abc", "", ""], True)
    assert stream(StopMatcher(["bcd"]), ["ab", "c", "de"]) == (["a", "", ""], True)


def test_several_stop_strings_first_to_complete_wins():
    assert stream(StopMatcher(["\n\n", "User:"]), ["Sure. User: hi\n\n"]) == (["Sure. "], True)
    assert stream(StopMatcher(["User:", "\n\n"]), ["Sure.\n", "\nUser:"]) == (["Sure.", ""], True)
    # "bc" completes before "abcd" could, however the text is split
    assert stream(StopMatcher(["abcd", "bc"]), ["abcd"]) == (["a"], True)
    assert stream(StopMatcher(["abcd", "bc"]), ["ab", "cd"]) == (["", "a"], True)


def test_partial_prefix_that_is_not_a_stop_is_emitted():
    m = StopMatcher(["</s>"])
    assert m.feed("a<") == ("a", False)
    assert m.feed("/") == ("", False)
    assert m.held == "</"
    assert m.feed("x y") == ("</x y", False)
    assert m.held == ""
    m = StopMatcher(["aab"])
    assert [m.feed(d) for d in ("a", "a", "a", "b")] == [("", False), ("", False), ("a", False), ("", True)]


def test_holds_the_longest_prefix_match_across_stop_strings():
    m = StopMatcher(["xyz", "yzzz"])
    assert m.feed("ayz") == ("a", False)  # "yz" could start "yzzz"; the shorter "z" starts nothing
    assert m.feed("z") == ("", False)
    assert m.feed("q") == ("yzzq", False)


def test_no_stop_gives_the_full_text_after_flush():
    deltas = ["The ", "cat <", "/sat", "> on the mat <"]
    out, stopped = stream(StopMatcher(["</s>"]), deltas)
    assert not stopped and "".join(out) == "".join(deltas)
    assert out[-1] == "<"  # only the trailing possible start was held until the end
    assert stream(StopMatcher([]), ["a", "b"]) == (["a", "b", ""], False)


def test_stop_matching_does_not_depend_on_how_the_text_is_split():
    chooser = random.Random(0)
    stops = ["ab", "bba", "abab", "c"]
    for _ in range(300):
        text = "".join(chooser.choice("abcx") for _ in range(chooser.randint(0, 20)))
        found = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
        expected = text[: min(found)[1]] if found else text
        cuts = sorted(chooser.sample(range(1, len(text) + 1), min(len(text), chooser.randint(0, 6))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        out, stopped = stream(StopMatcher(stops), deltas)
        assert "".join(out) == expected and stopped == bool(found), (text, deltas)


# ---------------------------------------------------------------------------------------------- validation


def test_from_request_normalises_a_valid_body():
    p = SamplingParams.from_request(
        {"model": "x", "temperature": 0, "top_p": 0.5, "logit_bias": {"12": 5, "3": -100}, "seed": 7, "n": 2,
         "stop": "END", "max_completion_tokens": 16, "logprobs": True, "top_logprobs": 5, "presence_penalty": None},
        vocab_size=100,
    )
    assert p.greedy and p.temperature == 0.0 and isinstance(p.temperature, float)
    assert dict(p.logit_bias) == {12: 5.0, 3: -100.0}
    assert p.stop == ("END",) and p.max_tokens == 16 and p.n == 2 and p.seed == 7
    assert p.presence_penalty == 0.0 and p.top_logprobs == 5
    defaults = SamplingParams.from_request({})
    assert defaults == SamplingParams() and defaults.temperature == 1.0 and defaults.top_p == 1.0
    assert defaults.stop == () and defaults.max_tokens is None and defaults.seed is None
    assert SamplingParams.from_request({"stop": ["a", "b"], "max_tokens": 3}).stop == ("a", "b")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {"1.5": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 100.5}}, "logit_bias"),
        ({"logit_bias": {"5": "1"}}, "logit_bias"),
        ({"logit_bias": {"1000": 1}}, "logit_bias"),  # vocab_size is 1000: ids 0..999
        ({"seed": "1"}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_completion_tokens": 0, "max_tokens": 6}, "max_completion_tokens"),
        ({"n": 0}, "n"),
        ({"n": 1.5}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a", 1]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
    ],
)
def test_invalid_parameters_name_the_field(body, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_request(body, vocab_size=1000)
    assert info.value.param == param
    assert info.value.status == 400
    assert param in info.value.message
    assert info.value.to_dict()["error"]["param"] == param


def test_direct_construction_and_vocab_checks_validate_too():
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(temperature=3)
    assert info.value.param == "temperature"
    params = SamplingParams(logit_bias={"7": 1.0})
    assert params.validate(8) is params
    with pytest.raises(InvalidRequestError) as info:
        params.validate(7)
    assert info.value.param == "logit_bias"
    with pytest.raises(InvalidRequestError) as info:
        ChoiceSampler(params, 5)
    assert info.value.param == "logit_bias"
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_request({"logit_bias": {"0": -100, "1": -100}}, vocab_size=2)
    assert info.value.param == "logit_bias" and "every token" in info.value.message


def test_max_completion_tokens_wins_over_max_tokens():
    assert SamplingParams.from_request({"max_completion_tokens": 5, "max_tokens": 6}).max_tokens == 5
    assert SamplingParams.from_request({"max_tokens": 6}).max_tokens == 6
