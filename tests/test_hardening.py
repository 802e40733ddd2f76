"""The server under hostile but honest clients: stalled readers, costly requests, huge bodies and images, signals,
malformed JSON, and the newcomer's mistakes. Each test drives a real `edgevlm serve` process over raw sockets or
the official client, and would fail on the server as it was before these limits existed.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import openai
import pytest
from PIL import Image, ImageDraw

from edgevlm.runtime.package import ModelPackage
from test_server import raw, sse_events

HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def no_eos(tiny_package) -> dict:
    """A logit_bias that bans the end of sequence: a generation then runs to max_tokens."""
    return {str(token): -100 for token in ModelPackage.load(tiny_package).tokens["eos_token_ids"]}


def address(server) -> tuple[str, int]:
    url = urlparse(server.url)
    return url.hostname, url.port


def health(server) -> dict:
    return json.loads(raw(server, "GET", "/health")[2])


def wait_for_health(server, done, timeout: float = 60.0) -> dict:
    """Poll /health (each poll a round trip, no sleeping) until `done(health)`; the last answer either way."""
    deadline = time.monotonic() + timeout
    state = health(server)
    while not done(state) and time.monotonic() < deadline:
        state = health(server)
    return state


def quiet(server) -> bool:
    """Nothing the clients did made the server log an error of its own."""
    return not any("Traceback" in line or "Error handling request" in line for line in server.lines)


def adds_up(state: dict) -> bool:
    return state["admitted"] == state["completed"] + state["cancelled"] + state["failed"] + state["requests"]


def send_request(server, body: dict | bytes, *, rcvbuf: int | None = None, headers: dict | None = None,
                 send_body: bool = True) -> socket.socket:
    """Send one POST /v1/chat/completions on a fresh socket and return the socket, response unread."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window stays small
    sock.settimeout(60)
    sock.connect(address(server))
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = {"Host": "x", "Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
    sock.sendall(("POST /v1/chat/completions HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
                  + "\r\n").encode() + (data if send_body else b""))
    return sock


def read_status(sock: socket.socket) -> tuple[int, bytes]:
    """The status code and everything the server sent until it closed or the headers and some body arrived."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    return int(data.split(b" ", 2)[1]), data


def error_of(payload: bytes) -> dict:
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def proc_status(server, field: str) -> int:
    """A /proc/PID/status figure of the server process, in kB (VmRSS now, VmHWM the peak)."""
    for line in open(f"/proc/{server.proc.pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


# ------------------------------------------------------------------------------------------- stalled clients


def test_a_client_that_stops_reading_is_dropped_and_its_place_freed(start_server):
    server = start_server("--max-queue", "2", "--write-timeout", "1")
    # Two streams whose clients never read: ~2 MB of events each (20 top logprobs a token) fill every buffer.
    stalled = [send_request(server, {"messages": HELLO, "max_tokens": 1500, "stream": True, "temperature": 0,
                                     "logprobs": True, "top_logprobs": 20}, rcvbuf=4096) for _ in range(2)]
    state = wait_for_health(server, lambda s: s["requests"] == 2)
    assert state["requests"] == 2
    # They hold both places for now ...
    status, _, _ = raw(server, "POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
    if status == 429:
        # ... and after the write timeout they are dropped, their generations cancelled, their places free.
        state = wait_for_health(server, lambda s: s["requests"] == 0)
    assert state["requests"] == 0 and state["cancelled"] == 2 and adds_up(state)
    status, _, payload = raw(server, "POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
    assert status == 200 and json.loads(payload)["usage"]["completion_tokens"] == 2
    for sock in stalled:  # what they get, if they ever read, is a connection cut short: never [DONE]
        sock.settimeout(5)
        received = b""
        try:
            while part := sock.recv(1 << 20):
                received += part
        except (ConnectionResetError, TimeoutError):
            pass
        assert b"data: [DONE]" not in received
        sock.close()
    assert quiet(server)


def test_abandoned_requests_keep_the_health_counters_consistent(start_server):
    server = start_server()
    for stream in (False, True, False):
        send_request(server, {"messages": HELLO, "max_tokens": 1900, "stream": stream}).close()  # gone at once
    state = wait_for_health(server, lambda s: s["requests"] == 0 and s["admitted"] == 3)
    assert state["admitted"] == 3 and state["requests"] == 0 and adds_up(state)
    assert state["cancelled"] >= 1 and quiet(server)


# ------------------------------------------------------------------------------------------- costly requests


@pytest.mark.parametrize("body, param, fragment", [
    ({"n": 128, "max_tokens": 500}, "n", "--max-n"),
    ({"n": 8, "max_tokens": 500}, "max_tokens", "--max-request-tokens"),
])
def test_a_request_that_would_hold_the_worker_is_refused_at_once(server, body, param, fragment):
    status, _, payload = raw(server, "POST", "/v1/chat/completions", {"messages": HELLO, **body})
    assert status == 400
    error = error_of(payload)
    assert error["param"] == param and fragment in error["message"]
    assert health(server)["requests"] == 0  # nothing was left running


def test_the_kv_cache_budget(start_server, no_eos):
    # The tiny model's KV cache is 512 bytes a position (2 layers × 2 × 2 heads × 16 × fp32): 0.5 MB holds 976,
    # 488 for each of two slots.
    server = start_server("--kv-budget-mb", "0.5", "--max-batch", "2")
    status, _, payload = raw(server, "POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 500})
    assert status == 400
    error = error_of(payload)
    assert error["param"] == "max_tokens" and "--kv-budget-mb" in error["message"]
    status, _, payload = raw(server, "POST", "/v1/chat/completions", {"messages": HELLO, "n": 3})
    assert status == 400 and error_of(payload)["param"] == "n" and "--max-batch" in error_of(payload)["message"]
    # Left to the server, max_tokens becomes what the budget holds, and the answer says it was cut by length.
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    response = client.chat.completions.create(model="m", messages=HELLO, temperature=0, logit_bias=no_eos)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens + response.usage.completion_tokens == 500_000 // 512 // 2


def test_a_huge_prompt_is_refused_before_it_is_tokenized(start_server):
    server = start_server("--max-body-mb", "30")
    before = proc_status(server, "VmHWM")
    status, _, payload = raw(server, "POST", "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "word " * 3_600_000}]})  # 18 MB
    assert status == 400
    error = error_of(payload)
    assert error["code"] == "context_length_exceeded" and "characters" in error["message"]
    # Tokenizing it would have taken ~2 GB; parsing the body takes a few times its size.
    assert proc_status(server, "VmHWM") - before < 300_000
    status, _, _ = raw(server, "POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
    assert status == 200


# --------------------------------------------------------------------------------------- bodies and images


def test_admission_is_decided_before_a_body_is_read(start_server):
    server = start_server("--max-pending-body-mb", "32", "--read-timeout", "2")
    # Six clients declare 15 MB bodies and send nothing yet: two fit the 32 MB budget, the rest are turned away
    # without a byte of their bodies read.
    body = b" " * 15_000_000
    socks = [send_request(server, body, send_body=False) for _ in range(6)]
    waiting, refused = [], []
    state = wait_for_health(server, lambda s: s["requests"] + s["rejected"] == 6)
    assert state["requests"] == 2 and state["rejected"] == 4
    for sock in socks:
        sock.settimeout(0.5)
        try:
            status, data = read_status(sock)
        except TimeoutError:
            waiting.append(sock)
            continue
        assert status == 429 and b"Retry-After: 1" in data
        refused.append(sock)
    assert len(waiting) == 2 and len(refused) == 4
    for sock in waiting:  # their bodies never come: 408 after --read-timeout, and the places are free again
        sock.settimeout(30)
        status, data = read_status(sock)
        assert status == 408 and b"request_timeout" in data
    for sock in socks:
        sock.close()
    state = wait_for_health(server, lambda s: s["requests"] == 0)
    assert state["requests"] == 0 and state["failed"] == 2 and adds_up(state) and quiet(server)


def test_a_declared_body_over_the_limit_is_refused_unread_in_the_flags_unit(server):
    sock = send_request(server, b" " * 25_000_000, send_body=False)
    status, data = read_status(sock)
    sock.close()
    assert status == 413
    assert b"the limit is 20 MB (edgevlm serve --max-body-mb)" in data


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def big_image(mode: str) -> Image.Image:
    image = Image.new(mode, (6000, 6000), (255, 255, 255, 0) if mode == "RGBA" else "white")
    ImageDraw.Draw(image).ellipse([1000, 1000, 5000, 5000], fill=(220, 30, 30, 200) if mode == "RGBA" else "red")
    return image


def test_large_images_are_decoded_one_at_a_time_and_their_memory_returned(start_server):
    server = start_server("--max-request-image-mp", "600")
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=300)
    client.chat.completions.create(model="m", messages=HELLO, max_tokens=1)  # warm: the baseline is a served one
    rss, peak = proc_status(server, "VmRSS"), proc_status(server, "VmHWM")

    def ask(uri: str, count: int) -> None:
        part = {"type": "image_url", "image_url": {"url": uri, "detail": "low"}}
        response = client.chat.completions.create(model="m", max_tokens=2, messages=[
            {"role": "user", "content": [part] * count + [{"type": "text", "text": "What is it?"}]}])
        assert response.usage.prompt_tokens_details.image_tokens == 16 * count

    ask(png_data_uri(big_image("RGB")), 16)  # 16 × 36 MP: 1.7 GB of pixels if all were held at once
    # One 6000×6000 RGB image (108 MB) and its reductions at a time; measured ~250 MB over the baseline.
    assert proc_status(server, "VmHWM") - max(rss, peak) < 450_000
    assert proc_status(server, "VmRSS") - rss < 60_000  # what stays once answered
    ask(png_data_uri(big_image("RGBA")), 1)  # 36 MP with transparency: 144 MB decoded, composited in bands
    assert proc_status(server, "VmHWM") - max(rss, peak) < 450_000
    assert proc_status(server, "VmRSS") - rss < 60_000


def test_the_request_pixel_budget_is_checked_before_each_image_is_decoded(server):
    part = {"type": "image_url", "image_url": {"url": png_data_uri(big_image("RGB")), "detail": "low"}}
    status, _, payload = raw(server, "POST", "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": [part] * 16}], "max_tokens": 1})
    assert status == 400
    error = error_of(payload)
    assert error["code"] == "invalid_image"
    assert error["message"].startswith(
        "image 6: 6000×6000 takes the request's images past their total limit of 200 MP")


# ------------------------------------------------------------------------------------------------- shutdown


def open_stream(server, rcvbuf: int | None = None, **body) -> tuple[socket.socket, "io.BufferedReader"]:
    sock = send_request(server, {"messages": HELLO, "stream": True, "temperature": 0, **body}, rcvbuf=rcvbuf)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"HTTP/1.1 200")
    return sock, reader


def read_events(reader) -> list[str]:
    """The rest of a chunked SSE response, decoded (fails on a broken transfer encoding)."""
    while reader.readline() not in (b"\r\n", b""):  # the rest of the headers
        pass
    payload = b""
    while True:
        size = int(reader.readline().split(b";")[0], 16)
        chunk = reader.read(size + 2)
        assert chunk.endswith(b"\r\n"), "broken chunked encoding"
        if size == 0:
            return sse_events(payload)
        payload += chunk[:-2]


def test_shutdown_cuts_a_stream_with_an_error_event_and_never_a_finish(start_server, no_eos):
    server = start_server("--shutdown-timeout", "0.01")
    sock, reader = open_stream(server, max_tokens=1900, logit_bias=no_eos)
    events = []
    reading = threading.Thread(target=lambda: events.extend(read_events(reader)))
    reading.start()  # read as fast as it comes: the generation, not the client, is what SIGTERM cuts
    server.proc.send_signal(signal.SIGTERM)
    reading.join(60)
    sock.close()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
    chunks = [json.loads(e) for e in events[:-2]]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks) and "usage" not in chunks[-1]
    assert server.wait() == 0 and quiet(server)  # the signal it was sent: a clean exit


def test_shutdown_cuts_the_openai_client_and_queued_requests_honestly(start_server, no_eos):
    server = start_server("--shutdown-timeout", "0.01", "--max-batch", "1")  # one slot: the others wait
    cut = {}
    first_chunk = threading.Event()

    def stream_with_openai():  # the official client must raise, not return the partial text as an answer
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        chunks = []
        try:
            for chunk in client.chat.completions.create(model="m", messages=HELLO, max_tokens=1900, stream=True,
                                                        temperature=0, logit_bias=no_eos):
                chunks.append(chunk)
                first_chunk.set()
        except openai.APIError as exc:
            cut["error"] = exc
        cut["finish_reasons"] = [c.choices[0].finish_reason for c in chunks if c.choices]
        first_chunk.set()

    streaming = threading.Thread(target=stream_with_openai)
    streaming.start()
    assert first_chunk.wait(60)
    queued = [send_request(server, {"messages": HELLO, "max_tokens": 5, "stream": stream}) for stream in (True, False)]
    wait_for_health(server, lambda s: s["requests"] == 3)  # both wait behind the running stream
    server.proc.send_signal(signal.SIGTERM)
    streaming.join(60)
    assert "error" in cut and "shutting down" in str(cut["error"]) and set(cut["finish_reasons"]) == {None}
    for sock in queued:
        status, data = read_status(sock)
        assert status == 503 and b"server_shutting_down" in data
        sock.close()
    assert server.wait() == 0 and quiet(server)  # the signal it was sent: a clean exit


def test_shutdown_lets_running_requests_finish_and_refuses_new_ones(start_server, no_eos):
    server = start_server("--shutdown-timeout", "60")
    # Not read until the server drains: ~1.5 MB of events through a small window, so it is still running then.
    sock, reader = open_stream(server, rcvbuf=4096, max_tokens=1000, logprobs=True, top_logprobs=20,
                               logit_bias=no_eos)
    server.proc.send_signal(signal.SIGTERM)
    state = wait_for_health(server, lambda s: s.get("status") == "draining")
    assert state["status"] == "draining" and state["requests"] == 1
    status, _, payload = raw(server, "POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
    assert status == 503 and error_of(payload)["code"] == "server_shutting_down"
    events = read_events(reader)
    sock.close()
    assert events[-1] == "[DONE]" and not any(e.startswith('{"error"') for e in events)
    finals = [c["choices"][0]["finish_reason"] for c in map(json.loads, events[:-1]) if c["choices"]]
    assert finals[-1] == "length" and finals.count("length") == 1
    assert server.wait() == 0 and quiet(server)  # the signal it was sent: a clean exit
    assert any("get up to 60 s to finish" in line for line in server.lines)


# ------------------------------------------------------------------------------------------ malformed bodies


@pytest.mark.parametrize("body, fragment", [
    (b"[" * 10_000 + b"]" * 10_000, "nested too deeply"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}", "too many digits"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"1" * 5000 + b"}", "too many digits"),
    (b'{"messages": [{"role": "user", "content": "a \\ud800 b"}]}', "surrogate"),
    (b'{"model": "\\ud800", "stream": true, "messages": [{"role": "user", "content": "hi"}]}', "surrogate"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "NaN"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "response_format": "text"}',
     "expected an object, got str"),
])
def test_malformed_bodies_get_a_400_not_a_500_or_a_broken_stream(server, body, fragment):
    status, headers, payload = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    assert fragment in error_of(payload)["message"]
    assert raw(server, "POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 1})[0] == 200


# ---------------------------------------------------------------------------------------- newcomer mistakes


def serve_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgevlm.runtime.cli", "serve", *args],
                          capture_output=True, text=True, timeout=120)


def test_a_busy_port_fails_before_the_model_loads(tiny_package):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = serve_command("--model", str(tiny_package), "--port", str(port))
    assert result.returncode == 2
    assert "ready" not in result.stdout and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"edgevlm serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"]


@pytest.mark.parametrize("flag, value", [("--port", "99999"), ("--port", "http"), ("--write-timeout", "-1"),
                                         ("--max-n", "0")])
def test_bad_flags_are_one_error_line(tiny_package, flag, value):
    result = serve_command("--model", str(tiny_package), flag, value)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and flag in errors[0] and repr(value) in errors[0]
