"""The OpenAI-compatible server, through the real `edgevlm serve` process and the official `openai` client."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import threading
from urllib.parse import urlparse

import openai
import pytest

from edgevlm.export.samples import sample_image
from edgevlm.runtime.sampling import SamplingParams
from edgevlm.runtime.generate import Step
from edgevlm.runtime.vlm import VisionLanguageModel


def png_uri(width=240, height=180, seed=3) -> str:
    buffer = io.BytesIO()
    sample_image(width, height, seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGE = png_uri()


def image_messages(question="What is in the image?", detail="auto"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE, "detail": detail}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="anything", max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_package):
    """What the runtime answers in-process: the server must pass it through unchanged."""
    vlm = VisionLanguageModel.load(tiny_package)

    def answer(messages, **params):
        steps = list(vlm.generate(vlm.prepare(messages), SamplingParams(**params)))
        return "".join(s.text for s in steps), steps

    return answer


def raw(server, method, path, body=None, headers=None):
    """One raw HTTP request: (status, headers, body bytes)."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), payload


def open_stream(server, max_tokens: int):
    """Start a long streaming generation on a raw connection and wait for its first event: (conn, response)."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": True,
        "temperature": 0}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    return conn, response


def sse_events(payload: bytes) -> list[str]:
    text = payload.decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


# ------------------------------------------------------------------------------------------ the openai client


def test_non_streaming_completion_with_an_image(client, reference):
    response = client.chat.completions.create(model="my-model", messages=image_messages(), max_tokens=12,
                                              temperature=0)
    expected, steps = reference(image_messages(), temperature=0, max_tokens=12)
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-") and response.created > 0
    assert response.model == "my-model"
    assert response.system_fingerprint.startswith("fp_edgevlm")
    choice = response.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == expected
    assert choice.finish_reason == steps[-1].finish_reason
    usage = response.usage
    assert usage.completion_tokens == len(steps)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.image_tokens > 0
    assert usage.prompt_tokens > usage.prompt_tokens_details.image_tokens


def test_streaming_completion_with_an_image_and_usage(client, reference):
    stream = client.chat.completions.create(model="m", messages=image_messages(), max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    expected, steps = reference(image_messages(), temperature=0, max_tokens=12)
    assert {c.id for c in chunks} == {chunks[0].id} and {c.created for c in chunks} == {chunks[0].created}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == steps[-1].finish_reason
    with_usage = [c for c in chunks if c.usage is not None]
    assert with_usage == [chunks[-1]] and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(steps)


def test_stream_without_include_usage_has_no_usage(client):
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks)


def test_seed_reproduces_and_n_gives_independent_choices(client):
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=10,
                  temperature=1.0, top_p=0.9, seed=42, n=3)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) == 3
    assert 3 <= first.usage.completion_tokens <= 30  # counted over all three choices


def test_stop_max_completion_tokens_penalties_bias_user_and_unknown_fields(client, reference, tiny_package):
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    full, _ = reference(messages, temperature=0, max_tokens=16)
    stop = full[5:9]
    response = client.chat.completions.create(
        model="m", messages=messages, temperature=0, max_tokens=100, max_completion_tokens=16, stop=[stop, "zzz"],
        presence_penalty=0.0, frequency_penalty=0.0, user="user-123", response_format={"type": "text"},
        extra_body={"some_future_field": {"x": 1}}, metadata={"k": "v"}, store=False)
    assert response.choices[0].message.content == full[:full.index(stop)]
    assert response.choices[0].finish_reason == "stop"

    length = client.chat.completions.create(model="m", messages=messages, max_tokens=100,
                                            max_completion_tokens=3, temperature=0)
    assert length.usage.completion_tokens == 3 and length.choices[0].finish_reason == "length"

    vlm = VisionLanguageModel.load(tiny_package)
    token = vlm.tokenizer.token_to_id("ocean")
    forced = client.chat.completions.create(model="m", messages=messages, max_tokens=3, temperature=0.7,
                                            logit_bias={str(token): 100})
    assert forced.choices[0].message.content == "ocean" * 3

    penalised = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0,
                                               frequency_penalty=2.0, presence_penalty=2.0)
    expected, _ = reference(messages, temperature=0, max_tokens=16, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].message.content == expected


def test_logprobs(client):
    response = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.token == entry.top_logprobs[0].token  # greedy takes the most likely token
        assert entry.bytes == list(entry.token.encode())


def test_detail_low_uses_one_tile(client):
    auto = client.chat.completions.create(model="m", messages=image_messages(), max_tokens=1)
    low = client.chat.completions.create(model="m", messages=image_messages(detail="low"), max_tokens=1)
    assert low.usage.prompt_tokens_details.image_tokens == 16
    assert auto.usage.prompt_tokens_details.image_tokens > 16


def test_models_endpoints(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-smolvlm"]
    card = client.models.retrieve("tiny-smolvlm")
    assert card.object == "model" and card.model_extra["input_modalities"] == ["text", "image"]
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-9")
    assert info.value.body["code"] == "model_not_found"


# ---------------------------------------------------------------------------------------- raw HTTP and errors


def test_sse_framing_on_the_wire(server):
    status, headers, payload = raw(server, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(payload)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, None),
    ({"messages": []}, 400, "messages", None),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature", None),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n", None),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"999999": 5}}, 400, "logit_bias", None),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}}}}, 400,
     "response_format", None),
    ({"messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "retrieval", "function": {"name": "f", "parameters": {}}}]}, 400, "tools[0].type", None),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, 400,
     "messages[0].content[0].type", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     400, "messages", "invalid_image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
     400, "messages", "invalid_image"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "messages", "context_length_exceeded"),
])
def test_client_mistakes_get_openai_errors_and_the_server_keeps_serving(server, body, status, param, code):
    got, headers, payload = raw(server, "POST", "/v1/chat/completions", body)
    assert got == status
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code
    assert raw(server, "GET", "/health")[0] == 200


def test_tools_are_accepted_with_tool_choice_none(client):
    response = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, tool_choice="none",
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert response.choices[0].message.content is not None


def test_unknown_routes_and_methods(server):
    status, _, payload = raw(server, "GET", "/v1/nothing-here")
    assert status == 404 and json.loads(payload)["error"]["code"] == "not_found"
    status, _, payload = raw(server, "GET", "/v1/chat/completions")
    assert status == 405 and json.loads(payload)["error"]["message"]


def test_auth_with_an_api_key(start_server):
    secured = start_server(env={"EDGEVLM_API_KEY": "sesame"})
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sesame"}):
        status, _, payload = raw(secured, "POST", "/v1/chat/completions", body, headers)
        assert status == 401
        assert json.loads(payload)["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secured.base_url, api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=secured.base_url, api_key="sesame", max_retries=0)
    assert ok.chat.completions.create(model="m", messages=body["messages"], max_tokens=2).choices
    assert raw(secured, "GET", "/health")[0] == 200  # health checks need no key


def test_oversized_body_and_full_queue(start_server):
    small = start_server("--max-body-mb", "1", "--max-queue", "1")
    big = {"messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    status, _, payload = raw(small, "POST", "/v1/chat/completions", big)
    assert status == 413 and json.loads(payload)["error"]["code"] == "request_too_large"

    # One long generation holds the only place in the queue; the next request is turned away.
    conn, _ = open_stream(small, 1500)  # admitted and generating
    status, headers, payload = raw(small, "POST", "/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 429 and headers["Retry-After"] == "1"
    assert json.loads(payload)["error"]["type"] == "rate_limit_error"
    conn.close()


# ------------------------------------------------------------------------------------- behaviour under load


def test_disconnect_mid_stream_cancels_and_the_next_request_is_served(start_server):
    fresh = start_server()
    conn, response = open_stream(fresh, 1900)
    for _ in range(2):
        assert response.readline()
    conn.sock.close()  # the client goes away mid-stream
    conn.close()

    status, _, payload = raw(fresh, "POST", "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert status == 200 and json.loads(payload)["usage"]["completion_tokens"] == 3
    health = {}
    for _ in range(100):  # the cancelled handler records itself as soon as its next write fails
        health = json.loads(raw(fresh, "GET", "/health")[2])
        if health["cancelled"] == 1:
            break
    assert health["cancelled"] == 1 and health["completed"] == 1 and health["requests"] == 0


def test_eight_concurrent_streaming_clients_all_complete(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)

        async def one(i):
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"Question number {i}?"}], max_tokens=16,
                temperature=0, stream=True)
            chunks = [c async for c in stream]
            return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]

        results = await asyncio.gather(*(one(i) for i in range(8)))
        await client.close()
        return results

    results = asyncio.run(main())
    assert len(results) == 8
    assert all(r in (["length"], ["stop"]) for r in results)


def test_health_answers_during_a_long_generation(server):
    conn, response = open_stream(server, 1500)
    status, _, payload = raw(server, "GET", "/health")
    assert status == 200 and json.loads(payload)["requests"] == 1  # answered while the generation runs
    rest = response.read()
    conn.close()
    assert rest.count(b"data: ") > 100 and rest.endswith(b"data: [DONE]\n\n")


def test_health_is_503_while_loading(tiny_package):
    """The app factory with a loader that waits: /health and requests say the model is not ready yet."""
    from aiohttp.test_utils import TestClient, TestServer

    from edgevlm.runtime.server import ServerConfig, make_app

    release = threading.Event()

    def loader():
        release.wait(timeout=60)
        return VisionLanguageModel.load(tiny_package)

    async def main():
        app = make_app(ServerConfig(model_path=tiny_package), loader=loader)
        async with TestClient(TestServer(app)) as http_client:
            loading = await http_client.get("/health")
            assert loading.status == 503 and (await loading.json())["status"] == "loading"
            early = await http_client.post("/v1/chat/completions",
                                           json={"messages": [{"role": "user", "content": "hi"}]})
            assert early.status == 503 and (await early.json())["error"]["code"] == "model_not_ready"
            release.set()
            for _ in range(20000):  # each poll is a round trip to the server while the worker loads
                ready = await http_client.get("/health")
                if ready.status == 200:
                    break
            assert ready.status == 200

    asyncio.run(main())


def test_sigterm_shuts_down_gracefully(start_server):
    doomed = start_server()
    conn, _ = open_stream(doomed, 1900)
    assert doomed.stop() == 0
    assert any("shutting down" in line for line in doomed.lines)
    conn.close()


def test_streaming_several_choices(client):
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=1.0, seed=7, n=2, stream=True))
    roles = {c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"}
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks
                if c.choices and c.choices[0].finish_reason}
    assert roles == {0, 1} and set(finished) == {0, 1}


def test_an_error_after_the_stream_started_is_one_error_event(tiny_package):
    """A failure mid-generation cannot change the HTTP status any more: it arrives as one SSE error event."""
    from aiohttp.test_utils import TestClient, TestServer

    from edgevlm.runtime.errors import EdgeVLMError
    from edgevlm.runtime.server import ServerConfig, make_app

    class FailingModel(VisionLanguageModel):
        def submit(self, prompt, params, emit, **kwargs):
            steps = []

            def failing(event):  # the engine fails after two tokens: an error, then the job's end
                if isinstance(event, Step):
                    steps.append(event)
                    if len(steps) == 3:
                        event = EdgeVLMError("the accelerator fell off the bus")
                    elif len(steps) > 3:
                        return
                emit(event)

            super().submit(prompt, params, failing, **kwargs)

    async def main():
        app = make_app(ServerConfig(model_path=tiny_package), loader=lambda: FailingModel.load(tiny_package))
        async with TestClient(TestServer(app)) as http_client:
            for _ in range(20000):  # round trips while the worker loads the model
                if (await http_client.get("/health")).status == 200:
                    break
            response = await http_client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True})
            assert response.status == 200
            events = sse_events(await response.read())
            errors = [json.loads(e) for e in events if e.startswith('{"error"')]
            assert errors == [{"error": {"message": "the accelerator fell off the bus", "type": "server_error",
                                         "param": None, "code": None}}]
            health = await http_client.get("/health")
            assert health.status == 200

    asyncio.run(main())


def test_the_package_generation_defaults_apply_where_the_request_is_silent(client, tiny_package):
    """request > package > OpenAI: the tiny package says temperature 0 (its checkpoint does not sample), so
    without a temperature the choices are greedy and identical; a request's own temperature wins."""
    from edgevlm.runtime.package import ModelPackage

    assert ModelPackage.load(tiny_package).generation_defaults["temperature"] == 0.0
    messages = [{"role": "user", "content": "Tell me something."}]
    silent = client.chat.completions.create(model="m", messages=messages, max_tokens=12, n=3)
    assert len({c.message.content for c in silent.choices}) == 1
    sampled = client.chat.completions.create(model="m", messages=messages, max_tokens=12, n=3, temperature=1.5,
                                             seed=3)
    assert len({c.message.content for c in sampled.choices}) > 1
