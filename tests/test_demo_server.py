"""The bundled demo model served end to end: `edgevlm serve` with no --model, the official `openai` client.

Held-out questions are generated with a seed used nowhere else (training 1234, its progress set 99000001 and
99000002, the benchmark 20261125 and 20261126, tests/test_demo_model.py 4242) and sent as a client sends them:
base64 PNG data URLs, temperature 0. Messages and scoring come from benchmarks/demo_accuracy.py (the same
normalisation; the JSON questions' response_format and scoring too).
"""

from __future__ import annotations

import http.client
import json
import sys
from pathlib import Path
from urllib.parse import urlparse

import openai
import pytest

from conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "models" / "demo-shapes"
SEED = 777001
N = 140  # 20 per question type
MAX_TOKENS = 40  # as benchmarks/demo_accuracy.py
JSON_SEED = 777002
JSON_N = 100  # one-shape images asked for JSON with the json_schema response_format
JSON_PARSE_N = 8  # of those, asked again through client.chat.completions.parse with a pydantic model


def _demo_accuracy():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import demo_accuracy
    finally:
        sys.path.pop(0)
    return demo_accuracy


@pytest.fixture(scope="module")
def demo_server():
    assert (PACKAGE / "model.json").is_file(), f"the demo package is missing: {PACKAGE}"
    process = ServerProcess()  # no --model: the bundled demo model is the default
    yield process
    assert process.stop() == 0, "".join(process.lines)


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def samples():
    from edgevlm.export.demo.data import eval_samples

    return eval_samples(SEED, N)


@pytest.fixture(scope="module")
def answers(client, samples):
    """The server's non-streamed answer to each held-out sample."""
    messages_for = _demo_accuracy().messages_for
    out = []
    for s in samples:
        response = client.chat.completions.create(model="demo-shapes", messages=messages_for(s), temperature=0,
                                                  max_tokens=MAX_TOKENS)
        assert response.choices[0].finish_reason == "stop", (s.question, response.choices[0].message.content)
        out.append(response.choices[0].message.content)
    return out


def test_serves_the_bundled_model_by_default(demo_server, client):
    url = urlparse(demo_server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("GET", "/health")
    response = conn.getresponse()
    health = json.loads(response.read())
    conn.close()
    assert response.status == 200 and health["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [health["model"]]
    assert str(PACKAGE) in "".join(demo_server.lines)  # "listening on ... (loading <the bundled package>)"


def test_held_out_accuracy_through_the_openai_client(samples, answers):
    from edgevlm.export.demo.data import QTYPES, normalise

    demo_accuracy = _demo_accuracy()
    per = {q: [0, 0] for q in QTYPES}
    errors = []
    for s, text in zip(samples, answers):
        ok = normalise(text) == normalise(s.answer)
        per[s.qtype][0] += ok
        per[s.qtype][1] += 1
        if not ok:
            errors.append((s.qtype, s.question, s.answer, text))
    correct = sum(c for c, _ in per.values())
    assert len(samples) >= 100 and all(t > 0 for _, t in per.values())
    report = demo_accuracy.table({"per_type": per, "overall": (correct, len(samples))})
    assert correct / len(samples) >= 0.90, f"{report}\nerrors (type, question, expected, got): {errors[:10]}"


def test_streamed_answer_equals_the_non_streamed_one(client, samples, answers):
    i = next(i for i, s in enumerate(samples) if s.qtype == "describe" and len(s.scene.shapes) > 1)
    stream = client.chat.completions.create(model="demo-shapes", messages=_demo_accuracy().messages_for(samples[i]),
                                            temperature=0, max_tokens=MAX_TOKENS, stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1  # really streamed, token by token
    assert "".join(deltas) == answers[i]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


@pytest.fixture(scope="module")
def json_samples():
    from edgevlm.export.demo.data import json_eval_samples

    return json_eval_samples(JSON_SEED, JSON_N)


def test_json_schema_answers_through_the_openai_client(client, json_samples):
    """Asked for JSON with a json_schema of enums, the answer is the object for the image ≥ 95% of the time."""
    demo_accuracy = _demo_accuracy()
    both = exact = 0
    errors = []
    for s in json_samples:
        response = client.chat.completions.create(
            model="demo-shapes", messages=demo_accuracy.messages_for(s), temperature=0, max_tokens=MAX_TOKENS,
            response_format=demo_accuracy.RESPONSE_FORMAT)
        choice = response.choices[0]
        assert choice.finish_reason == "stop", (s.question, choice.message.content)
        answer = json.loads(choice.message.content)  # constrained decoding: always valid, compact, schema order
        assert list(answer) == ["shape", "color", "count"] and choice.message.content == json.dumps(
            answer, separators=(",", ":"))
        _, ok, whole = demo_accuracy.score_json(choice.message.content, s)
        both, exact = both + ok, exact + whole
        if not ok:
            errors.append((s.question, s.answer, choice.message.content))
    assert both / len(json_samples) >= 0.95, f"shape + colour right {both}/{len(json_samples)}; wrong: {errors[:10]}"
    assert exact / len(json_samples) >= 0.95, f"exact objects {exact}/{len(json_samples)}; wrong: {errors[:10]}"


def test_json_answers_parse_into_a_pydantic_model(client, json_samples):
    """`client.chat.completions.parse(response_format=<pydantic model>)`: the SDK's own strict schema."""
    from typing import Literal

    from pydantic import BaseModel, Field

    from edgevlm.export.demo.data import COLOR_NAMES, SHAPES

    class ShapeAnswer(BaseModel):
        shape: Literal[SHAPES]  # type: ignore[valid-type]
        color: Literal[COLOR_NAMES]  # type: ignore[valid-type]
        count: int = Field(ge=1, le=3)

    messages_for = _demo_accuracy().messages_for
    right = 0
    for s in json_samples[:JSON_PARSE_N]:
        completion = client.chat.completions.parse(model="demo-shapes", messages=messages_for(s), temperature=0,
                                                   max_tokens=MAX_TOKENS, response_format=ShapeAnswer)
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, ShapeAnswer), completion.choices[0].message.content
        want = json.loads(s.answer)
        right += (parsed.shape, parsed.color, parsed.count) == (want["shape"], want["color"], want["count"])
    assert right >= JSON_PARSE_N - 1, f"{right}/{JSON_PARSE_N} right"


def test_json_readme_example(client):
    """The README's JSON example: a red circle in the middle of a white image, "Answer in JSON." with the schema."""
    from PIL import Image, ImageDraw

    demo_accuracy = _demo_accuracy()
    image = Image.new("RGB", (200, 200), "white")
    ImageDraw.Draw(image).ellipse([60, 60, 140, 140], fill=(220, 30, 30))
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": demo_accuracy.image_url(image)}},
        {"type": "text", "text": "Answer in JSON."}]}]
    response = client.chat.completions.create(model="demo-shapes", messages=messages, temperature=0,
                                              max_tokens=MAX_TOKENS, response_format=demo_accuracy.RESPONSE_FORMAT)
    assert response.choices[0].message.content == '{"shape":"circle","color":"red","count":1}'
    assert response.usage.completion_tokens <= 16  # the tokenizer was trained on the compact JSON: few tokens


def test_langchain_structured_output_and_tools_on_the_demo_model(demo_server, json_samples):
    """LangChain's ChatOpenAI on the demo model: with_structured_output(json_schema) answers right, and a bound
    tool streamed through the openai stream helper comes back as a valid call."""
    import os
    from typing import Literal

    from pydantic import BaseModel

    os.environ["LANGSMITH_TRACING"] = os.environ["LANGCHAIN_TRACING_V2"] = "false"
    from langchain_openai import ChatOpenAI

    from edgevlm.export.demo.data import COLOR_NAMES, SHAPES

    class ShapeAnswer(BaseModel):
        shape: Literal[SHAPES]  # type: ignore[valid-type]
        color: Literal[COLOR_NAMES]  # type: ignore[valid-type]
        count: int

    llm = ChatOpenAI(base_url=demo_server.base_url, api_key="x", model="demo-shapes", temperature=0,
                     max_tokens=MAX_TOKENS, max_retries=0)
    structured = llm.with_structured_output(ShapeAnswer, method="json_schema", strict=True)
    messages_for = _demo_accuracy().messages_for
    samples = json_samples[:JSON_PARSE_N]
    right = sum(structured.invoke(messages_for(s)).model_dump() == json.loads(s.answer) for s in samples)
    assert right >= len(samples) - 1, f"{right}/{len(samples)} right"

    client = openai.OpenAI(base_url=demo_server.base_url, api_key="x", max_retries=0)
    tools = [{"type": "function", "function": {"name": "report_shape", "strict": True, "parameters": {
        "type": "object", "additionalProperties": False, "required": ["shape"],
        "properties": {"shape": {"enum": list(SHAPES)}}}}}]
    with client.chat.completions.stream(model="demo-shapes", messages=messages_for(samples[0]), tools=tools,
                                        tool_choice="required", parallel_tool_calls=False, temperature=0) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls" and call.function.name == "report_shape"
    assert json.loads(call.function.arguments)["shape"] in SHAPES
