"""Fuzzing the real `edgevlm serve` process: hypothesis over request bodies and images, schemathesis over the API.

Whatever a client sends, the server must answer a 4xx with OpenAI's error envelope or a well-formed 200 (JSON, or
server-sent events ending `data: [DONE]` over intact chunked encoding), never a 5xx, and keep serving. Requests go
over http.client, which raises on a broken chunked body; a failure shows the request and what the server logged.
Generations stay a few tokens long (a mutated max_tokens or n comes with a logit_bias that makes the first token end
of sequence, schemathesis' cases are capped), and every run is derandomized and bounded, so CI sees the same cases.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import io
import json
import struct
import time
import zlib
from urllib.parse import urlparse

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from edgevlm import __version__
from edgevlm.runtime import openapi
from edgevlm.runtime.package import ModelPackage

FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_server(start_server):
    """A server of its own, so that what the fuzzing breaks does not spill into other tests."""
    return start_server()


@pytest.fixture(scope="module")
def eos_bias(tiny_package):
    return {str(ModelPackage.load(tiny_package).tokens["eos_token_ids"][-1]): 100}


class Raw(str):
    """JSON text sent as it is: numbers Python cannot hold, nesting deeper than any parser's recursion."""


def dumps(value) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(dumps, value)) + "]"
    return value if isinstance(value, Raw) else json.dumps(value)  # a lone surrogate goes out as "\ud800"


def post(server, body: bytes, encoding: str | None = None):
    """(status, content type, payload, transport error or None) of one POST on a fresh connection."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    headers = {"Content-Type": "application/json", **({"Content-Encoding": encoding} if encoding else {})}
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        response = conn.getresponse()
        ctype = response.getheader("Content-Type", "")
        try:
            return response.status, ctype, response.read(), None
        except (http.client.HTTPException, OSError) as exc:  # IncompleteRead: a chunked body cut short
            return response.status, ctype, b"", exc
    finally:
        conn.close()


def check_answer(server, body: bytes, encoding: str | None = None) -> None:
    mark = len(server.lines)
    status, ctype, payload, broken = post(server, body, encoding)

    def context() -> str:
        seen = -1
        while seen != len(server.lines):  # until the fixture's reader thread has collected what the server printed
            seen = len(server.lines)
            time.sleep(0.03)
        log = "".join(server.lines[mark:])
        return f"\nrequest: {encoding=} {body[:400]!r}\nanswer: {status} {payload[:400]!r}\nserver:\n{log}"

    assert broken is None, f"broken response body ({broken!r})" + context()
    assert status < 500, "server error" + context()
    if status != 200:  # OpenAI's error envelope
        error = json.loads(payload)["error"] if ctype.startswith("application/json") else {}
        assert 400 <= status < 500 and set(error) == {"message", "type", "param", "code"}, context()
        assert all(isinstance(error[k], str) for k in ("message", "type")), context()
        assert all(isinstance(error[k], (str, type(None))) for k in ("param", "code")), context()
    elif ctype.startswith("text/event-stream"):
        text = payload.decode("utf-8")
        assert text.endswith("data: [DONE]\n\n"), "the stream does not end with [DONE]" + context()
        for event in text.split("\n\n")[:-2]:
            assert event.startswith("data: "), f"not an SSE data event: {event[:100]!r}" + context()
            data = json.loads(event[len("data: "):])
            assert data.get("object") == "chat.completion.chunk" or data["error"]["type"] != "server_error", \
                "a server error inside the stream" + context()
    else:
        assert json.loads(payload)["object"] == "chat.completion", context()
    assert server.proc.poll() is None, "the server died" + context()


def assert_still_serving(server) -> None:
    status, _, payload, _ = post(server, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}')
    assert status == 200 and json.loads(payload)["choices"], (status, payload[:300], "".join(server.lines[-40:]))


# ------------------------------------------------------------------------------------------- request bodies

SURROGATES = ["\ud800", "\udfff", "a\ud83db", "\udc00"]
ODD_NUMBERS = [Raw("1" + "0" * 5000), Raw("-" + "9" * 5000), Raw("7" * 4301), Raw("0." + "0" * 5000 + "1"),
               Raw("1e400"), Raw("-1e400"), Raw("1e-400"), Raw("NaN"), Raw("-Infinity"), Raw("-0"), Raw("1.0")]
DEEP = ["[" * 10_000 + "]" * 10_000, '{"a":' * 10_000 + "1" + "}" * 10_000]
# Any text, and now and then a lone surrogate: valid JSON ("\ud800"), but not UTF-8.
odd_text = st.tuples(st.text(max_size=20), st.integers(0, 4), st.sampled_from(SURROGATES)).map(
    lambda t: t[0] + t[2] if t[1] == 3 else t[0])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**80, 2**80), st.floats(), odd_text,
                    st.sampled_from(ODD_NUMBERS + [Raw(d) for d in DEEP]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": odd_text})
arguments = st.one_of(st.sampled_from(['{"a": 1}', "{", "1" + "0" * 5000, *DEEP]), st.text())  # JSON in a string
tool_call = st.fixed_dictionaries({"id": st.text(), "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.text(), "arguments": arguments})})
valid_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
                           "content": st.one_of(odd_text, st.lists(text_part, min_size=1, max_size=2))}),
    st.fixed_dictionaries({"role": st.just("assistant"), "tool_calls": st.lists(tool_call, min_size=1, max_size=2)}))
message = st.one_of(
    valid_message,
    st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant"]), json_values)}, optional={
        "content": st.one_of(st.lists(st.one_of(text_part, json_values, st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "refusal", "image_url", "x"])})), max_size=3), json_values),
        "name": json_values, "tool_calls": json_values, "tool_call_id": json_values}))
# Values each field accepts, or nearly, so that mutations reach past the first check.
PLAUSIBLE = {
    "messages": st.lists(message, min_size=1, max_size=3), "model": odd_text, "user": odd_text,
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "n": st.integers(0, 4), "logprobs": st.booleans(),
    "max_tokens": st.integers(-1, 10**20), "max_completion_tokens": st.integers(-1, 10**20),
    "stop": st.one_of(odd_text, st.lists(odd_text, max_size=5)), "seed": st.integers(-2**65, 2**65),
    "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3), "top_logprobs": st.integers(-1, 21),
    "logit_bias": st.dictionaries(st.one_of(st.integers(-1, 60_000).map(str), odd_text), scalars, max_size=3),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "x"])}),
    "tool_choice": st.sampled_from(["none", "auto", "required", {}, "x"]), "stream_options": json_values,
    "tools": st.lists(st.fixed_dictionaries({"type": st.just("function")}), max_size=2),
}


HI = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2'
TOOL_TURN = '{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": '
KNOWN = {
    "deep-array": DEEP[0], "deep-object": HI + ', "metadata": ' + DEEP[1] + "}",
    "5000-digits": HI + ', "seed": 1' + "0" * 5000 + "}", "nan": HI + ', "top_p": NaN}',
    "surrogate-content": '{"messages": [{"role": "user", "content": "hi\\ud800"}], "max_tokens": 2}',
    "surrogate-model-stream": HI + ', "model": "\\udc00", "stream": true}',
    "surrogate-stop-stream": HI + ', "stop": ["\\ud800"], "stream": true}',
    "deep-tool-arguments": '{"messages": [' + TOOL_TURN + json.dumps(DEEP[0]) + '}}]}], "max_tokens": 2}',
    "gzip-not-gzip": ("gzip", HI + "}"), "deflate-not-deflate": ("deflate", HI + "}"),
}


@pytest.mark.parametrize("case", KNOWN.values(), ids=KNOWN.keys())
def test_known_hard_bodies(fuzz_server, case):
    """Bodies the fuzzing below finds, or found: one test each, so that each is reported apart."""
    encoding, body = case if isinstance(case, tuple) else (None, case)
    check_answer(fuzz_server, body.encode(), encoding)


@st.composite
def mutated_requests(draw, eos_bias: dict) -> bytes:
    """A valid small request with one field replaced, perhaps plus an unknown one, as JSON text."""
    body = {"messages": draw(st.one_of(st.just([{"role": "user", "content": "hi"}]),
                                       st.lists(valid_message, min_size=1, max_size=3))),
            "max_tokens": draw(st.integers(1, 3)), "temperature": draw(st.sampled_from([0, 1])),
            "stream": draw(st.booleans())}
    field = draw(st.sampled_from(sorted(PLAUSIBLE)))
    body[field] = draw(st.one_of(PLAUSIBLE[field], json_values))
    if field in ("max_tokens", "max_completion_tokens", "n"):
        body["logit_bias"] = eos_bias  # however large the limit, the first token ends the answer
    if field == "top_logprobs":
        body["logprobs"] = True
    if draw(st.booleans()):
        body[draw(odd_text)] = draw(json_values)
    return dumps(body).encode()


def test_fuzz_request_bodies(fuzz_server, eos_bias):
    whole_bodies = st.one_of(st.binary(max_size=200), json_values.map(lambda v: dumps(v).encode()),
                             st.sampled_from([b"", b"{", b'{"messages": [', b"\xed\xa0\x80", b"\xff\xfe{}"]))

    # Content-Encoding, honestly applied. (A body that does not decode as it says is in KNOWN: aiohttp's HTTP parser
    # answers some of those itself, in plain text, before the app sees the request; so it does br without Brotli.)
    @settings(max_examples=1200, **FUZZ)
    @given(st.one_of(mutated_requests(eos_bias), mutated_requests(eos_bias), whole_bodies),
           st.sampled_from([None] * 4 + ["gzip", "deflate", "identity"]))
    def run(body, encoding):
        body = {"gzip": gzip.compress, "deflate": zlib.compress}.get(encoding, bytes)(body)
        check_answer(fuzz_server, body, encoding)

    run()
    assert_still_serving(fuzz_server)


# --------------------------------------------------------------------------------------------------- images


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((24, 16), 60).convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def corrupt(data: bytes, changes: list) -> bytes:
    out = bytearray(data)
    for position, value in changes:
        out[position % len(out)] = value
    return bytes(out)


IHDR = b"IHDR" + struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)  # 3.6 gigapixels: a decompression bomb
BOMB = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + IHDR + struct.pack(">I", zlib.crc32(IHDR))
IMAGES = [encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP")]
image = st.sampled_from(IMAGES)
image_bytes = st.one_of(
    image, st.binary(max_size=300), st.sampled_from([b"", BOMB]),
    st.tuples(image, st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])]),  # truncated
    st.tuples(image, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8))
    .map(lambda t: corrupt(*t)),
    st.tuples(st.sampled_from([i[:16] for i in IMAGES + [BOMB]]), st.binary(max_size=200)).map(b"".join),
)
prefix = st.one_of(st.sampled_from(["data:image/png;base64,", "data:image/jpeg;base64,", "data:;base64,", ""]),
                   st.sampled_from(["data:image/svg+xml;base64,", "data:text/html;base64,", "data:image/png,",
                                    "data:image/png;base64", "data:image/png;charset=utf-8;base64,",
                                    "DATA:IMAGE/GIF;BASE64,", "data:\ud800;base64,", "data:image/png;base64,,",
                                    "http://example.com/x.png", "file:///etc/passwd", " data:;base64,"]))
image_url = st.one_of(
    st.tuples(prefix, image_bytes.map(lambda b: base64.b64encode(b).decode())).map("".join),
    st.tuples(prefix, image_bytes.map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("="))).map("".join),
    st.tuples(prefix, st.text(alphabet="AQgw+/=-_ \n\t!é", max_size=60)).map("".join),  # base64 garbage
    st.text())


@st.composite
def image_requests(draw) -> bytes:
    parts = [{"type": "image_url", "image_url": {"url": draw(image_url),
                                                 "detail": draw(st.sampled_from(["auto", "low", "high", None]))}}
             for _ in range(draw(st.integers(1, 2)))]
    return dumps({"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "what is it?"}]}],
                  "max_tokens": 2, "temperature": 0, "stream": draw(st.booleans())}).encode()


def test_fuzz_images(fuzz_server):
    @settings(max_examples=800, **FUZZ)
    @given(image_requests())
    def run(body):
        check_answer(fuzz_server, body)

    run()
    assert_still_serving(fuzz_server)


# ------------------------------------------------------------------------------- schemathesis, from the spec

DOCUMENT = openapi.document(__version__)
schema = schemathesis.openapi.from_dict(DOCUMENT)  # from_url needs a lazy fixture, which pytest 9.2 breaks


@schema.parametrize()
@settings(max_examples=50, **FUZZ)
def test_schemathesis(case, fuzz_server):
    if isinstance(case.body, dict):  # keep generations short: cap the limits the spec lets be large
        limit = "max_completion_tokens" if isinstance(case.body.get("max_completion_tokens"), int) else "max_tokens"
        for name, cap in ((limit, 2), ("n", 2)):
            value = case.body.get(name)
            if (value is None and name == limit) or (isinstance(value, int) and value > cap):
                case.body[name] = cap
    response = case.call_and_validate(base_url=fuzz_server.url, timeout=60, checks=[
        not_a_server_error, response_schema_conformance, status_code_conformance])
    if case.method == "GET" and case.path == "/openapi.json" and response.status_code == 200:
        assert response.json() == json.loads(json.dumps(DOCUMENT))  # the server serves this very document
