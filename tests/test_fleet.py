"""Scale-out on Ray Serve (runtime/fleet.py): a local Ray cluster, two edgevlm replicas of the bundled demo model
behind Serve's HTTP proxy, driven with the official openai client.

It checks that the fleet answers as `edgevlm serve` does (JSON and SSE, /v1/models, /health, OpenAI-shaped
errors), that requests about the same image or conversation go to the replica that owns them and hit its image
and prefix caches there, and that different images are spread over both replicas. The cluster is a new local
one (no dashboard, usage statistics off, Serve's proxy on 127.0.0.1) and needs no network: the test passes inside
`unshare -n` with only loopback up. Measured on 2 busy cores: 5-10 s to start Ray, 7-10 s to deploy the three
replicas, ~6 s to shut down; ~30 s in all.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from PIL import Image, ImageDraw

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # before Ray starts: its usage reporting would go online

try:
    import ray
    from ray import serve
except ImportError:  # a missing extra is a failure with the fix in it, never a silent skip
    ray = None

PACKAGE = Path(__file__).resolve().parents[1] / "models" / "demo-shapes"
REPLICAS = 2
COLORS = {"red": (220, 30, 30), "blue": (30, 80, 225), "green": (35, 165, 50), "yellow": (240, 215, 25),
          "purple": (140, 45, 185), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_ray() -> None:
    if ray is None:
        pytest.fail("tests/test_fleet.py needs Ray Serve, which is not installed: "
                    "pip install -c constraints.txt -e '.[fleet]'  (or 'ray[serve]')", pytrace=False)


@pytest.fixture(scope="module")
def fleet():
    _require_ray()
    from edgevlm.runtime.fleet import build

    assert (PACKAGE / "model.json").is_file(), f"the demo package is missing: {PACKAGE}"
    times = {}
    start = time.perf_counter()
    ray.init(address="local", num_cpus=REPLICAS, include_dashboard=False, object_store_memory=200_000_000,
             log_to_driver=False)
    times["ray.init"] = time.perf_counter() - start
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Under a route prefix, as a cluster shared with other applications would put it (the ingress strips it).
        serve.run(build(PACKAGE, replicas=REPLICAS, num_cpus=1, kv_budget_mb=100), name="edgevlm",
                  route_prefix="/edgevlm")
        times["deploy"] = time.perf_counter() - start - times["ray.init"]
        yield f"http://127.0.0.1:{port}/edgevlm"
    finally:
        stop = time.perf_counter()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        times["shutdown"] = time.perf_counter() - stop
        print("fleet timings (s):", {k: round(v, 1) for k, v in times.items()})


@pytest.fixture(scope="module")
def client(fleet):
    return openai.OpenAI(base_url=fleet + "/v1", api_key="unused", max_retries=0, timeout=60)


def _get(url: str, replica: str | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers={"x-edgevlm-replica": replica} if replica else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture(scope="module")
def replica_ids(fleet):
    """Both replicas' ids, from /health answers: requests without an affinity key are balanced over both."""
    seen = []
    for _ in range(60):
        status, headers, body = _get(fleet + "/health")
        assert status == 200 and json.loads(body)["status"] == "ok", body
        seen.append(headers["x-edgevlm-replica"])
        if len(set(seen)) == REPLICAS:
            break
    assert len(set(seen)) == REPLICAS, f"keyless requests all went to {set(seen)}"
    return sorted(set(seen))


def _image(shape: str, color: str, variant: int = 0) -> str:
    """A base64 PNG of one shape on white, as the README draws it; `variant` moves it a little (another image)."""
    image = Image.new("RGB", (200, 200), "white")
    draw = ImageDraw.Draw(image)
    d = variant % 7 - 3
    box = [60 + d, 60 - d, 140 + d, 140 - d]
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(100 + d, 55), (145 + d, 140), (55 + d, 140)], fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _ask(image: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                                         {"type": "text", "text": question}]}]


def _create(client, messages, **kwargs):
    """(answer text, replica id, usage) of a non-streamed request."""
    raw = client.chat.completions.with_raw_response.create(model="demo-shapes", messages=messages, temperature=0,
                                                           max_tokens=20, **kwargs)
    completion = raw.parse()
    assert completion.choices[0].finish_reason == "stop"
    return completion.choices[0].message.content, raw.headers["x-edgevlm-replica"], completion.usage


def _stream(client, messages):
    """(answer text, replica id, usage) of a streamed request."""
    with client.chat.completions.with_streaming_response.create(
            model="demo-shapes", messages=messages, temperature=0, max_tokens=20, stream=True,
            stream_options={"include_usage": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(response.parse())
        replica = response.headers["x-edgevlm-replica"]
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1  # streamed token by token through the proxy, the ingress and the replica
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    return "".join(deltas), replica, chunks[-1].usage


def _image_cache_hits(fleet: str, replica: str) -> float:
    status, headers, body = _get(fleet + "/metrics", replica)
    assert status == 200 and headers["x-edgevlm-replica"] == replica
    line = next(line for line in body.decode().splitlines() if line.startswith("edgevlm_image_cache_hits_total "))
    return float(line.split()[1])


def _key(image: str) -> str:
    from edgevlm.runtime.fleet import affinity_key

    return affinity_key({"messages": _ask(image, "?")})


def test_routes_answer_as_edgevlm_serve_does(fleet, client, replica_ids):
    assert [m.id for m in client.models.list().data] == ["demo-shapes"]
    status, _, body = _get(fleet + "/v1/nowhere")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    with pytest.raises(openai.BadRequestError) as excinfo:  # the replica's own 400, relayed
        client.chat.completions.create(model="demo-shapes", messages=[], temperature=0)
    assert excinfo.value.body["param"] == "messages"


def test_same_image_goes_to_its_replica_and_hits_its_caches(fleet, client, replica_ids):
    from edgevlm.runtime.fleet import owner_order

    image = _image("circle", "red")
    owner = owner_order(_key(image), replica_ids)[0]
    hits_before = _image_cache_hits(fleet, owner)

    text, replica, usage = _create(client, _ask(image, "What shape is in the image?"))
    assert text.strip() == "A circle." and replica == owner
    assert usage.prompt_tokens_details.cached_tokens == 0
    # A new conversation about the same image, streamed: the same replica, which has its features already.
    text, replica, _ = _stream(client, _ask(image, "What color is the shape?"))
    assert text.strip() == "It is red." and replica == owner
    assert _image_cache_hits(fleet, owner) >= hits_before + 1
    # The next turn of the first conversation: the same replica, its prompt's prefix reused from the KV cache.
    turn = _ask(image, "What shape is in the image?") + [
        {"role": "assistant", "content": " A circle."}, {"role": "user", "content": "Describe the image."}]
    text, replica, usage = _stream(client, turn)
    assert text.strip() and replica == owner  # (the demo model was trained on single questions: any answer)
    assert usage.prompt_tokens_details.cached_tokens > 0


def test_different_images_are_spread_over_both_replicas(fleet, client, replica_ids):
    from edgevlm.runtime.fleet import owner_order

    # Two images owned by each replica (rendezvous hashing is deterministic once the replica ids are known).
    chosen = {rid: [] for rid in replica_ids}
    for variant, (shape, color) in enumerate(itertools.product(SHAPES, COLORS)):
        image = _image(shape, color, variant)
        owned = chosen[owner_order(_key(image), replica_ids)[0]]
        if len(owned) < 2:
            owned.append((shape, color, image))
        if all(len(v) == 2 for v in chosen.values()):
            break
    assert all(len(v) == 2 for v in chosen.values()), chosen.keys()
    for owner, images in chosen.items():
        for i, (shape, color, image) in enumerate(images):
            send = _stream if i else _create
            text, replica, _ = send(client, _ask(image, "Describe the image."))
            assert text.strip() == f"A {color} {shape}.", (shape, color, text)
            assert replica == owner


def test_affinity_keys():
    """Offline, no cluster: what the ingress keys requests on, and how keys map onto replicas."""
    _require_ray()
    from edgevlm.runtime.fleet import affinity_key, owner_order

    red, blue = _image("circle", "red"), _image("square", "blue")
    key = affinity_key({"messages": _ask(red, "What shape?")})
    assert key.startswith("image:")
    # The same image under another question, a bare base64 payload, another detail, later turns: the same key.
    assert affinity_key({"messages": [{"role": "system", "content": "Be brief."}] + _ask(red, "What color?")}) == key
    bare = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": red, "detail": "low"}}]}]
    assert affinity_key({"messages": bare}) == key
    assert affinity_key({"messages": _ask(blue, "What shape?")}) != key
    text = {"messages": [{"role": "user", "content": "Hello"}]}
    follow = {"messages": text["messages"] + [{"role": "assistant", "content": "Hi"},
                                              {"role": "user", "content": "And?"}]}
    assert affinity_key(text).startswith("text:") and affinity_key(follow) == affinity_key(text)
    assert affinity_key({"messages": "nope"}) is None and affinity_key([]) is None
    broken = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 42}}]}]
    assert affinity_key({"messages": broken}) is None  # the replica answers its 400, wherever it lands

    replicas = [f"r{i}" for i in range(4)]
    keys = [f"text:{i}" for i in range(400)]
    owners = {k: owner_order(k, replicas)[0] for k in keys}
    assert all(list(owners.values()).count(r) > 50 for r in replicas)  # spread
    grown = {k: owner_order(k, replicas + ["r4"])[0] for k in keys}
    assert all(grown[k] in (owners[k], "r4") for k in keys)  # a new replica takes keys, moves no others
    shrunk = {k: owner_order(k, replicas[1:])[0] for k in keys}
    assert all(shrunk[k] == owners[k] for k in keys if owners[k] != "r0")  # only r0's keys move


def test_a_client_that_goes_away_cancels_its_generation_on_the_replica(fleet, replica_ids):
    """Closing the connection mid-stream reaches the replica's server through the proxy, the ingress and the relay:
    it counts the request cancelled (and stops its generation at the next step, as `edgevlm serve` does); had any
    hop kept reading, the server would have written the whole answer and counted it completed."""
    import http.client
    from urllib.parse import urlparse

    from edgevlm.runtime.fleet import affinity_key, owner_order

    # End-of-sequence tokens banned and no max_tokens: the answer runs to the end of the context (~500 tokens, with
    # 20 logprobs each: ~1 s through the fleet, against ~0.03 s to the first token).
    body = {"model": "demo-shapes", "stream": True, "temperature": 0, "logit_bias": {"2": -100, "42": -100},
            "logprobs": True, "top_logprobs": 20, "messages": [{"role": "user", "content": "Hello, who are you?"}]}
    owner = owner_order(affinity_key(body), replica_ids)[0]
    before = json.loads(_get(fleet + "/health", owner)[2])
    url = urlparse(fleet)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    started = time.perf_counter()
    conn.request("POST", url.path + "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.headers["x-edgevlm-replica"] == owner
    lines = 0
    while lines < 3:  # the role chunk and two tokens
        lines += response.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    for _ in range(100):
        after = json.loads(_get(fleet + "/health", owner)[2])
        if after["requests"] == 0 and after["admitted"] > before["admitted"]:
            break
        time.sleep(0.1)
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"], (
        before, after, time.perf_counter() - started)
