"""response_format json_object / json_schema through the real server and the openai client, on the tiny
random-weight model: whatever the weights, the answer is valid JSON that follows the schema (closed schemas:
enums, bounded integers, no additional properties), compact, and complete unless max_tokens cuts it."""

from __future__ import annotations

import enum
import json
import re

import numpy as np
import openai
import pydantic
import pytest

from edgevlm.runtime.grammar import parse_response_format
from edgevlm.runtime.sampling import SamplingParams
from edgevlm.runtime.vlm import VisionLanguageModel
from test_server import image_messages

COMPACT = re.compile(r'^(?:[^"\s]|"(?:[^"\\]|\\.)*(?:"|$))*$')  # no whitespace outside strings (the last may be cut)


class Shape(str, enum.Enum):
    circle = "circle"
    square = "square"
    triangle = "triangle"


class Answer(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    shape: Shape
    count: int = pydantic.Field(ge=1, le=3)
    color: str = pydantic.Field(json_schema_extra={"enum": ["red", "green", "blue"]})


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)


def check_answer(text: str) -> Answer:
    assert COMPACT.match(text), text
    answer = Answer.model_validate_json(text)
    assert set(json.loads(text)) == {"shape", "count", "color"}
    return answer


def test_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(model="m", messages=image_messages("What is it?"), temperature=0,
                                               max_tokens=64, response_format=Answer)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Answer)
    check_answer(choice.message.content)


def test_json_object_is_one_compact_object(client):
    response = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "JSON please"}],
                                              temperature=0, max_tokens=200, response_format={"type": "json_object"})
    choice = response.choices[0]
    if choice.finish_reason == "stop":  # random weights may write one long string: then "length", cut JSON
        assert isinstance(json.loads(choice.message.content), dict)
    assert choice.message.content.startswith("{") and COMPACT.match(choice.message.content)


def test_sampling_streaming_n_and_logprobs_inside_the_schema(client):
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True,
                                                     "schema": Answer.model_json_schema()}}
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], temperature=1.0, seed=5, n=3, max_tokens=64,
        stream=True, response_format=schema, logprobs=True, top_logprobs=3)
    texts, finishes, logprobs = {}, {}, []
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
            if choice.logprobs and choice.logprobs.content:
                logprobs.extend(choice.logprobs.content)
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    answers = [check_answer(texts[i]) for i in range(3)]
    assert len({a.model_dump_json() for a in answers}) >= 2  # seeded sampling, three independent choices
    # Logprobs describe the constrained distribution: what the grammar forbids is never among the top ones.
    assert all(np.isfinite(e.logprob) and all(np.isfinite(t.logprob) for t in e.top_logprobs) for e in logprobs)


def test_stop_strings_and_max_tokens_still_apply(client):
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": Answer.model_json_schema()}}
    stopped = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                             temperature=0, max_tokens=64, stop=[","], response_format=schema)
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content.startswith('{"shape":')
    assert "," not in stopped.choices[0].message.content
    cut = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0,
                                         max_tokens=3, response_format=schema)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3


@pytest.mark.parametrize("schema, fragment", [
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
    ({"type": 5}, "type"),
])
def test_a_schema_the_grammar_cannot_enforce_is_a_400(client, schema, fragment):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "s", "schema": schema}})
    error = info.value.body
    assert error["param"] == "response_format" and fragment in error["message"]


def test_a_complete_grammar_ends_the_choice_without_another_decoder_step(tiny_package):
    vlm = VisionLanguageModel.load(tiny_package)
    runs = []
    run = vlm.scheduler.slab.run
    vlm.scheduler.slab.run = lambda *a, **k: runs.append(1) or run(*a, **k)
    schema = parse_response_format({"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {"a": {"enum": ["x"]}}, "required": ["a"], "additionalProperties": False}}})
    steps = list(vlm.generate(vlm.prepare([{"role": "user", "content": "hi"}]), SamplingParams(temperature=0),
                              max_tokens=50, schema=schema))
    assert "".join(s.text for s in steps) == '{"a":"x"}' and steps[-1].finish_reason == "stop"
    assert steps[-1].token not in vlm.eos_token_ids  # the closing brace itself ended it, not an EOS
    assert len(runs) == len(steps)  # the prefill, then one decoder run per token but the last
    compiles = vlm.grammars.compiles
    list(vlm.generate(vlm.prepare([{"role": "user", "content": "again"}]), SamplingParams(temperature=0),
                      max_tokens=50, schema=dict(schema)))
    assert vlm.grammars.compiles == compiles  # the same schema again costs no compile
