"""Token sampling in numpy: request parameters, logit processing, and stop strings.

Built like mlx-lm's ``sample_utils`` / gpt-fast: small functions that each do one step on a 1-D logits vector, and
a per-choice sampler made from plain parameters that chains them. The order is OpenAI's:

    logits ─► + logit_bias ─► − penalties ─► / temperature ─► top_p nucleus ─► draw one token
               (−100 bans)    (completion      (0: argmax,     (skipped at 1)
                               counts only)     nothing else)

Conventions the engine and server rely on:

* All processing is on a float64 copy of the model's logits; the caller's array is never modified.
* ``logit_bias`` of exactly −100 is a ban: the token's logit becomes −inf and it can never be drawn (OpenAI documents
  −100 as "should result in a ban"); other values are added as they are, so +100 all but forces a token.
* Penalties count tokens of the completion only, per choice, and only tokens passed through
  :meth:`ChoiceSampler.sample` (or :meth:`ChoiceSampler.record`); prompt tokens never count.
* Reported logprobs are the log-softmax of the logits after bias and penalties at temperature 1, before top_p, so
  they describe the model (as steered by the request) rather than the sampling temperature, like OpenAI's. They can
  be −inf for a banned token; :data:`LOGPROB_FLOOR` is what :class:`Sample` reports in its place (JSON has no −inf).
* With a seed, choice ``i`` draws from ``np.random.default_rng([seed mod 2**64, i])``: the same request and the same
  logits give the same tokens, and the ``n`` choices differ from one another. Without a seed each choice gets fresh
  OS entropy. Greedy decoding (temperature 0) never touches the generator.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from .errors import EdgeVLMError, InvalidRequestError

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
MAX_N = 128  # OpenAI's own limit for `n`
LOGPROB_FLOOR = -9999.0  # reported in place of -inf (OpenAI reports -9999.0 for impossible tokens)
BAN_BIAS = -100.0
# Cumulative probabilities are sums of thousands of float64 terms; a nucleus that reaches top_p up to this much
# counts as reaching it, so a hand-computed boundary (0.5 + 0.25 == 0.75) behaves as written.
TOP_P_TOLERANCE = 1e-9

_TOKEN_ID = re.compile(r"[0-9]{1,12}")


# --------------------------------------------------------------------------------------------------- parameters


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise InvalidRequestError(f"Invalid '{name}': expected a number, got {value!r}", param=name)
    if value > high or value < low or (low_open and value == low):
        bound = f"greater than {low}" if low_open else f"at least {low}"
        raise InvalidRequestError(
            f"Invalid '{name}': {value!r} is out of range; expected a number {bound} and at most {high}", param=name
        )
    return float(value)


def _integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(f"Invalid '{name}': expected an integer, got {value!r}", param=name)
    if value < low or (high is not None and value > high):
        limit = f"at least {low}" if high is None else f"between {low} and {high}"
        raise InvalidRequestError(f"Invalid '{name}': {value} is out of range; expected an integer {limit}", param=name)
    return value


def _logit_bias(value: Any) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRequestError(
            f"Invalid 'logit_bias': expected an object mapping token ids to numbers, got {type(value).__name__}",
            param="logit_bias",
        )
    bias: dict[int, float] = {}
    for key, amount in value.items():
        if isinstance(key, str) and _TOKEN_ID.fullmatch(key):
            token = int(key)
        elif isinstance(key, int) and not isinstance(key, bool) and key >= 0:
            token = key
        else:
            raise InvalidRequestError(
                f"Invalid 'logit_bias': key {key!r} is not a token id (a non-negative integer)", param="logit_bias"
            )
        if not _is_number(amount) or not math.isfinite(amount) or not -100 <= amount <= 100:
            raise InvalidRequestError(
                f"Invalid 'logit_bias': the bias for token {token} must be a number from -100 to 100, got {amount!r}",
                param="logit_bias",
            )
        bias[token] = float(amount)
    return bias


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)):
        raise InvalidRequestError(
            f"Invalid 'stop': expected a string or a list of strings, got {type(value).__name__}", param="stop"
        )
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequestError(
            f"Invalid 'stop': at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}", param="stop"
        )
    for stop in stops:
        if not isinstance(stop, str) or not stop:
            raise InvalidRequestError(f"Invalid 'stop': every stop sequence must be a non-empty string, got {stop!r}",
                                      param="stop")
    return tuple(dict.fromkeys(stops))  # duplicates change nothing; keep the first of each


@dataclass(frozen=True)
class SamplingParams:
    """The sampling fields of a Chat Completions request, checked and normalised.

    Constructing one validates everything that does not depend on the model; :meth:`validate` with the vocabulary
    size also checks the logit_bias token ids. ``from_request`` does both from a parsed JSON body.
    Normalisation: ``logit_bias`` becomes a read-only ``{int id: float}`` mapping, ``stop`` a tuple of strings,
    numbers become ``float``/``int``.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("temperature", _number("temperature", self.temperature, 0.0, 2.0))
        put("top_p", _number("top_p", self.top_p, 0.0, 1.0, low_open=True))
        put("presence_penalty", _number("presence_penalty", self.presence_penalty, -2.0, 2.0))
        put("frequency_penalty", _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0))
        put("logit_bias", MappingProxyType(_logit_bias(self.logit_bias)))
        if self.seed is not None:
            put("seed", _integer("seed", self.seed, -(2**63), 2**63 - 1))
        if self.max_tokens is not None:
            put("max_tokens", _integer("max_tokens", self.max_tokens, 1))
        put("n", _integer("n", self.n, 1, MAX_N))
        put("stop", _stop(self.stop))
        if not isinstance(self.logprobs, bool):
            raise InvalidRequestError(f"Invalid 'logprobs': expected a boolean, got {self.logprobs!r}",
                                      param="logprobs")
        if self.top_logprobs is not None:
            _integer("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
            if not self.logprobs:
                raise InvalidRequestError("Invalid 'top_logprobs': 'logprobs' must be true to use 'top_logprobs'",
                                          param="top_logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Check what needs the model: every logit_bias id below ``vocab_size`` and not every token banned.

        ``vocab_size`` should be the width of the decoder's logits (which can exceed the tokenizer's vocabulary).
        Returns ``self`` so it chains.
        """
        if vocab_size is not None:
            bad = sorted(token for token in self.logit_bias if token >= vocab_size)
            if bad:
                raise InvalidRequestError(
                    f"Invalid 'logit_bias': token id {bad[0]} is out of range; this model's token ids are "
                    f"0 to {vocab_size - 1}",
                    param="logit_bias",
                )
            if sum(1 for amount in self.logit_bias.values() if amount == BAN_BIAS) >= vocab_size:
                raise InvalidRequestError("Invalid 'logit_bias': it bans every token of the vocabulary",
                                          param="logit_bias")
        return self

    @classmethod
    def from_request(cls, body: Mapping[str, Any], *, vocab_size: int | None = None,
                     defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """Read the sampling fields of a parsed Chat Completions body; absent or null fields take `defaults` (the
        model package's: temperature, top_p, penalties), then OpenAI's defaults.

        ``max_completion_tokens`` (OpenAI's newer name) is accepted as well as ``max_tokens`` and wins when both
        are given. Other fields of the body are ignored.
        """
        if not isinstance(body, Mapping):
            raise InvalidRequestError("the request body must be a JSON object")
        kwargs: dict[str, Any] = dict(defaults or {})
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "logit_bias", "seed", "n",
                     "stop", "logprobs", "top_logprobs"):
            if body.get(name) is not None:
                kwargs[name] = body[name]
        # max_completion_tokens is OpenAI's newer name for max_tokens; when both are given, it wins.
        limit_field = "max_tokens"
        if body.get("max_completion_tokens") is not None:
            kwargs["max_tokens"], limit_field = body["max_completion_tokens"], "max_completion_tokens"
        elif body.get("max_tokens") is not None:
            kwargs["max_tokens"] = body["max_tokens"]
        try:
            params = cls(**kwargs)
        except InvalidRequestError as exc:
            if exc.param == "max_tokens" and limit_field != "max_tokens":
                exc.param = limit_field
                exc.message = exc.message.replace("'max_tokens'", f"'{limit_field}'")
                exc.args = (exc.message,)
            raise
        return params.validate(vocab_size)


# ------------------------------------------------------------------------------------------ logits processing


def bias_arrays(logit_bias: Mapping[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """``{id: bias}`` → (ids int64, amounts float64), with −100 turned into −inf (a ban)."""
    ids = np.fromiter(logit_bias.keys(), dtype=np.int64, count=len(logit_bias))
    amounts = np.fromiter(logit_bias.values(), dtype=np.float64, count=len(logit_bias))
    amounts[amounts == BAN_BIAS] = -np.inf
    return ids, amounts


def apply_logit_bias(logits: np.ndarray, ids: np.ndarray, amounts: np.ndarray) -> np.ndarray:
    """Add ``amounts`` at ``ids`` in place (ids are unique, as dict keys are) and return ``logits``."""
    if ids.size:
        logits[ids] += amounts
    return logits


def apply_penalties(logits: np.ndarray, counts: np.ndarray, presence_penalty: float,
                    frequency_penalty: float) -> np.ndarray:
    """OpenAI's definition, in place: ``logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty``.

    ``counts[j]`` is how often token j was sampled so far in this completion. :class:`ChoiceSampler` keeps the
    same quantity incrementally; this dense form is the reference.
    """
    logits -= counts * frequency_penalty + (counts > 0) * presence_penalty
    return logits


def _max_logit(logits: np.ndarray) -> float:
    top = float(logits.max())
    if top == -math.inf:
        raise InvalidRequestError("no token is left to sample: logit_bias bans every token the model allows",
                                  param="logit_bias")
    if not math.isfinite(top):
        raise EdgeVLMError(f"the model produced non-finite logits ({top})")
    return top


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Stable float64 log-softmax of a 1-D vector; −inf logits stay −inf."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - _max_logit(x)
    return shifted - math.log(float(np.exp(shifted).sum()))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Stable float64 softmax of ``logits / temperature`` (temperature > 0)."""
    x = np.asarray(logits, dtype=np.float64)
    weights = np.exp((x - _max_logit(x)) / temperature)
    return weights / weights.sum()


def _ranked(values: np.ndarray, k: int) -> np.ndarray:
    """Ids of the ``k`` largest values, largest first, ties to the lower id; O(V) plus a sort of about k."""
    size = values.size
    k = min(k, size)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k * 8 >= size:
        return np.argsort(-values, kind="stable")[:k]
    kth = np.partition(values, size - k)[size - k]
    candidates = np.flatnonzero(values >= kth)  # every token tied with the k-th is in, so ties resolve by id
    return candidates[np.argsort(-values[candidates], kind="stable")][:k]


def top_p_ids(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The nucleus: ids of the smallest set of most probable tokens whose probabilities sum to ≥ ``top_p``.

    Most probable first; ties at the boundary go to the lower id; the top token is always kept. Looks at the top 64
    first and widens (×4) only while the candidates fall short of ``top_p``, so a peaked distribution costs O(V).
    """
    size = probs.size
    k = 64
    while True:
        order = _ranked(probs, k)
        cumulative = np.cumsum(probs[order])
        if cumulative[-1] >= top_p - TOP_P_TOLERANCE or order.size == size:
            cut = int(np.searchsorted(cumulative, top_p - TOP_P_TOLERANCE, side="left"))
            return order[: min(cut, order.size - 1) + 1]
        k *= 4


def categorical(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw an index with probability proportional to ``probs`` (≥ 0, not all 0), using one uniform draw."""
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if index >= probs.size:  # u * total rounded up to the total: take the last token that can be drawn
        index = int(np.flatnonzero(probs)[-1])
    return index


def top_logprobs(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` (≤ 20) most likely ids and their logprobs, most likely first, ties to the lower id."""
    ids = _ranked(logprobs, min(k, MAX_TOP_LOGPROBS))
    return ids, logprobs[ids]


# -------------------------------------------------------------------------------------------------- sampler


@dataclass(frozen=True)
class Sample:
    """One sampled token; ``logprob``/``top_logprobs`` only when the request asked for logprobs (else None / ())."""

    token: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


def make_rng(seed: int | None, index: int = 0) -> np.random.Generator:
    """Choice ``index``'s generator: a fixed stream per (seed, index), fresh OS entropy without a seed."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([seed % 2**64, index])


class ChoiceSampler:
    """The sampling state of one choice: its generator and the counts of the tokens it has produced.

    ``sample(logits)`` runs the whole chain on one step's logits (1-D, or any shape holding ``vocab_size`` values,
    e.g. ``logits[0, -1]``), records the token for the penalties and returns a :class:`Sample`. Per step it does a
    fixed amount of O(vocab) numpy work, whatever the completion's length: ``counts`` is a dict and the penalties
    a dense vector (allocated only when a penalty is non-zero), both updated in O(1) per token.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, index: int = 0):
        params.validate(vocab_size)
        self.params = params
        self.vocab_size = vocab_size
        self.index = index
        self.rng = make_rng(params.seed, index)
        self._bias_ids, self._bias_amounts = bias_arrays(params.logit_bias)
        self._penalize = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self.counts: dict[int, int] = {}  # token id → times produced in this completion
        self._penalty = np.zeros(vocab_size, dtype=np.float64) if self._penalize else None

    def record(self, token: int) -> None:
        """Count ``token`` as produced by this choice (``sample`` does this itself)."""
        token = int(token)
        count = self.counts[token] = self.counts.get(token, 0) + 1
        if self._penalty is not None:
            self._penalty[token] = count * self.params.frequency_penalty + self.params.presence_penalty

    def process(self, logits: np.ndarray) -> np.ndarray:
        """A float64 copy of ``logits`` with logit_bias added and the penalties subtracted."""
        x = np.array(logits, dtype=np.float64).reshape(-1)
        if x.size != self.vocab_size:
            raise ValueError(f"expected {self.vocab_size} logits, got {x.size}")
        apply_logit_bias(x, self._bias_ids, self._bias_amounts)
        if self._penalty is not None:
            x -= self._penalty
        return x

    def choose(self, processed: np.ndarray) -> int:
        """Pick a token from processed logits: argmax at temperature 0, else temperature → top_p → draw."""
        params = self.params
        if params.greedy:
            _max_logit(processed)
            return int(np.argmax(processed))
        probs = softmax(processed, params.temperature)
        if params.top_p < 1.0:
            ids = top_p_ids(probs, params.top_p)
            return int(ids[categorical(probs[ids], self.rng)])
        return categorical(probs, self.rng)

    def sample(self, logits: np.ndarray, constrain: Callable[[np.ndarray], None] | None = None) -> Sample:
        """`constrain` (a grammar's mask) sets the tokens it forbids to −inf on the processed logits, before
        temperature and top_p: sampling, seeds, penalties and logprobs all work inside it, and logprobs describe
        the constrained distribution."""
        processed = self.process(logits)
        if constrain is not None:
            constrain(processed)
        token = self.choose(processed)
        self.record(token)
        if not self.params.logprobs:
            return Sample(token)
        logprobs = log_softmax(processed)
        top: tuple[tuple[int, float], ...] = ()
        if self.params.top_logprobs:
            ids, values = top_logprobs(logprobs, self.params.top_logprobs)
            top = tuple((int(i), max(float(v), LOGPROB_FLOOR)) for i, v in zip(ids, values))
        return Sample(token, max(float(logprobs[token]), LOGPROB_FLOOR), top)

    __call__ = sample


def make_samplers(params: SamplingParams, vocab_size: int) -> list[ChoiceSampler]:
    """One sampler per choice, ``params.n`` of them, choice i seeded with (seed, i)."""
    return [ChoiceSampler(params, vocab_size, index) for index in range(params.n)]


# ------------------------------------------------------------------------------------------------ stop strings


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back as little as possible.

    ``feed(delta)`` returns ``(text, stopped)``: ``text`` is safe to send now; once ``stopped`` is True the
    completion ends (finish_reason "stop"), the stop string itself is never emitted, and later feeds return
    ``("", True)``. Held back is only the longest suffix of the text so far that is a proper prefix of some stop
    string, i.e. exactly the text that could still turn out to be the start of one. Call ``flush()`` when the
    completion ends for another reason to get the held text.

    The completion stops where a stop string first *ends*; if several end there, the longest one is cut. This
    does not depend on how the text was split into deltas.
    """

    def __init__(self, stops: Sequence[str] = ()):
        if isinstance(stops, str):
            stops = (stops,)
        self.stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        text = self._held + delta
        best: tuple[int, int] | None = None  # (end, start) of the earliest-ending match
        for stop in self.stops:
            start = text.find(stop)
            if start >= 0:
                candidate = (start + len(stop), start)
                if best is None or candidate < best:
                    best = candidate
        if best is not None:
            self.stopped = True
            self._held = ""
            return text[: best[1]], True
        hold = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:length]):
                    hold = length
                    break
        self._held = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold], False

    @property
    def held(self) -> str:
        """The text held back right now."""
        return self._held

    def flush(self) -> str:
        """The held-back text, released (empty after a stop)."""
        text, self._held = self._held, ""
        return "" if self.stopped else text
