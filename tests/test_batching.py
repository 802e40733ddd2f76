"""The serving engine: requests decoded together give what each gives alone; streams overlap; caches are exact.

Batched runs are compared with a fresh model per request that has a KV slot per choice (so it runs alone, from empty
caches) on the same package. Timing-free: overlap is shown by the order of events, cache use by the counters.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import openai
import pytest

from edgevlm.export.samples import sample_image
from edgevlm.runtime.limits import EngineConfig
from edgevlm.runtime.package import ModelPackage
from edgevlm.runtime.sampling import SamplingParams
from edgevlm.runtime.scheduler import JobEnd
from edgevlm.runtime.vlm import VisionLanguageModel


def png_uri(width: int, height: int, seed: int) -> str:
    buffer = io.BytesIO()
    sample_image(width, height, seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text: str, *images: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def no_eos(tiny_package) -> dict:
    return {token: -100 for token in ModelPackage.load(tiny_package).tokens["eos_token_ids"]}


@pytest.fixture(scope="module", params=["fused", "portable"])
def models(request, tiny_package, tiny_package_portable):
    """(a model with 8 slots, a function that answers one request alone on a fresh model with a slot per choice): one form."""
    path = tiny_package if request.param == "fused" else tiny_package_portable
    batched = VisionLanguageModel.load(path, engine_config=EngineConfig(max_batch=8))

    def alone(messages, params) -> dict[int, list[int]]:
        model = VisionLanguageModel.load(path, engine_config=EngineConfig(max_batch=params.n))
        try:
            tokens: dict[int, list[int]] = {}
            for step in model.generate(model.prepare(messages, params), params):
                tokens.setdefault(step.choice, []).append(step.token)
            return tokens
        finally:
            model.close()

    yield batched, alone
    batched.close()


def run_together(model, requests) -> list[dict[int, list[int]]]:
    """Submit every (messages, params) at once (the engine held meanwhile, so it admits them together); → for
    each request, its tokens by choice."""
    results, done, jobs = [], [], []
    for messages, params in requests:
        tokens: dict[int, list[int]] = {}
        finished = threading.Event()

        def emit(event, tokens=tokens, finished=finished):
            if isinstance(event, JobEnd):
                finished.set()
            elif isinstance(event, Exception):
                tokens["error"] = event
            else:
                tokens.setdefault(event.choice, []).append(event.token)

        results.append(tokens)
        done.append(finished)
        jobs.append((model.prepare(messages, params), params, emit))
    with model.scheduler._lock:
        for prompt, params, emit in jobs:
            model.submit(prompt, params, emit)
    for finished in done:
        assert finished.wait(120)
    return results


def largest_batch_above(model, rows: int) -> bool:
    """Whether some decode step so far ran more than `rows` sequences at once."""
    samples = model.metrics.batch.collect()[0].samples
    count = next(s.value for s in samples if s.name == "edgevlm_decode_batch_size_count")
    at_most = next(s.value for s in samples if s.name == "edgevlm_decode_batch_size_bucket"
                   and s.labels["le"] == str(float(rows)))
    return count > at_most


def test_batched_decoding_gives_the_same_tokens_as_one_at_a_time(models, no_eos):
    batched, alone = models
    red, wide = png_uri(240, 180, seed=3), png_uri(600, 200, seed=8)
    greedy = SamplingParams(temperature=0, max_tokens=24, logit_bias=no_eos)
    # A stop string taken from what the model itself says alone, so that request ends early on a string.
    probe = alone([user("Tell me a story about the sea.")], greedy)[0]
    text = batched.tokenizer.decode(probe)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    requests = [
        ([user("hi")], greedy),
        ([user("Describe the picture in detail, please.", red)], greedy),
        ([user("What is different between these?", red, wide)], SamplingParams(temperature=0, max_tokens=17)),
        ([user("Tell me a story about the sea.")], SamplingParams(temperature=0, max_tokens=24, logit_bias=no_eos,
                                                                   stop=(stop,))),
        ([user("one " * 300)], greedy),  # more than one prefill chunk
        ([user("Name three colours.")], SamplingParams(temperature=1.0, top_p=0.9, seed=5, n=3, max_tokens=20,
                                                       logit_bias=no_eos)),
    ]
    together = run_together(batched, requests)
    for (messages, params), got in zip(requests, together):
        assert "error" not in got
        assert got == alone(messages, params), messages[-1]["content"][-1]["text"][:40]
    assert len(together[3][0]) < 24  # the stop string ended it
    if batched.scheduler.fused:
        assert largest_batch_above(batched, 3)  # they really were decoded together


def test_a_cached_prefix_and_cached_image_give_the_same_answer(models, no_eos):
    batched, alone = models
    image = png_uri(500, 400, seed=21)
    params = SamplingParams(temperature=0, max_tokens=12, logit_bias=no_eos)
    first = [user("What is in this image?", image)]
    answer = {}
    for step in batched.generate(batched.prepare(first, params), params):
        answer.setdefault(step.choice, []).append(step.token)
    hits = batched.metrics.image_hits._value.get()
    follow_up = first + [{"role": "assistant", "content": batched.tokenizer.decode(answer[0])},
                         user("And what colour is it?")]
    prompt = batched.prepare(follow_up, params)
    assert batched.metrics.image_hits._value.get() == hits + 1  # not decoded again
    ends = []
    tokens = {}
    done = threading.Event()

    def emit(event):
        if isinstance(event, JobEnd):
            ends.append(event)
            done.set()
        else:
            tokens.setdefault(event.choice, []).append(event.token)

    encoded = batched.metrics.image_misses._value.get()
    batched.submit(prompt, params, emit)
    assert done.wait(60)
    assert tokens == alone(follow_up, params)
    assert batched.metrics.image_misses._value.get() == encoded  # the vision encoder did not run
    if batched.scheduler.fused:
        # The first turn's prompt and answer were in a slot: all of it but what the template re-renders is reused.
        assert 0 < ends[0].cached_tokens < len(prompt.input_ids)
        assert ends[0].cached_tokens >= len(batched.prepare(first, params).input_ids) - 1
    else:
        assert ends[0].cached_tokens == 0


def test_two_streams_interleave_through_the_server(start_server, no_eos):
    server = start_server()
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    events: list[tuple[str, float]] = []
    lock = threading.Lock()
    started = threading.Barrier(2)

    def stream(name: str):
        started.wait()
        for chunk in client.chat.completions.create(
                model="m", messages=[user(f"Say something, {name}.")], max_tokens=150, temperature=0, stream=True,
                logit_bias={str(k): v for k, v in no_eos.items()}):
            if chunk.choices and chunk.choices[0].delta.content is not None:
                with lock:
                    events.append((name, time.perf_counter()))

    threads = [threading.Thread(target=stream, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    order = [name for name, _ in events]
    # Interleaved: each stream still receives tokens after the other has received some, and neither arrives as
    # one block after the other (a run-one-at-a-time server gives 'aaaa…bbbb…', one switch).
    switches = sum(1 for x, y in zip(order, order[1:]) if x != y)
    assert order.count("a") >= 100 and order.count("b") >= 100
    assert switches >= 10, f"{switches} switches between the streams"


def test_metrics_agree_with_health(start_server):
    server = start_server()
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    image = png_uri(300, 200, seed=4)
    for question in ("What is it?", "What colour?"):
        client.chat.completions.create(model="m", messages=[user(question, image)], max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[user("x")], max_tokens=3, temperature=5)
    import json
    import urllib.request

    health = json.loads(urllib.request.urlopen(server.url + "/health").read())
    response = urllib.request.urlopen(server.url + "/metrics")
    assert response.headers["Content-Type"].startswith("text/plain")
    text = response.read().decode()

    def value(name: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")]
        assert lines, name
        return float(lines[0].rsplit(" ", 1)[1])

    assert value('edgevlm_requests_total{status="completed"}') == health["completed"] == 2
    assert value('edgevlm_requests_total{status="failed"}') == health["failed"] == 1
    assert value("edgevlm_image_cache_hits_total") == 1 and value("edgevlm_image_cache_misses_total") == 1
    assert value("edgevlm_vision_encode_seconds_count") == 1
    assert value("edgevlm_time_to_first_token_seconds_count") == 2
    assert value("edgevlm_kv_slots") == 8 and value("edgevlm_sequences_running") == 0
    assert value("edgevlm_prefill_tokens_total") > 0 and value("edgevlm_decode_tokens_total") > 0


def collect(model, messages, params, log: list, name: str) -> tuple[threading.Event, threading.Event]:
    """Submit one request; its steps go into `log` as (name, step) in the order the engine made them.
    → (set at its first step, set at its end)."""
    started, done = threading.Event(), threading.Event()

    def emit(event):
        if isinstance(event, JobEnd):
            done.set()
        elif not isinstance(event, Exception):
            log.append((name, event))
            started.set()

    model.submit(model.prepare(messages, params), params, emit)
    return started, done


def test_a_short_request_is_not_stuck_behind_an_image_prompt_and_streams_keep_decoding(tiny_package, no_eos):
    model = VisionLanguageModel.load(tiny_package)
    try:
        image = png_uri(900, 700, seed=5)
        tiles = model.prepare([user("Describe it.", image)]).images[0].plan.runs
        assert tiles > 4  # several vision runs: prefill is more than one unit of work
        log: list = []
        decoding, running = collect(model, [user("Keep talking.")], SamplingParams(
            temperature=0, max_tokens=1500, logit_bias=no_eos), log, "running")
        assert decoding.wait(60)
        # Held, the engine takes both requests in one iteration: the short one, admitted second, goes first.
        with model.scheduler._lock:
            _, heavy = collect(model, [user("Describe it.", image)], SamplingParams(temperature=0, max_tokens=2),
                               log, "image")
            _, short = collect(model, [user("Hi")], SamplingParams(temperature=0, max_tokens=2), log, "short")
            mark = len(log)
        for event in (heavy, short, running):
            assert event.wait(120)
        order = [name for name, _ in log[mark:]]
        assert order.index("short") < order.index("image")
        # Between the image request's admission and its first token the running stream kept getting tokens: at
        # least one decode step after each of its vision tiles (the prefill share), not one block at the end.
        assert order[:order.index("image")].count("running") >= tiles
    finally:
        model.close()


def test_the_prefix_cache_stays_within_its_size_and_keeps_the_latest_conversation(tiny_package, no_eos):
    """Idle slots keep what they hold only up to prefix_cache_bytes: older conversations are emptied (their pages
    given back), the latest one still answers its next turn from the cache."""
    probe = VisionLanguageModel.load(tiny_package, engine_config=EngineConfig(max_batch=4))
    per_token = probe.engine.kv_bytes_per_token
    probe.close()
    params = SamplingParams(temperature=0, max_tokens=6, logit_bias=no_eos)
    conversations = [[user(f"Tell me something about the number {i}, at length, in three sentences.")]
                     for i in range(4)]
    model = VisionLanguageModel.load(tiny_package, engine_config=EngineConfig(max_batch=4,
                                     prefix_cache_bytes=45 * per_token))  # one conversation, not two
    try:
        answers = []
        for messages in conversations:
            prompt = model.prepare(messages, params)
            assert 23 < len(prompt.input_ids) + params.max_tokens <= 45
            answers.append(model.tokenizer.decode([step.token for step in model.generate(prompt, params)]))
            held = sum(slot.length for slot in model.scheduler.slots if slot.owner is None)
            assert 0 < held * per_token <= 45 * per_token
        assert model.metrics.prefix_evictions._value.get() == len(conversations) - 1
        follow_up = conversations[-1] + [{"role": "assistant", "content": answers[-1]}, user("Why?")]
        prompt = model.prepare(follow_up, params)
        ends, done = [], threading.Event()

        def emit(event):
            if isinstance(event, JobEnd):
                ends.append(event)
                done.set()

        model.submit(prompt, params, emit)
        assert done.wait(60)
        assert ends[0].cached_tokens > 15  # the latest conversation was kept
        first = model.prepare(conversations[0] + [{"role": "assistant", "content": answers[0]}, user("Why?")], params)
        ends.clear()
        done.clear()
        model.submit(first, params, emit)
        assert done.wait(60)
        assert ends[0].cached_tokens == 0  # the oldest one was emptied
    finally:
        model.close()
