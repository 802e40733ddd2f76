"""LangChain's ChatOpenAI against the real server: structured output by json_schema and bound tools, on the tiny
random-weight model (closed schemas — strict tools have no additional properties — so the answers come back
valid and complete whatever the weights)."""

from __future__ import annotations

import os
from typing import Literal

import pydantic
import pytest

os.environ["LANGSMITH_TRACING"] = os.environ["LANGCHAIN_TRACING_V2"] = "false"  # never online

from langchain_core.tools import tool  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402


class Answer(pydantic.BaseModel):
    shape: Literal["circle", "square", "triangle"]
    count: int = pydantic.Field(ge=1, le=3)


@tool
def get_weather(city: Literal["Paris", "Oslo"], unit: Literal["C", "F"]) -> str:
    """The weather in a city."""
    return f"18 {unit} in {city}"


@pytest.fixture(scope="module")
def llm(server):
    return ChatOpenAI(base_url=server.base_url, api_key="x", model="m", temperature=0, max_tokens=64, max_retries=0)


@pytest.mark.parametrize("strict", [True, None])
def test_with_structured_output_json_schema(llm, strict):
    structured = llm.with_structured_output(Answer, method="json_schema", strict=strict, include_raw=True)
    result = structured.invoke("What shape is it, and how many?")
    assert isinstance(result["parsed"], Answer) and result["parsing_error"] is None
    assert result["raw"].response_metadata["finish_reason"] == "stop"


@pytest.mark.parametrize("tool_choice", ["get_weather", "required", "any"])
def test_bind_tools_with_tool_choice(llm, tool_choice):
    bound = llm.bind_tools([get_weather], tool_choice=tool_choice, parallel_tool_calls=False, strict=True)
    message = bound.invoke("What is the weather in Paris?")
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert len(message.tool_calls) == 1 and not message.invalid_tool_calls
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert get_weather.invoke(call["args"]).startswith("18 ")  # arguments the tool itself accepts


def test_bound_tools_stream(llm):
    bound = llm.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False, strict=True)
    chunks = list(bound.stream("Weather in Oslo?"))
    message = chunks[0]
    for chunk in chunks[1:]:
        message = message + chunk
    assert len(message.tool_calls) == 1 and message.tool_calls[0]["name"] == "get_weather"
    assert set(message.tool_calls[0]["args"]) == {"city", "unit"}
