"""The bundled demo model served end to end: `edgevlm serve` with no --model, the official `openai` client.

Held-out questions are generated with a seed used nowhere else (training 1234, its progress set 99000001, the
benchmark 20261125, tests/test_demo_model.py 4242) and sent as a client sends them: base64 PNG data URLs,
temperature 0. Messages and scoring come from benchmarks/demo_accuracy.py (the same normalisation).
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
