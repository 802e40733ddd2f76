"""Constrained decoding: walks token by token over random logits with SmolVLM's real tokenizer must give compact
JSON that follows the schema; schemas llguidance cannot enforce are refused; the compile cache; the mask's cost."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from edgevlm.runtime.errors import EdgeVLMError, InvalidRequestError
from edgevlm.runtime.grammar import Grammars, parse_response_format

TOKENIZER = Path(__file__).parent / "fixtures" / "smolvlm-256m-instruct" / "tokenizer.json"
EOS = 49279
VOCAB = 49280
WIDTH = VOCAB + 64  # decoder logits wider than the tokenizer's vocabulary, as with padded embeddings
MAX_WALK = 400
INF = float("inf")

COLOR = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": -5, "maximum": 120},
        "label": {"type": "string", "maxLength": 12},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "count"],
    "additionalProperties": False,
}
POINTS = {
    "type": "object",
    "properties": {
        "points": {
            "type": "array", "minItems": 1, "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": 0, "maximum": 9},
                    "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "bb", "ccc"]}},
                },
                "required": ["x", "tags"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["points"],
    "additionalProperties": False,
}


def compile_format(grammars: Grammars, response_format):
    """What the server does with a request's response_format: its schema, then the compiled grammar."""
    schema = parse_response_format(response_format)
    return None if schema is None else grammars.compile(schema)


def schema_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER))


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    return Grammars(tokenizer, [EOS])


@pytest.fixture(scope="module")
def boost(tokenizer) -> np.ndarray:
    """+4 for tokens holding a closing character and no opening one: random logits then end strings and
    containers soon enough for a walk to finish, without choosing the text for it."""
    bonus = np.zeros(WIDTH, dtype=np.float32)
    for token in range(VOCAB):
        text = tokenizer.decode([token], skip_special_tokens=False)
        if any(c in text for c in '"}],') and not any(c in text for c in "{["):
            bonus[token] = 4.0
    return bonus


# ------------------------------------------------------------------------------------------------ checks by hand


def conforms(value, schema: dict) -> bool:
    """Just enough JSON Schema for this file's schemas."""
    if "enum" in schema and value not in schema["enum"]:
        return False
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict) and all(key in value for key in schema.get("required", ()))
                and (schema.get("additionalProperties", True) is not False or set(value) <= set(props))
                and all(conforms(v, props[k]) for k, v in value.items() if k in props))
    if kind == "array":
        return (isinstance(value, list) and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9)
                and all(conforms(item, schema.get("items", {})) for item in value))
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)
                and schema.get("minimum", -INF) <= value <= schema.get("maximum", INF))
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", 10**9)
    if kind == "boolean":
        return isinstance(value, bool)
    return kind is None


def whitespace_outside_strings(text: str) -> bool:
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char.isspace():
            return True
    return False


# -------------------------------------------------------------------------------------------------------- walks


def walk(state, rng: np.random.Generator, boost: np.ndarray, *, sampled: bool, costs: list | None = None):
    """Decode like the server would: mask, pick (argmax or a softmax draw), advance, until finished or EOS."""
    tokens = []
    for _ in range(MAX_WALK):
        if state.is_finished():
            return tokens
        logits = rng.standard_normal(WIDTH, dtype=np.float32) + boost
        start = time.perf_counter()
        state.apply(logits)
        if costs is not None:
            costs.append(time.perf_counter() - start)
        assert np.all(logits[VOCAB:] == -np.inf)
        assert (logits[EOS] > -np.inf) == state.is_accepting()  # EOS exactly where the grammar accepts
        if sampled:
            probs = np.exp((logits - logits.max()) * 2)  # temperature 0.5: at 1 the ~48k unboosted tokens win
            token = int(rng.choice(WIDTH, p=probs / probs.sum()))
        else:
            token = int(np.argmax(logits))
        assert logits[token] > -np.inf
        state.advance(token)
        if token == EOS:
            return tokens
        tokens.append(token)
    pytest.fail(f"no end after {MAX_WALK} tokens")


CASES = [("json_object", {"type": "json_object"}, {"type": "object"}),
         ("enum+bounds", schema_format(COLOR), COLOR),
         ("nested arrays", schema_format(POINTS, strict=False), POINTS)]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("name,response_format,schema", CASES, ids=[case[0] for case in CASES])
def test_walks_give_compact_valid_json(grammars, tokenizer, boost, name, response_format, schema, sampled):
    grammar = compile_format(grammars, response_format)
    texts = set()
    for seed in range(6):
        tokens = walk(grammar.start(), np.random.default_rng([seed, sampled]), boost, sampled=sampled)
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        value = json.loads(text)
        assert conforms(value, schema), text
        assert not whitespace_outside_strings(text), text
        texts.add(text)
    assert len(texts) > 1  # the walks really depend on the logits


def test_eos_only_where_the_grammar_accepts(grammars, tokenizer):
    state = compile_format(grammars, schema_format({"type": "integer", "minimum": 0, "maximum": 99})).start()
    logits = np.zeros(VOCAB, dtype=np.float32)
    state.apply(logits)
    assert logits[EOS] == -np.inf and not state.is_accepting()
    state.advance(tokenizer.token_to_id("4"))
    logits[:] = 0
    state.apply(logits)
    assert state.is_accepting() and not state.is_finished() and logits[EOS] == 0  # "4" may go on to "42"
    state.advance(tokenizer.token_to_id("2"))
    assert state.is_finished()  # 42: a third digit would pass 99, so only EOS is left
    state.advance(EOS)


def test_forced_tokens_clone_and_rejected_tokens(grammars, tokenizer):
    state = compile_format(grammars, schema_format(COLOR)).start()
    forced = state.forced_tokens()
    assert forced and '{"color":"'.startswith(tokenizer.decode(forced))
    twin = state.clone()
    for token in forced:
        state.advance(token)
    assert twin.forced_tokens() == forced  # the clone did not move
    with pytest.raises(EdgeVLMError):
        twin.advance(tokenizer.token_to_id("["))  # not allowed here: the matcher errs, we raise


def test_text_and_malformed_response_formats(grammars):
    assert compile_format(grammars, {"type": "text"}) is None
    assert parse_response_format(None) is None
    for bad in ("json", {"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": {}}},
                {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
                {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}},
                {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}):
        with pytest.raises(InvalidRequestError) as info:
            compile_format(grammars, bad)
        assert info.value.param == "response_format"


@pytest.mark.parametrize("schema,keyword", [
    ({"type": 5}, "type"),
    ({"type": "object", "properties": {"a": {"if": {"type": "string"}, "then": {"minLength": 1}}}}, "if"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"oneOf": [{"type": "string"}, {"type": "string", "minLength": 1}]}, "oneOf"),
    ({"type": "string", "format": "colour"}, "colour"),
    ({"$ref": "#/$defs/missing"}, "missing"),
    ({"type": "object", "x-guidance": {"lenient": True}}, "x-guidance"),  # would make llguidance ignore keywords
], ids=["invalid", "if-then", "uniqueItems", "oneOf", "format", "ref", "x-guidance"])
def test_unenforceable_schemas_are_refused(grammars, schema, keyword):
    with pytest.raises(InvalidRequestError) as info:
        compile_format(grammars, schema_format(schema, strict=False))
    assert info.value.param == "response_format"
    assert keyword in info.value.message


def test_compile_cache(tokenizer):
    grammars = Grammars(tokenizer, [EOS], cache_size=2)
    first = compile_format(grammars, schema_format(COLOR))
    same = {"type": "json_schema", "json_schema": {"name": "other", "schema": json.loads(json.dumps(COLOR))}}
    assert compile_format(grammars, same) is first  # a copy of the schema, another name, no strict: the same grammar
    assert grammars.compiles == 1
    compile_format(grammars, schema_format(POINTS))
    compile_format(grammars, {"type": "json_object"})  # evicts COLOR, the least recently used
    assert grammars.compiles == 3
    assert compile_format(grammars, schema_format(COLOR)) is not first and grammars.compiles == 4


def test_keys_come_in_the_schema_order(grammars, tokenizer, boost):
    """Key order is not canonicalised away by the cache: each order gets its own grammar and is followed."""
    reordered = dict(COLOR, properties=dict(reversed(list(COLOR["properties"].items()))))
    for schema in (COLOR, reordered):
        state = compile_format(grammars, schema_format(schema)).start()
        text = tokenizer.decode(walk(state, np.random.default_rng(7), boost, sampled=False))
        order = [key for key in schema["properties"] if key in json.loads(text)]
        assert list(json.loads(text)) == order, text


def test_mask_cost(grammars, boost):
    """Printed, not asserted (this machine's load varies): mask fill + apply per token, 49,280 tokens."""
    costs: list[float] = []
    for seed in range(4):
        for response_format in ({"type": "json_object"}, schema_format(POINTS)):
            walk(compile_format(grammars, response_format).start(), np.random.default_rng(seed), boost, sampled=False,
                 costs=costs)
    ms = np.array(costs) * 1e3
    print(f"\nmask+apply per token over {ms.size} tokens: median {np.median(ms):.3f} ms, "
          f"p99 {np.percentile(ms, 99):.3f} ms, max {ms.max():.3f} ms")
