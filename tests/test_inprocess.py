"""The in-process API (`import edgevlm`, runtime/inprocess.py) on the bundled demo model: images given every way
answer the drawn shape, streams join to the whole answer, JSON follows its schema, bad requests raise what the
server answers, threads share one model and are decoded together, and none of it imports aiohttp."""

from __future__ import annotations

import http.client
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image, ImageDraw

import edgevlm
from conftest import ServerProcess
from edgevlm.runtime.inprocess import image_url

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "models" / "demo-shapes"
BLUE, GREEN = (30, 80, 225), (35, 165, 50)
SHAPE_FORMAT = {"type": "json_schema", "json_schema": {"name": "shape", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["shape", "color", "count"],
    "properties": {"shape": {"enum": ["circle", "square", "triangle", "star"]},
                   "color": {"enum": ["red", "orange", "yellow", "green", "blue", "purple", "black", "white"]},
                   "count": {"type": "integer", "minimum": 1, "maximum": 3}}}}}


def draw(shape: str, color=BLUE, *, mode: str = "RGB") -> Image.Image:
    """One shape in the middle of a white (or, for RGBA, transparent) 240×200 image."""
    image = Image.new(mode, (240, 200), "white" if mode == "RGB" else (0, 0, 0, 0))
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse([70, 50, 170, 150], fill=color)
    elif shape == "square":
        pen.rectangle([70, 50, 170, 150], fill=color)
    else:
        pen.polygon([(120, 40), (175, 150), (65, 150)], fill=color)
    return image


def encoded(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model():
    with edgevlm.load() as model:  # no path: the bundled demo model, as `edgevlm serve` finds it
        yield model


@pytest.fixture(scope="module")
def no_eos(model) -> dict:
    return {token: -100 for token in model.vlm.eos_token_ids}


def test_importing_and_asking_loads_no_aiohttp():
    code = ("import sys, edgevlm; assert 'onnxruntime' not in sys.modules, 'import edgevlm is not lazy'; "
            "m = edgevlm.load(); print(m.ask('Hello', temperature=0, max_tokens=30).strip()); m.close(); "
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('aiohttp', 'multidict', 'yarl')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    answer, modules = out.stdout.splitlines()
    assert answer.startswith("I am a small demo model")
    assert modules == "[]"


@pytest.mark.parametrize("kind", ["png bytes", "jpeg bytes", "path", "str path", "PIL", "PIL RGBA", "numpy",
                                  "numpy RGBA", "data URI"])
def test_the_answer_names_the_drawn_shape(model, kind, tmp_path):
    shape = {"png bytes": "circle", "jpeg bytes": "square", "path": "triangle", "str path": "circle", "PIL": "square",
             "PIL RGBA": "triangle", "numpy": "circle", "numpy RGBA": "square", "data URI": "triangle"}[kind]
    image = draw(shape, mode="RGBA" if "RGBA" in kind else "RGB")
    if kind == "png bytes":
        given = encoded(image)
    elif kind == "jpeg bytes":
        given = encoded(image, "JPEG")
    elif kind in ("path", "str path"):
        (tmp_path / "shape.png").write_bytes(encoded(image))
        given = tmp_path / "shape.png" if kind == "path" else str(tmp_path / "shape.png")
    elif kind.startswith("numpy"):
        given = np.asarray(image)
        assert given.dtype == np.uint8 and given.shape == (200, 240, 4 if "RGBA" in kind else 3)
    elif kind == "data URI":
        given = image_url(image)
    else:
        given = image
    assert model.ask("What shape is this?", images=[given], temperature=0).strip() == f"A {shape}."
    assert model.ask("What color is the shape?", images=given, temperature=0).strip() == "It is blue."


def test_chat_takes_openai_messages_with_any_image(model):
    content = [{"type": "image_url", "image_url": {"url": draw("circle", GREEN), "detail": "auto"}},
               {"type": "text", "text": "Describe the image."}]
    reply = model.chat([{"role": "user", "content": content}], temperature=0, max_tokens=20)
    assert reply.text.strip() == "A green circle."
    assert reply.finish_reason == "stop"
    assert reply.usage.image_tokens > 0 and reply.usage.prompt_tokens > reply.usage.image_tokens
    assert reply.usage.completion_tokens > 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    body = reply.to_dict()  # the server's chat.completion object
    assert body["object"] == "chat.completion" and body["model"] == "demo-shapes"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                                "finish_reason": "stop", "logprobs": None}]
    assert body["usage"]["prompt_tokens_details"]["image_tokens"] == reply.usage.image_tokens


def test_a_stream_joins_to_the_greedy_answer(model):
    image = encoded(draw("circle", GREEN))
    whole = model.ask("Describe the image.", images=[image], temperature=0)
    stream = model.ask("Describe the image.", images=[image], temperature=0, stream=True)
    with pytest.raises(RuntimeError, match="has not ended"):
        stream.finish_reason
    deltas = list(stream)
    assert len(deltas) > 1 and all(isinstance(d, str) and d for d in deltas)
    assert "".join(deltas) == whole and whole.strip() == "A green circle."
    assert stream.finish_reason == "stop" and stream.completion.text == whole
    assert stream.usage.completion_tokens >= len(deltas)


def test_json_schema_response_format(model):
    reply = model.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": draw("circle")}},
                                                     {"type": "text", "text": "Answer in JSON."}]}],
                       temperature=0, max_tokens=60, response_format=SHAPE_FORMAT)
    assert json.loads(reply.text) == {"shape": "circle", "color": "blue", "count": 1}
    # json_object: any object; the question is small talk, the grammar still makes it JSON.
    reply = model.chat([{"role": "user", "content": "Hello"}], temperature=0, max_tokens=30,
                       response_format={"type": "json_object"})
    assert reply.text.startswith("{")
    assert reply.finish_reason == "length" or isinstance(json.loads(reply.text), dict)


def test_sampling_parameters_and_choices(model, no_eos):
    messages = [{"role": "user", "content": "Hello"}]
    reply = model.chat(messages, n=3, temperature=1.0, top_p=0.9, seed=7, max_tokens=12, logit_bias=no_eos)
    assert len(reply.choices) == 3 and [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.completion_tokens == 36
    again = model.chat(messages, n=3, temperature=1.0, top_p=0.9, seed=7, max_tokens=12, logit_bias=no_eos)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]  # the same seed, the same tokens
    stopped = model.chat(messages, temperature=0, stop=["small"], max_tokens=30)
    assert stopped.text.strip() == "I am a" and stopped.finish_reason == "stop"
    short = model.chat(messages, temperature=0, max_completion_tokens=2, presence_penalty=1.0,
                       frequency_penalty=0.5, logprobs=True, top_logprobs=2)
    assert short.finish_reason == "length" and short.usage.completion_tokens == 2
    entries = short.choices[0].logprobs
    assert len(entries) == 2 and all(len(e["top_logprobs"]) == 2 for e in entries)


def test_tools(model):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
        "additionalProperties": False}}}]
    reply = model.chat([{"role": "user", "content": "What is the weather in Paris?"}], tools=tools,
                       tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=100)
    assert reply.finish_reason == "tool_calls" and reply.text == ""
    [call] = reply.tool_calls
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Oslo")


# Bad requests, each as body fields: in-process they raise the error the server answers with (message, type,
# param, code and status).
BAD = {
    "temperature": {"temperature": 5},
    "top_p": {"top_p": 0},
    "n": {"n": 0},
    "n over max_n": {"n": 9},
    "n × max_tokens": {"n": 2, "max_tokens": 300},
    "max_tokens": {"max_tokens": 0},
    "max_completion_tokens": {"max_completion_tokens": -1},
    "stop": {"stop": ["a", "b", "c", "d", "e"]},
    "seed": {"seed": 1.5},
    "logit_bias id": {"logit_bias": {"99999999": 1}},
    "logit_bias amount": {"logit_bias": {"5": 101}},
    "top_logprobs": {"top_logprobs": 2},
    "response_format": {"response_format": {"type": "xml"}},
    "unenforceable schema": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}}}},
    "tools": {"tools": [{"type": "code_interpreter"}]},
    "tools with a schema": {"tools": [{"type": "function", "function": {"name": "f"}}],
                            "response_format": {"type": "json_object"}},
    "role": {"messages": [{"role": "robot", "content": "hi"}]},
    "empty messages": {"messages": []},
    "not base64": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!!"}}, {"type": "text", "text": "?"}]}]},
    "image URL": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
    "detail": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:;base64,AAAA", "detail": "max"}}]}]},
    "prompt too long": {"messages": [{"role": "user", "content": "circle " * 3000}]},
}


@pytest.fixture(scope="module")
def demo_server():
    process = ServerProcess()  # the bundled demo model, as `model` above
    yield process
    process.stop()


def _server_error(server: ServerProcess, body: dict) -> tuple[int, dict]:
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    status, answer = response.status, json.loads(response.read())
    conn.close()
    return status, answer


@pytest.mark.parametrize("case", BAD)
def test_a_bad_request_raises_what_the_server_answers(model, demo_server, case):
    fields = {"messages": [{"role": "user", "content": "Hello"}], **BAD[case]}
    status, answer = _server_error(demo_server, {"model": "demo-shapes", **fields})
    assert status >= 400, answer
    messages = fields.pop("messages")
    with pytest.raises(edgevlm.EdgeVLMError) as caught:
        model.chat(messages, **fields)
    error = caught.value
    assert error.to_dict() == answer and error.status == status
    assert isinstance(error, edgevlm.InvalidRequestError)  # every one of these is the client's mistake
    assert error.param == answer["error"]["param"] and error.message == answer["error"]["message"]


def test_bad_inputs_of_the_python_api(model, tmp_path):
    with pytest.raises(edgevlm.ImageError, match=r"image 2: .*uint8 array .* got float64 \(4, 4, 3\)") as caught:
        model.ask("?", images=[encoded(draw("circle")), np.zeros((4, 4, 3))])
    assert caught.value.param == "images"
    with pytest.raises(edgevlm.ImageError, match="image 1: cannot read .*missing.png: No such file"):
        model.ask("?", images=tmp_path / "missing.png")
    with pytest.raises(edgevlm.ImageError, match="image 1: unsupported or corrupt image data"):
        model.ask("?", images=b"not an image")
    with pytest.raises(edgevlm.ImageError, match="image 1: expected image bytes, a file path, .* got int"):
        model.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}])
    with pytest.raises(edgevlm.InvalidRequestError, match="a stream carries one choice") as caught:
        model.ask("Hello", n=2, stream=True)
    assert caught.value.param == "n"
    with pytest.raises(TypeError):
        model.ask("Hello", temprature=0)  # a misspelt parameter is Python's error, not ignored as JSON fields are
    with pytest.raises(edgevlm.PackageError, match="no such directory"):
        edgevlm.load(tmp_path / "nowhere")


def _batched_steps(model) -> tuple[float, float]:
    """(decode steps so far, of them the ones that ran one sequence alone), from the engine's own histogram."""
    samples = {(s.name, s.labels.get("le")): s.value for s in model.vlm.metrics.batch.collect()[0].samples}
    return samples[("edgevlm_decode_batch_size_count", None)], samples[("edgevlm_decode_batch_size_bucket", "1.0")]


def test_threads_share_the_model_and_are_decoded_together(model, no_eos):
    steps_before, alone_before = _batched_steps(model)
    deltas: dict[str, list[float]] = {"a": [], "b": []}
    ends: dict[str, object] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def ask(name: str) -> None:
        try:
            start.wait(30)
            stream = model.ask(f"Say something, {name}.", stream=True, temperature=0, max_tokens=300,
                               logit_bias=no_eos)
            for _ in stream:
                deltas[name].append(time.perf_counter())
            ends[name] = stream.completion
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(name,)) for name in deltas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert all(len(times) > 100 for times in deltas.values())
    (a0, a1), (b0, b1) = ((times[0], times[-1]) for times in deltas.values())
    assert a0 < b1 and b0 < a1, "one thread's answer arrived after the other's had ended"
    steps, alone = _batched_steps(model)
    assert (steps - steps_before) - (alone - alone_before) >= 50, "the engine did not decode the threads together"
    assert all(end.finish_reason == "length" and end.usage.completion_tokens == 300 for end in ends.values())


def test_close_cuts_a_stream_and_refuses_later_requests(no_eos):
    model = edgevlm.load(PACKAGE)
    stream = model.ask("Hello", stream=True, temperature=0, max_tokens=400, logit_bias=no_eos)
    assert next(stream)
    model.close()
    with pytest.raises(edgevlm.Cancelled, match="the model was closed: this answer was cut short"):
        for _ in stream:
            pass
    with pytest.raises(edgevlm.Cancelled, match="the model was closed"):
        model.ask("Hello")
    assert "closed" in repr(model)


def test_the_example_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "inprocess.py")], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == "A: A circle." and '{"shape":"circle","color":"red","count":1}' in out.stdout
