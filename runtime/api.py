"""OpenAI Chat Completions shapes: the request checked into a `ChatRequest`, and the response objects.

Which fields do what (also in the README):
- honoured: messages, model (echoed), temperature, top_p, n, stream, stream_options.include_usage, stop,
  max_tokens / max_completion_tokens, presence_penalty, frequency_penalty, logit_bias, logprobs, top_logprobs,
  seed, response_format text / json_object / json_schema (constrained decoding, `grammar.py`), image_url.detail
  ("low" = one tile per image).
- honoured: tools (functions), tool_choice (none / auto / required / a named function), parallel_tool_calls,
  in the generic format of `tools.py`, enforced by the grammar.
- accepted and ignored: user, metadata, store, service_tier, and any field this server does not know (SDKs send
  OpenAI's newer fields).
- refused with a 400: a JSON schema with keywords the grammar cannot enforce, tools together with a JSON
  response_format or with logprobs, other content part types (audio, files).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import safejson
from .errors import InvalidRequestError
from .grammar import parse_response_format
from .tools import ToolRequest, parse_tools
from .sampling import SamplingParams


@dataclass(frozen=True)
class ChatRequest:
    messages: list
    model: str | None
    stream: bool
    include_usage: bool
    params: SamplingParams
    tools: ToolRequest | None  # the generic tool format (tools.py); None without tools or with tool_choice none
    schema: dict | None = None  # response_format json_object / json_schema: the JSON Schema the answer follows


def _flag(body: Mapping, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(f"Invalid '{name}': expected a boolean, got {value!r}", param=name)
    return value


def parse_json(raw: bytes) -> Any:
    """The request body as Python values; anything that is not plain, sane JSON (`safejson`) is a 400."""
    try:
        return safejson.loads(raw)
    except safejson.UnsafeJSON as exc:
        raise InvalidRequestError(f"the request body is not usable JSON: {exc}") from None


def parse_chat_request(body: Any, *, vocab_size: int, defaults: Mapping[str, Any] | None = None) -> ChatRequest:
    """`defaults`: the model package's sampling defaults, for the fields the request leaves out."""
    if not isinstance(body, Mapping):
        raise InvalidRequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty array of messages", param="messages")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError(f"Invalid 'model': expected a string, got {model!r}", param="model")
    stream = _flag(body, "stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, Mapping):
            raise InvalidRequestError("Invalid 'stream_options': expected an object", param="stream_options")
        if not stream:
            raise InvalidRequestError("'stream_options' is only allowed when 'stream' is true",
                                      param="stream_options")
        include_usage = _flag(stream_options, "include_usage")

    schema = parse_response_format(body.get("response_format"))

    tools = parse_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    if tools is not None and schema is not None:
        raise InvalidRequestError("response_format json_object / json_schema together with tools is not supported "
                                  "yet", param="response_format", code="unsupported_parameter")
    params = SamplingParams.from_request(body, vocab_size=vocab_size, defaults=defaults)
    if tools is not None and params.logprobs:
        raise InvalidRequestError("logprobs together with tools is not supported yet", param="logprobs",
                                  code="unsupported_parameter")
    return ChatRequest(messages=messages, model=model, stream=stream, include_usage=include_usage, params=params,
                       tools=tools, schema=schema)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, image_tokens: int, cached_tokens: int = 0) -> dict:
    """`cached_tokens`: prompt tokens whose KV cache was reused from an earlier request (not run again)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens, "image_tokens": image_tokens},
    }


def logprob_entry(token_text: str, logprob: float, top: list[tuple[str, float]]) -> dict:
    def item(text: str, value: float) -> dict:
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {**item(token_text, logprob), "top_logprobs": [item(t, v) for t, v in top]}


def chunk(request_id: str, created: int, model: str, fingerprint: str, choices: list, usage_: dict | None = None
          ) -> dict:
    out = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": fingerprint, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "edgevlm",
            "input_modalities": ["text", "image"], "output_modalities": ["text"]}
