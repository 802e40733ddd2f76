"""OpenAI Chat Completions shapes: the request checked into a `ChatRequest`, and the response objects.

The HTTP server (server.py) and the in-process API (inprocess.py) answer through the same functions, so both
take the same parameters, apply the same limits and raise the same errors: `parse_chat_request`, `check_cost`,
`prepare` (the prompt, with tools in the generic format), then `choices` / `completion` / `usage` for the answer.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgevlm import __version__

from . import memory, safejson, tools as tools_format
from .errors import InvalidRequestError
from .grammar import parse_response_format
from .limits import ServerLimits
from .tools import ToolRequest, parse_tools
from .sampling import SamplingParams

if TYPE_CHECKING:  # the model's modules load onnxruntime: only for the annotations
    from .generate import Step
    from .scheduler import Prompt
    from .vlm import VisionLanguageModel


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


def check_cost(params: SamplingParams, limits: ServerLimits, model: VisionLanguageModel) -> None:
    """What one request may ask for under the server's limits, checked as soon as it is parsed (its prompt's size
    is checked once known, by `Scheduler.plan`)."""
    n, requested = params.n, params.max_tokens
    if n > limits.max_n:
        raise InvalidRequestError(f"Invalid 'n': {n} choices exceed this server's limit of {limits.max_n} "
                                  "(edgevlm serve --max-n)", param="n")
    total = limits.max_request_tokens or model.context_length
    if n * (requested or 1) > total:
        raise InvalidRequestError(
            f"Invalid 'max_tokens': n × max_tokens = {n} × {requested or 1} = {n * (requested or 1)} completion "
            f"tokens exceed this server's limit of {total} per request (edgevlm serve --max-request-tokens)",
            param="max_tokens" if requested else "n")
    model.check_choices(n)  # before any image is decoded


def model_input(chat: ChatRequest) -> tuple[list, dict | None]:
    """What the model is asked: the messages it sees and the JSON Schema its answer follows. With tools, both are
    the generic format's (tools.py): the conversation describes the tools and the grammar follows their schemas;
    `tools.ToolAnswer` turns the answer's JSON back into OpenAI's message and deltas."""
    if chat.tools:
        return tools_format.render_conversation(chat.tools, chat.messages), chat.tools.schema()
    return chat.messages, chat.schema


def prepare(model: VisionLanguageModel, chat: ChatRequest, limits: ServerLimits, *,
            cancelled: Callable[[], bool] = lambda: False) -> tuple[Prompt, dict | None]:
    """The request's prompt and the JSON Schema its answer follows (`model_input`), images decoded and fitted. An
    unenforceable schema is refused before any image is decoded; a large image's pixels go back to the system
    afterwards, not just to malloc."""
    messages, schema = model_input(chat)
    try:
        if schema is not None:
            model.grammars.compile(schema)
        prompt = model.prepare(messages, chat.params, max_request_tokens=limits.max_request_tokens,
                               cancelled=cancelled)
    finally:
        memory.release()
    return prompt, schema


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


def step_logprob(step: Step, token_text: Callable[[int], str], top_logprobs: int | None) -> dict:
    """One generated token's logprobs entry, with its `top_logprobs` alternatives."""
    return logprob_entry(token_text(step.token), step.sample.logprob,
                         [(token_text(t), v) for t, v in step.sample.top_logprobs[: top_logprobs or 0]])


def unfinished(steps: Sequence[Step], n: int) -> bool:
    """True when some of the n choices never ended: the answer was cut short, and is never sent as an answer."""
    return len({s.choice for s in steps if s.finish_reason}) < n


def choices(steps: Sequence[Step], chat: ChatRequest, token_text: Callable[[int], str]) -> list[dict]:
    """A non-streamed response's choices from every step of its (finished) generation."""
    out = []
    for index in range(chat.params.n):
        own = [s for s in steps if s.choice == index]
        text, finish_reason = "".join(s.text for s in own), own[-1].finish_reason
        message = {"role": "assistant", "content": text}
        if chat.tools:
            answer = tools_format.ToolAnswer()
            answer.feed(text)
            message, finish_reason = answer.message(), answer.finish_reason(finish_reason)
        choice = {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": None}
        if chat.params.logprobs:
            choice["logprobs"] = {"content": [step_logprob(s, token_text, chat.params.top_logprobs) for s in own]}
        out.append(choice)
    return out


def system_fingerprint(model: VisionLanguageModel) -> str:
    return f"fp_edgevlm{__version__}_{model.fingerprint}"


def completion(request_id: str, created: int, model: str, fingerprint: str, choices_: list, usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": fingerprint, "choices": choices_, "usage": usage_}


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
