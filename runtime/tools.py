"""OpenAI `tools` / `tool_choice` in a generic format that any model can follow, enforced by the grammar.

SmolVLM's chat template has no tool syntax, so tools are described in a system message and the whole answer is
constrained (runtime/grammar.py) to one compact JSON object, llama.cpp's "generic" format:

    {"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}     a list of calls (tool_choice
                                                                             auto, required or a named function)
    {"response":"It is sunny."}                                              a plain answer (auto only)

Each call's `name` is one of the tools (`const`) and its `arguments` follow that tool's `parameters` schema, so a
call is valid by construction whatever the model's size. `toolcalls.GenericOutput` turns the generated text back
into OpenAI's shapes as it streams: the wrapper never reaches the client. Earlier assistant `tool_calls` are
rendered in the same JSON, `tool` results as a user message `{"tool_response": {...}}`, so a conversation goes on
after a tool result. Templates' own tool syntax (Qwen's `<tool_call>` tags) is not used yet: every model takes the
generic format.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequestError
from .toolcalls import CallStart, Content, GenericOutput

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools, checked: the functions, which of them may be called, and whether calls may be many."""

    tools: tuple[Tool, ...]
    choice: str  # "auto" or "required"; a named function is "required" with `tools` narrowed to it
    parallel: bool
    named: str | None = None

    def schema(self) -> dict:
        """The JSON Schema the answer follows."""
        allowed = [t for t in self.tools if self.named in (None, t.name)]
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                  "properties": {"name": {"const": t.name}, "arguments": t.parameters}} for t in allowed]
        items = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        if not self.parallel:
            items["maxItems"] = 1
        call_answer = {"type": "object", "additionalProperties": False, "required": ["tool_calls"],
                       "properties": {"tool_calls": items}}
        if self.choice == "required":
            return call_answer
        plain = {"type": "object", "additionalProperties": False, "required": ["response"],
                 "properties": {"response": {"type": "string"}}}
        return {"anyOf": [call_answer, plain]}

    def system_text(self) -> str:
        listed = json.dumps([{"name": t.name, "description": t.description, "parameters": t.parameters}
                             for t in self.tools], ensure_ascii=False, separators=(",", ":"))
        call = '{"tool_calls":[{"name":<tool name>,"arguments":<its arguments>}]}'
        if self.named:
            how = f"Answer with {call}, calling the tool {self.named}."
        elif self.choice == "required":
            how = f"Answer with {call}, calling one or more of them."
        else:
            how = f'Answer with {call} to call one or more of them, or with {{"response":"<your answer>"}}.'
        return f"You can call these tools:\n{listed}\n{how}"


def _invalid(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid '{param}': {message}", param=param)


def _tool(value: Any, at: str) -> Tool:
    if not isinstance(value, Mapping):
        raise _invalid("a tool must be an object", at)
    if value.get("type") != "function":
        raise _invalid(f"tool type {value.get('type')!r} is not supported; only 'function' is", f"{at}.type")
    function = value.get("function")
    if not isinstance(function, Mapping):
        raise _invalid("a function tool needs an object 'function'", f"{at}.function")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _invalid(f"a function name is 1 to 64 letters, digits, '_' or '-', got {name!r}", f"{at}.function.name")
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise _invalid("description must be a string", f"{at}.function.description")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = dict(EMPTY_PARAMETERS)
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object" or \
            "x-guidance" in parameters:
        raise _invalid("parameters must be a JSON Schema of an object ({\"type\": \"object\", ...})",
                       f"{at}.function.parameters")
    return Tool(name, description, {"type": "object", **parameters})


def parse_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> ToolRequest | None:
    """The request's tools, or None when it has none (or tool_choice is "none"); every mistake is a 400."""
    if tools is not None and not isinstance(tools, list):
        raise _invalid("expected an array of tools", "tools")
    if tool_choice is not None and not tools:
        raise _invalid("tool_choice needs 'tools'", "tool_choice")
    if not tools:
        return None
    parsed = tuple(_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools))
    names = [t.name for t in parsed]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise _invalid(f"the function name {duplicate!r} is given twice", "tools")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise _invalid(f"expected a boolean, got {parallel_tool_calls!r}", "parallel_tool_calls")
    parallel = parallel_tool_calls is not False
    if tool_choice is None or tool_choice == "auto":
        return ToolRequest(parsed, "auto", parallel)
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return ToolRequest(parsed, "required", parallel)
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    if not (isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function"
            and isinstance(function, Mapping) and isinstance(function.get("name"), str)):
        raise _invalid("expected 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                       f"{{\"name\": ...}}}}, got {tool_choice!r}", "tool_choice")
    if function["name"] not in names:
        raise _invalid(f"the function {function['name']!r} is not among the tools ({', '.join(names)})",
                       "tool_choice")
    return ToolRequest(parsed, "required", parallel, named=function["name"])


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return content if isinstance(content, str) else ""


def _arguments(call: Mapping) -> Any:
    arguments = (call.get("function") or {}).get("arguments") if isinstance(call, Mapping) else None
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments or {}
    except ValueError:
        return arguments  # rendered as the string it is


def render_conversation(request: ToolRequest, messages: list) -> list:
    """The conversation as the model sees it in the generic format: the tools described in the system message,
    earlier calls as their JSON, tool results as user messages. Anything malformed is left for the message
    checks (`prompt.convert_messages`) to report."""
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            out.append(message)
            continue
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = [{"name": (c.get("function") or {}).get("name"), "arguments": _arguments(c)}
                     for c in message["tool_calls"] if isinstance(c, Mapping)]
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False,
                                                                   separators=(",", ":"))})
        elif role == "assistant" and isinstance(message.get("content"), (str, list)):
            out.append({"role": "assistant", "content": json.dumps({"response": _text_of(message["content"])},
                                                                   ensure_ascii=False, separators=(",", ":"))})
        elif role == "tool":
            result = {"tool_call_id": message.get("tool_call_id"), "content": _text_of(message.get("content"))}
            out.append({"role": "user", "content": json.dumps({"tool_response": result}, ensure_ascii=False,
                                                              separators=(",", ":"))})
        else:
            out.append(message)
    system = request.system_text()
    first = out[0] if out else None
    if isinstance(first, Mapping) and first.get("role") in ("system", "developer"):
        content = first.get("content")
        joined = (content + "\n\n" + system if isinstance(content, str) else
                  [*content, {"type": "text", "text": "\n\n" + system}] if isinstance(content, list) else system)
        out[0] = {**first, "content": joined}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolAnswer:
    """One choice's generated wrapper JSON, turned into OpenAI's shapes as it arrives (`toolcalls.GenericOutput`).

    `feed` returns stream deltas: `{"content": ...}` for a plain answer's text, and for each call first
    `{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}`, then its
    argument fragments `{"tool_calls": [{"index", "function": {"arguments": ...}}]}`. `message` is the whole
    answer for a non-streaming response.
    """

    def __init__(self):
        self.output = GenericOutput()
        self.ids: list[str] = []

    def feed(self, text: str) -> list[dict]:
        deltas = []
        for event in self.output.feed(text) if text else ():
            if isinstance(event, Content):
                deltas.append({"content": event.text})
            elif isinstance(event, CallStart):
                self.ids.append(call_id())
                deltas.append({"tool_calls": [{"index": event.index, "id": self.ids[-1], "type": "function",
                                               "function": {"name": event.name, "arguments": ""}}]})
            else:
                deltas.append({"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]})
        return deltas

    def finish_reason(self, reason: str) -> str:
        """ "tool_calls" for an answer that called tools and ended; "length" (or "stop" by a stop string) else."""
        return "tool_calls" if reason == "stop" and self.output.kind == "tool_calls" and self.output.complete \
            else reason

    def message(self) -> dict:
        if self.output.kind != "tool_calls":
            return {"role": "assistant", "content": self.output.content}
        calls = [{"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}
                 for id_, (name, arguments) in zip(self.ids, self.output.calls)]
        return {"role": "assistant", "content": None, "tool_calls": calls}
