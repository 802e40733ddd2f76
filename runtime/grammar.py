"""Constrained decoding for OpenAI's ``response_format``: a token mask per step from a JSON Schema, via llguidance.

    response_format ─► parse_response_format ─► schema ─► Grammars.compile ─► Grammar (cached, shared)
                    ─► .start() ─► GrammarState (one per choice)
    each step:  state.apply(logits)  ─► sample ─►  state.advance(token)  ─► state.is_finished()? ─► stop

Conventions the decode loop relies on:

* The JSON is compact: no whitespace outside strings, "," and ":" as separators. With flexible whitespace small
  models emit endless spaces and newlines in JSON mode; compact JSON also costs fewer tokens.
* Every keyword llguidance cannot enforce is refused (400, param "response_format"), never ignored: an answer that
  claims to follow a schema must follow all of it. llguidance's ``x-guidance`` options key is refused too, so a
  request cannot loosen these rules (its ``lenient`` would turn unenforced keywords into warnings).
* EOS is allowed only where the grammar accepts; when the grammar is finished (nothing but EOS can follow) the
  caller ends the choice with finish_reason "stop" at once, without another decoder step.
* Properties come in the order the schema lists them (llguidance's choice; JSON objects are unordered anyway).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from .errors import EdgeVLMError, InvalidRequestError

if TYPE_CHECKING:
    import llguidance

CACHE_SIZE = 64  # compiled grammars kept per model; one costs ~1 ms to build and a few hundred kB
# Applied after the schema's own options (defaults → schema["x-guidance"] → overrides), so these always hold.
JSON_OPTIONS = {"item_separator": ",", "key_separator": ":", "whitespace_flexible": False, "lenient": False,
                "coerce_one_of": False}
ANY_OBJECT = {"type": "object"}
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name


def _invalid(message: str) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid 'response_format': {message}", param="response_format")


def parse_response_format(response_format: Any) -> dict | None:
    """The JSON Schema a ``response_format`` asks for (``{"type": "object"}`` for json_object), None for text."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise _invalid(f"expected an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(ANY_OBJECT)
    if kind != "json_schema":
        raise _invalid(f"'type' must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise _invalid("'json_schema' must be an object with 'name' and 'schema'")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _invalid(f"'json_schema.name' must be 1 to 64 letters, digits, '_' or '-', got {name!r}")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise _invalid(f"'json_schema.strict' must be a boolean, got {spec['strict']!r}")
    schema = spec.get("schema")
    if not isinstance(schema, Mapping):
        raise _invalid(f"'json_schema.schema' must be a JSON Schema object, got {type(schema).__name__}")
    if "x-guidance" in schema:
        raise _invalid("the JSON schema keyword 'x-guidance' is not supported")
    return dict(schema)  # strict or not, the schema is enforced: a weaker promise would still be broken otherwise


class Grammar:
    """One compiled schema: a matcher in its start state that every request using the schema copies."""

    def __init__(self, key: str, matcher: llguidance.LLMatcher, vocab_size: int, eos_token_ids: Sequence[int]):
        self.key = key
        self._matcher = matcher  # never advanced: deep_copy of it is the start state (~10 µs, vs ~1 ms to build)
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)

    def start(self) -> GrammarState:
        return GrammarState(self, self._matcher.deep_copy())


class GrammarState:
    """Where one choice is in its grammar. Not thread-safe: one per choice, used by one decode loop."""

    def __init__(self, grammar: Grammar, matcher: llguidance.LLMatcher):
        self.grammar = grammar
        self._matcher = matcher
        import llguidance.numpy as llg_numpy

        self._llg_numpy = llg_numpy
        self._bitmask = llg_numpy.allocate_token_bitmask(1, grammar.vocab_size)

    def clone(self) -> GrammarState:
        """An independent copy in the same state (for the n choices of one request)."""
        return GrammarState(self.grammar, self._matcher.deep_copy())

    def _check(self) -> None:
        if self._matcher.is_error():  # a rejected token or a resource limit; llguidance never raises for these
            raise EdgeVLMError(f"constrained decoding failed: {self._matcher.get_error()}")

    def apply(self, logits: np.ndarray) -> None:
        """Set every token the grammar does not allow next to −inf, in place, on a 1-D logits vector.

        The logits may be wider than the tokenizer's vocabulary (padded embeddings): the extra ids are never allowed.
        """
        if logits.ndim != 1:
            raise ValueError(f"expected a 1-D logits vector, got shape {logits.shape}")
        self._llg_numpy.fill_next_token_bitmask(self._matcher, self._bitmask)
        self._check()
        vocab = min(self.grammar.vocab_size, logits.shape[-1])
        # One bit per token, bit b of int32 word w is token 32w+b: on a little-endian host that is the bytes'
        # little-endian bit order, so unpackbits gives one 0/1 per token without a loop (~11 µs for 49k tokens).
        allowed = np.unpackbits(self._bitmask.view(np.uint8), count=vocab, bitorder="little").view(bool)
        np.copyto(logits[:vocab], -np.inf, where=~allowed)
        logits[vocab:] = -np.inf

    def advance(self, token: int) -> None:
        """Consume the sampled token (EOS included, where the grammar accepts)."""
        if not self._matcher.consume_token(int(token)):
            self._check()
            raise EdgeVLMError(f"constrained decoding failed: the grammar rejected token {int(token)}")

    def is_accepting(self) -> bool:
        """The text so far is a complete answer: EOS is allowed now."""
        return self._matcher.is_accepting()

    def is_finished(self) -> bool:
        """Nothing but EOS can follow: end the choice ("stop") without another decoder step."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next whatever the model says (may be empty), for a fast-forward."""
        return list(self._matcher.compute_ff_tokens())


class Grammars:
    """The grammar compiler of one model, with an LRU cache of compiled schemas. Thread-safe.

    Building the llguidance tokenizer (a token trie) costs ~0.3-1 s: do it once per model, not per request.
    """

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: Sequence[int], *, cache_size: int = CACHE_SIZE):
        # llguidance is imported here, not with the module: the server builds this after it reports ready, and
        # its import is ~40 ms of a start.
        import llguidance

        self._llguidance = llguidance
        # A copy without padding or truncation: llguidance re-tokenizes text with it (as its own hf.py does).
        plain = Tokenizer.from_str(tokenizer.to_str())
        plain.no_padding()
        plain.no_truncation()
        self.eos_token_ids = tuple(int(token) for token in eos_token_ids)
        self.tokenizer = llguidance.LLTokenizer(plain.to_str(), eos_token=list(self.eos_token_ids))
        self.vocab_size = self.tokenizer.vocab_size
        self.cache_size = cache_size
        self.compiles = 0  # grammars built (cache misses), for tests and metrics
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, schema: Mapping) -> Grammar:
        """The grammar of a JSON Schema (from `parse_response_format`), compiled once and cached."""
        # Not sort_keys: the order of "properties" is the order the answer's keys come in (as with OpenAI), and
        # clients rely on it (a "reasoning" key before the "answer"); schemas that differ only in order are two.
        key = json.dumps(schema, separators=(",", ":"))
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                return grammar
        grammar = self._build(key, schema)  # outside the lock: a large schema must not hold up the others
        with self._lock:
            self._cache[key] = grammar
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _build(self, key: str, schema: dict) -> Grammar:
        self.compiles += 1
        try:
            source = self._llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as exc:
            raise _invalid(f"the JSON schema cannot be used: {exc}") from None
        # Building the matcher validates the schema against the tokenizer (the same checks as
        # validate_grammar_with_warnings, without building it twice); errors name the keyword
        # ('Unimplemented keys: ["if", "then"]'). log_level 0: errors are reported here, not on stderr.
        matcher = self._llguidance.LLMatcher(self.tokenizer, source, log_level=0)
        if matcher.is_error():
            raise _invalid(f"the JSON schema cannot be enforced: {matcher.get_error()}")
        warnings = matcher.get_grammar_warnings()
        if warnings:  # a warning is a part of the schema that would not be enforced: refuse it as well
            raise _invalid(f"the JSON schema cannot be enforced: {'; '.join(warnings)}")
        return Grammar(key, matcher, self.vocab_size, self.eos_token_ids)
