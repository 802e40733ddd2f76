"""tools / tool_choice in the generic format, through the real server and the openai client, on the tiny
random-weight model: whatever the weights, a call names one of the tools and its arguments follow that tool's
schema (closed schemas: enums, bounded integers, no additional properties), in OpenAI's exact shapes."""

from __future__ import annotations

import json

import openai
import pytest

from edgevlm.runtime.tools import parse_tools, render_conversation
from test_server import raw, sse_events

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["C", "F"]}}}}}
COUNT = {"type": "function", "function": {
    "name": "count_shapes", "parameters": {"type": "object", "additionalProperties": False, "required": ["n"],
                                           "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 3}}}}}
TOOLS = [WEATHER, COUNT]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)


def check_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert arguments["city"] in ("Paris", "Oslo", "Lima") and arguments["unit"] in ("C", "F")
        assert set(arguments) == {"city", "unit"}
    else:
        assert call.function.name == "count_shapes" and set(arguments) == {"n"} and 1 <= arguments["n"] <= 3
    return arguments


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "count_shapes"}}])
def test_calls_come_back_valid_in_openais_shape(client, tool_choice):
    response = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                                              parallel_tool_calls=False, temperature=0, max_tokens=100)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0])
    if isinstance(tool_choice, dict):
        assert choice.message.tool_calls[0].function.name == "count_shapes"


def test_auto_answers_with_calls_or_text_never_the_wrapper(client):
    for seed in range(4):
        choice = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, temperature=1.0, seed=seed,
                                                parallel_tool_calls=False, max_tokens=40).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            check_call(choice.message.tool_calls[0])
        else:
            assert choice.finish_reason in ("stop", "length")
            assert '{"response"' not in choice.message.content and '"tool_calls"' not in choice.message.content


def test_streaming_with_the_openai_stream_helper(client):
    with client.chat.completions.stream(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=False, temperature=0, max_tokens=100) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    check_call(choice.message.tool_calls[0])


def test_streamed_tool_call_deltas_on_the_wire(server):
    status, _, payload = raw(server, "POST", "/v1/chat/completions", {
        "messages": ASK, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "stream": True,
        "temperature": 0, "max_tokens": 100})
    assert status == 200
    chunks = [json.loads(e) for e in sse_events(payload)[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    first = calls[0]
    assert set(first) == {"index", "id", "type", "function"} and first["index"] == 0
    assert first["type"] == "function" and first["function"]["arguments"] == ""
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls[1:])
    arguments = "".join(c["function"]["arguments"] for c in calls)
    assert json.loads(arguments)  # the fragments make the arguments exactly
    assert not any(d.get("content") for d in deltas)  # the wrapper JSON never reaches the client
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_conversation_goes_on_after_a_tool_result(client):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    response = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, max_tokens=20,
                                              temperature=0)
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
    rendered = render_conversation(parse_tools(TOOLS, None, None), messages)
    assert rendered[0]["role"] == "system" and "get_weather" in rendered[0]["content"]
    assert rendered[2] == {"role": "assistant",
                           "content": '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris","unit":"C"}}]}'}
    assert rendered[3] == {"role": "user", "content":
                           '{"tool_response":{"tool_call_id":"call_1","content":"18 degrees and sunny"}}'}


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
])
def test_tool_mistakes_are_400s(server, body, param):
    status, _, payload = raw(server, "POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 2, **body})
    assert status == 400
    error = json.loads(payload)["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
