"""The server's OpenAPI 3.1 document, served at GET /openapi.json.

Written to match what the server does, not OpenAI's whole API: a request that validates is one the request parser
(`api.parse_chat_request`, `SamplingParams.from_request`, `prompt.convert_messages`) accepts, apart from what only
the loaded model can tell (token ids past its vocabulary, a prompt longer than its context, an image that does not
decode, tools its chat template cannot express, the server's own limits) and what JSON Schema cannot say (the
server takes integers only as JSON integers, refusing 1.0; strings may not hold lone UTF-16 surrogates), which is a
400 with the error envelope. Fields the server accepts and ignores are declared without a type, since it accepts
any value for them. Every object allows properties it does not name: SDKs send OpenAI's newer fields, ignored.
"""

from __future__ import annotations

from typing import Any

from .sampling import MAX_N, MAX_STOP_SEQUENCES, MAX_TOP_LOGPROBS

IMAGE_PLACEHOLDER = "<image>"  # what the Idefics3/SmolVLM chat template writes for an image; refused in text


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict, required: tuple = (), **extra: Any) -> dict:
    schema = {"type": "object", "properties": properties, "additionalProperties": True, **extra}
    if required:
        schema["required"] = list(required)
    return schema


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict:
    return _json(_ref("Error"), description)


_TEXT = {"type": "string", "not": {"pattern": IMAGE_PLACEHOLDER},
         "description": f"Text; it may not contain {IMAGE_PLACEHOLDER!r}, which marks image positions (400)."}
_IGNORED = "Accepted and ignored (any value)."


def _message(role: str, parts: list[str], *, content_required: bool = True) -> dict:
    content = [_TEXT, {"type": "array", "minItems": 1, "items": {"anyOf": [_ref(p) for p in parts]}}]
    if not content_required:
        content.append({"type": "null"})
    properties = {
        "role": {"enum": ["system", "developer"]} if role == "system" else {"const": role},
        "content": {"anyOf": content},
        "name": {"type": ["string", "null"]},
        "tool_call_id": {"type": ["string", "null"]},
        # Only assistant messages carry tool calls; their `function.arguments` JSON string is parsed when it can be.
        "tool_calls": {"type": ["array", "null"], "items": {"type": "object"}} if role == "assistant" else
        {"type": "null"},
    }
    return _obj(properties, ("role", "content") if content_required else ("role",))


def _nonneg_int() -> dict:
    return {"type": "integer", "minimum": 0}


def _schemas() -> dict:
    token_bytes = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}}
    top_logprob = _obj({"token": {"type": "string"}, "logprob": {"type": "number"}, "bytes": token_bytes},
                       ("token", "logprob", "bytes"))
    token_logprob = _obj({**top_logprob["properties"], "top_logprobs": {"type": "array", "items": top_logprob}},
                         ("token", "logprob", "bytes", "top_logprobs"))
    logprobs = _nullable(_obj({"content": {"type": "array", "items": token_logprob}}, ("content",)))
    finish = {"enum": ["stop", "length", "tool_calls"]}
    tool_call = _obj({"id": {"type": "string"}, "type": {"const": "function"},
                      "function": _obj({"name": {"type": "string"}, "arguments": {"type": "string"}},
                                       ("name", "arguments"))}, ("id", "type", "function"))
    tool_call_delta = _obj({"index": _nonneg_int(), "id": {"type": "string"}, "type": {"const": "function"},
                            "function": _obj({"name": {"type": "string"}, "arguments": {"type": "string"}})},
                           ("index",))
    usage = _obj({"prompt_tokens": _nonneg_int(), "completion_tokens": _nonneg_int(), "total_tokens": _nonneg_int(),
                  "prompt_tokens_details": _obj({"cached_tokens": _nonneg_int(), "image_tokens": _nonneg_int()})},
                 ("prompt_tokens", "completion_tokens", "total_tokens"))
    counters = {name: _nonneg_int() for name in ("requests", "admitted", "completed", "cancelled", "failed",
                                                 "rejected")}
    envelope = {"id": {"type": "string"}, "created": {"type": "integer"}, "model": {"type": "string"},
                "system_fingerprint": {"type": "string"}}
    sampling = {
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
        "n": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_N,
              "description": "Choices; the server's --max-n (default 16) may allow fewer (400)."},
        "max_tokens": {"description": "An integer ≥ 1 or null (default: the rest of the model's context); not even "
                                      "checked when max_completion_tokens is given."},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1,
                                  "description": "OpenAI's newer name for max_tokens; wins when both are given."},
        "stop": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"},
                           {"type": "array", "maxItems": MAX_STOP_SEQUENCES,
                            "items": {"type": "string", "minLength": 1}}]},
        "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
        "logit_bias": {"type": ["object", "null"], "propertyNames": {"pattern": "^[0-9]{1,12}$"},
                       "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                       "description": "Token id → bias; -100 bans the token. An id past the model's vocabulary "
                                      "is a 400."},
        "logprobs": {"type": ["boolean", "null"]},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                         "description": "Needs logprobs: true."},
        "seed": {"type": ["integer", "null"], "minimum": -(2**63), "maximum": 2**63 - 1},
    }
    request = _obj({
        "messages": {"type": "array", "minItems": 1, "items": {"anyOf": [_ref(f"{r}Message") for r in (
            "System", "User", "Assistant", "Tool")]}},
        "model": {"type": ["string", "null"], "description": "Echoed in the response; the loaded model answers."},
        "stream": {"type": ["boolean", "null"]},
        "stream_options": {"anyOf": [_obj({"include_usage": {"type": ["boolean", "null"]}}), {"type": "null"}],
                           "description": "Only with stream: true."},
        **sampling,
        "response_format": _nullable(_obj({"type": {"enum": ["text", "json_object", "json_schema"]}}, ("type",),
                                          description="json_object / json_schema are enforced by constrained "
                                                      "decoding; a schema keyword the grammar cannot enforce is a "
                                                      "400; not together with tools (400).")),
        "tools": {"type": ["array", "null"],
                  "description": "Function tools (type 'function', a name, parameters an object schema); any "
                                 "other tool, a duplicate name or parameters that are not an object schema are a "
                                 "400. Answered in the generic format, enforced by the grammar; not with logprobs."},
        "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}, {"type": "null"}],
                        "description": "Needs tools; a named function must be one of them (400)."},
        "parallel_tool_calls": {"type": ["boolean", "null"]},
        **{name: {"description": _IGNORED} for name in ("user", "metadata", "store", "service_tier")},
    }, ("messages",), allOf=[
        {"if": {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]},
         "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}},
        {"if": {"properties": {"stream_options": {"type": "object"}}, "required": ["stream_options"]},
         "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]}},
        {"if": {"properties": {"max_completion_tokens": {"type": "integer"}}, "required": ["max_completion_tokens"]},
         "else": {"properties": {"max_tokens": {"type": ["integer", "null"], "minimum": 1}}}},
        {"if": {"properties": {"tool_choice": {"const": "none"}}, "required": ["tool_choice"]},
         "else": {"properties": {"tools": {"items": {"type": "object"}}}}},
    ])
    return {
        "ChatCompletionRequest": request,
        "TextPart": _obj({"type": {"const": "text"}, "text": _TEXT}, ("type", "text")),
        "RefusalPart": _obj({"type": {"const": "refusal"}, "refusal": _TEXT}, ("type", "refusal")),
        "ImageUrlPart": _obj({"type": {"const": "image_url"}, "image_url": _obj({
            "url": {"type": "string", "minLength": 1,
                    "description": "A base64 data URI (data:image/png;base64,...) or bare base64 of a PNG, JPEG, "
                                   "WebP, GIF or BMP file. URLs are refused (offline server); an image that does "
                                   "not decode or breaks the server's limits is a 400 (invalid_image)."},
            "detail": {"enum": ["auto", "low", "high", None], "description": "'low': one tile per image."},
        }, ("url",))}, ("type", "image_url")),
        "SystemMessage": _message("system", ["TextPart"]),
        "UserMessage": _message("user", ["TextPart", "ImageUrlPart"]),
        "AssistantMessage": _message("assistant", ["TextPart", "RefusalPart"], content_required=False),
        "ToolMessage": _message("tool", ["TextPart"]),
        "ChatCompletion": _obj({
            **envelope, "object": {"const": "chat.completion"},
            "choices": {"type": "array", "minItems": 1, "items": _obj({
                "index": _nonneg_int(),
                "message": _obj({"role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                                 "tool_calls": {"type": "array", "items": tool_call}}, ("role", "content")),
                "finish_reason": finish, "logprobs": logprobs}, ("index", "message", "finish_reason", "logprobs"))},
            "usage": _ref("Usage"),
        }, ("id", "object", "created", "model", "system_fingerprint", "choices", "usage")),
        "ChatCompletionChunk": _obj({
            **envelope, "object": {"const": "chat.completion.chunk"},
            "choices": {"type": "array", "items": _obj({
                "index": _nonneg_int(),
                "delta": _obj({"role": {"const": "assistant"}, "content": {"type": "string"},
                               "tool_calls": {"type": "array", "items": tool_call_delta}}),
                "finish_reason": {"anyOf": [finish, {"type": "null"}]}, "logprobs": logprobs},
                ("index", "delta", "finish_reason"))},
            "usage": _ref("Usage"),
        }, ("id", "object", "created", "model", "choices")),
        "Usage": usage,
        "Model": _obj({"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                       "owned_by": {"type": "string"},
                       "input_modalities": {"type": "array", "items": {"type": "string"}},
                       "output_modalities": {"type": "array", "items": {"type": "string"}}},
                      ("id", "object", "created", "owned_by")),
        "ModelList": _obj({"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
                          ("object", "data")),
        "Error": _obj({"error": _obj({"message": {"type": "string"}, "type": {"type": "string"},
                                      "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
                                     ("message", "type", "param", "code"))}, ("error",)),
        "Health": _obj({"status": {"const": "ok"}, "model": {"type": "string"}, **counters}, ("status", "model"),
                       description="requests: running or waiting now; the others count since start (admitted = "
                                   "completed + cancelled + failed + requests). More counters may be added."),
        "HealthNotReady": _obj({"status": {"enum": ["loading", "error", "draining"]},
                                "error": {"type": ["string", "null"]}, "model": {"type": "string"}, **counters},
                               ("status",), description="loading or error (with `error`): the model is not "
                                                        "loaded; draining (with the counters): shutting down."),
    }


# One server-sent event, as tools (schemathesis) read a 3.1 event-stream schema: its `data` is a chunk or an error
# as JSON, or the final "[DONE]".
_SSE_EVENT = _obj({"data": {"type": "string", "if": {"const": "[DONE]"}, "else": {
    "contentMediaType": "application/json", "contentSchema": {"anyOf": [_ref("ChatCompletionChunk"), _ref("Error")]}}}},
    ("data",))

_V1_ERRORS = {
    "401": _error("Missing or wrong API key (only when the server runs with --api-key / EDGEVLM_API_KEY)."),
    "503": _error("The model is still loading or failed to load (code model_not_ready), or the server is "
                  "shutting down (server_shutting_down: no new requests, or an answer cut short)."),
}


def document(version: str) -> dict:
    """The OpenAPI 3.1 document of the server whose package version is `version`."""
    v1_security = [{"bearerAuth": []}, {}]
    chat = {
        "operationId": "createChatCompletion",
        "summary": "Chat completion (text and images in, text out), streamed as server-sent events or not",
        "security": v1_security,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ChatCompletionRequest")}}},
        "responses": {
            "200": {"description": "The completion; with stream: true, server-sent events: one "
                                   "`data: <ChatCompletionChunk JSON>` per event, an error after the stream started "
                                   "as one `data: <Error JSON>` event, and `data: [DONE]` last.",
                    "content": {"application/json": {"schema": _ref("ChatCompletion")},
                                "text/event-stream": {"schema": _SSE_EVENT}}},
            "400": _error("Invalid request: the body is not plain JSON (NaN, Infinity, integers of over 4,300 "
                          "digits, nesting over 64 levels, lone UTF-16 surrogates in strings are refused) or a "
                          "field is invalid (`param` names it); an image is invalid or breaks a limit "
                          "(invalid_image); the prompt exceeds the context (context_length_exceeded); the request "
                          "breaks a server limit (n over --max-n, n × max_tokens over --max-request-tokens, its KV "
                          "cache over --kv-budget-mb); or a feature is unsupported (unsupported_parameter)."),
            "404": _error("Not found. Not returned today (any `model` value is answered by the loaded model)."),
            "408": _error("The request body did not arrive within --read-timeout (code request_timeout)."),
            "413": _error("The request body is larger than the server's limit (--max-body-mb)."),
            "429": {**_error("The server is busy: requests running or waiting (--max-queue) or their bodies "
                             "(--max-pending-body-mb); retry after Retry-After seconds."),
                    "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
            **_V1_ERRORS,
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgevlm", "version": version,
                 "description": "Offline vision-language model server with an OpenAI-compatible Chat Completions "
                                "API."},
        "paths": {
            "/v1/chat/completions": {"post": chat},
            "/v1/models": {"get": {
                "operationId": "listModels", "summary": "The model this server serves", "security": v1_security,
                "responses": {"200": _json(_ref("ModelList"), "A list of one model."), **_V1_ERRORS}}},
            "/v1/models/{model_id}": {"get": {
                "operationId": "retrieveModel", "summary": "One model", "security": v1_security,
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json(_ref("Model"), "The model."),
                              "404": _error("No such model (code model_not_found)."), **_V1_ERRORS}}},
            "/health": {"get": {
                "operationId": "health", "summary": "Readiness and counters (no API key needed)",
                "responses": {"200": _json(_ref("Health"), "The model is loaded."),
                              "503": _json(_ref("HealthNotReady"), "Loading, failed to load, or shutting down.")}}},
            "/metrics": {"get": {
                "operationId": "metrics", "summary": "Prometheus metrics (text exposition format; no API key needed)",
                "responses": {"200": {"description": "Counters, gauges and histograms of the model's engine.",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}},
                              "503": _json(_ref("Error"), "The model is not loaded yet.")}}},
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "The OpenAPI 3.1 document.")}}},
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "Required on /v1/ only when the server runs with --api-key (or EDGEVLM_API_KEY)."}},
        },
    }
