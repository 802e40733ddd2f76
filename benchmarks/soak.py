"""Soak test for a running `edgevlm serve`: mixed concurrent traffic for a fixed time, every response checked.

    python benchmarks/soak.py --url http://127.0.0.1:8000 --streams 8 --minutes 10 [--api-key K] [--pid PID]
                              [--out FILE] [--seed S] [--timeout SECONDS]

Each of --streams workers loops until --minutes are up, sending one request at a time from a mix fixed by --seed:
- chat / stream: non-streaming and SSE completions (half the streams ask for stream_options.include_usage), text
  only or with a small PNG (coloured shapes on white, as a base64 data URI, sometimes with detail "low"), n=1 or 2,
  max_tokens 4-64, temperature 0 or 0.8 with a seed, sometimes stop strings. One in five repeats an earlier request
  (streamed or not): greedy and seeded requests must give the same text again.
- bad: invalid JSON, undecodable image base64, temperature 5 (some with stream=true): must answer 400 with an
  OpenAI error body {"error": {"message", "type", ...}}.
- disconnect: a stream the client drops after its first content token.

A 200 JSON answer needs n choices, each with a string message and finish_reason stop or length, and usage within
n * max_tokens; a stream needs `data: {json}` events ending with `data: [DONE]`, exactly one finish_reason per
choice, no error event, and a usage chunk exactly when asked. No text may contain one of its stop strings. Any
other outcome is an error, counted by category: 5xx, wrong status, bad body, malformed stream, error event,
inconsistent, timeout, connection error. Keep --streams at or below the server's --max-queue (default 16): 429s
count as wrong status.

The server's RSS (VmRSS from /proc/PID/status) is sampled every 2 s; PID is --pid, or the process listening on the
URL's port when the URL is loopback. The slope is a least-squares fit over the second half of the run (past
warm-up). Completion tokens are usage's (streams without usage: their content chunks, about one per token).
Workers start no request past --minutes; one in flight then ends within --timeout. The report is a markdown table
(also written to --out), then up to 3 errors of each category with the request that got them.
Exit status: 0 without errors, 1 with any, 2 when the server is not ready. Connects to --url only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import hashlib
import io
import json
import os
import random
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from PIL import Image, ImageDraw

KINDS = {"chat": 40, "stream": 40, "bad": 10, "disconnect": 10}  # weights of the mix
FINISH_REASONS = ("stop", "length")
MAX_TOKENS = (4, 8, 16, 32, 48, 64)
STOPS = (["."], ["\n"], ["is", "the"], [" a"])
TEXT_PROMPTS = ("Hello!", "What can you do?", "Tell me about shapes.", "Say something short.", "Count to five.")
IMAGE_PROMPTS = ("What shape is in the image?", "What color is the shape?", "Describe the image.",
                 "How many shapes are there?")
COLOURS = ((220, 30, 30), (30, 80, 225), (35, 165, 50), (240, 215, 25), (140, 45, 185), (15, 15, 15))
RSS_EVERY_S = 2.0
SHOWN_ERRORS = 3  # examples in the report, per category


class Failure(Exception):
    """A response that breaks the contract: `category` is the report's row, `detail` says what was seen."""

    def __init__(self, category: str, detail: str):
        super().__init__(f"{category}: {detail}")
        self.category, self.detail = category, detail


class Invalid(ValueError):
    """A field of a response that is not what the API promises (`need` raises it; turned into a Failure)."""


def need(ok, what: str) -> None:
    if not ok:
        raise Invalid(what)


def shape_images(count: int = 6, seed: int = 0) -> list[str]:
    """Small PNGs in the demo model's domain (1-2 coloured ellipses or rectangles on white) as data URIs."""
    rng, uris = random.Random(seed), []
    for _ in range(count):
        w, h = rng.choice(((96, 96), (128, 96), (160, 160), (96, 192)))
        image = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 2)):
            x, y = rng.randrange(w // 2), rng.randrange(h // 2)
            box = (x, y, x + rng.randint(w // 4, w // 2), y + rng.randint(h // 4, h // 2))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=rng.choice(COLOURS))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        uris.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return uris


class Request:
    """One request of the mix: its body (a dict, or raw bytes for invalid JSON) and what to expect of it."""

    def __init__(self, kind: str, body, tags: list[str], expect: tuple[int, str | None] | None = None):
        self.kind, self.body, self.tags, self.expect = kind, body, tags, expect
        params = body if isinstance(body, dict) else {}
        self.n, self.max_tokens = params.get("n", 1), params.get("max_tokens", 0)
        self.stops = params.get("stop", [])
        self.usage = bool(params.get("stream_options", {}).get("include_usage"))
        same = {k: v for k, v in params.items() if k not in ("stream", "stream_options")}
        self.key = hashlib.sha1(json.dumps(same, sort_keys=True).encode()).hexdigest() if kind != "bad" else None

    def data(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()

    def summary(self) -> str:
        """The request as sent, long image data URIs shortened, for the error list."""
        text = self.data().decode("utf-8", "replace")
        return f"{self.kind}: " + re.sub(r"(data:image/png;base64,.{20})[^\"]{40,}", r"\1...", text)[:600]


class Soak:
    def __init__(self, args, model: str | None):
        self.args, self.model = args, model
        self.endpoint = args.url.rstrip("/") + "/v1/chat/completions"
        self.timeout = aiohttp.ClientTimeout(total=args.timeout)
        self.images = shape_images()
        self.seen: list[dict] = []  # params of earlier completions, for repeats
        self.texts: dict[str, list[str]] = {}  # request key -> texts its first answer gave
        self.sent, self.tags = Counter(), defaultdict(Counter)
        self.completed, self.errors, self.examples = 0, Counter(), defaultdict(list)
        self.latency, self.ttft = defaultdict(list), []
        self.tokens, self.repeats_checked = 0, 0
        self.rss: list[tuple[float, float]] = []

    # ------------------------------------------------------------------------------------------------- the mix
    def make_request(self, rng: random.Random) -> Request:
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        if kind == "bad":
            return self.bad_request(rng)
        repeat = bool(self.seen) and rng.random() < 0.2
        params = copy.deepcopy(rng.choice(self.seen)) if repeat else self.fresh_params(rng)
        if not repeat and len(self.seen) < 200:
            self.seen.append(copy.deepcopy(params))
        content = params["messages"][0]["content"]
        tags = [t for t, on in (("image", isinstance(content, list)), ("n=2", params["n"] == 2),
                                ("stop", "stop" in params), ("sampled", params["temperature"] > 0),
                                ("repeat", repeat)) if on]
        if kind != "chat":
            params["stream"] = True
            if kind == "disconnect":
                params["max_tokens"] = 64
            elif rng.random() < 0.5:
                params["stream_options"] = {"include_usage": True}
                tags.append("usage")
        return Request(kind, params, tags)

    def fresh_params(self, rng: random.Random) -> dict:
        if rng.random() < 0.5:
            image = {"url": rng.choice(self.images), **({"detail": "low"} if rng.random() < 0.5 else {})}
            content = [{"type": "image_url", "image_url": image}, {"type": "text", "text": rng.choice(IMAGE_PROMPTS)}]
        else:
            content = rng.choice(TEXT_PROMPTS)
        params = {"messages": [{"role": "user", "content": content}], "max_tokens": rng.choice(MAX_TOKENS),
                  "n": rng.choice((1, 1, 2)), "temperature": rng.choice((0, 0.8))}
        if self.model:
            params["model"] = self.model
        if params["temperature"]:
            params["seed"] = rng.randrange(3)
        if rng.random() < 0.3:
            params["stop"] = rng.choice(STOPS)
        return params

    def bad_request(self, rng: random.Random) -> Request:
        what = rng.choice(("invalid json", "bad image base64", "temperature 5"))
        if what == "invalid json":
            return Request("bad", rng.choice((b'{"messages": [', b"not json at all")), [what], (400, None))
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": rng.random() < 0.5}
        if what == "temperature 5":
            return Request("bad", {**body, "temperature": 5}, [what], (400, "temperature"))
        junk = rng.choice(("!!!not base64!!!", base64.b64encode(b"these bytes are not a PNG").decode()))
        body["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + junk}},
                                          {"type": "text", "text": "What is this?"}]
        return Request("bad", body, [what], (400, "messages"))

    # --------------------------------------------------------------------------------------------- the checks
    async def send(self, session: aiohttp.ClientSession, req: Request, start: float):
        """(texts, completion tokens, time to first token) of a valid answer; raises Failure otherwise."""
        try:
            async with session.post(self.endpoint, data=req.data(), timeout=self.timeout) as resp:
                if req.kind == "bad":
                    return await check_error(req, resp)
                if resp.status != 200:
                    raise status_failure(resp.status, await resp.text(errors="replace"))
                if req.kind == "chat":
                    return check_completion(req, await resp.read())
                return await check_stream(req, resp, start)
        except TimeoutError:
            raise Failure("timeout", f"no complete answer within {self.args.timeout:g} s") from None
        except ValueError as exc:  # what aiohttp raises for an SSE line past its buffer
            raise Failure("malformed stream" if req.kind != "chat" else "bad body", repr(exc)) from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise Failure("connection error", repr(exc)) from None

    async def worker(self, session: aiohttp.ClientSession, rng: random.Random, deadline: float) -> None:
        while time.monotonic() < deadline:
            req = self.make_request(rng)
            self.sent[req.kind] += 1
            self.tags[req.kind].update(req.tags)
            start = time.monotonic()
            try:
                texts, tokens, ttft = await self.send(session, req, start)
                self.check_repeat(req, texts)
            except Failure as failure:
                self.errors[failure.category] += 1
                if len(self.examples[failure.category]) < SHOWN_ERRORS:
                    self.examples[failure.category].append(f"- **{failure.category}**: {failure.detail}\n"
                                                           f"  request: `{req.summary()}`")
                if failure.category == "connection error":
                    await asyncio.sleep(1)  # the server may be down: do not spin
                continue
            self.completed += 1
            if req.kind in ("chat", "stream"):
                self.latency[req.kind].append(time.monotonic() - start)
                self.tokens += tokens
                if ttft is not None:
                    self.ttft.append(ttft)

    def check_repeat(self, req: Request, texts: list[str] | None) -> None:
        if texts is None or req.key is None:
            return
        first = self.texts.setdefault(req.key, texts)
        if first is not texts:
            self.repeats_checked += 1
            if first != texts:
                raise Failure("inconsistent", f"the same greedy/seeded request gave {texts!r}, earlier {first!r}")

    # ---------------------------------------------------------------------------------------------- RSS, report
    async def sample_rss(self, pid: int, t0: float) -> None:
        while (rss := read_rss_mb(pid)) is not None:
            self.rss.append((time.monotonic() - t0, rss))
            await asyncio.sleep(RSS_EVERY_S)
        print(f"soak: process {pid} is gone; RSS sampling stopped", file=sys.stderr)

    def report(self, duration: float, health) -> str:
        def row(name: str, value) -> str:
            return f"| {name} | {value} |"

        lines = [f"## edgevlm soak: {self.args.url}, {self.args.streams} streams, {self.args.minutes:g} min", "",
                 "| metric | value |", "|---|---|", row("duration", f"{duration:.1f} s")]
        for kind in KINDS:
            tags = ", ".join(f"{t} {c}" for t, c in sorted(self.tags[kind].items()))
            lines.append(row(f"requests: {kind}", f"{self.sent[kind]}" + (f" ({tags})" if tags else "")))
        lines.append(row("completed (valid)", f"{self.completed} / {sum(self.sent.values())}"))
        lines.append(row("errors", sum(self.errors.values())))
        lines += [row(f"errors: {c}", n) for c, n in sorted(self.errors.items())]
        for name, values in (("latency chat", self.latency["chat"]), ("latency stream", self.latency["stream"]),
                             ("time to first token (stream)", self.ttft)):
            lines.append(row(f"{name} p50 / p95", percentiles(values)))
        lines.append(row("repeats with identical text", self.repeats_checked))
        lines.append(row("completion tokens/s (all workers)", f"{self.tokens / duration:.1f} ({self.tokens} tokens)"))
        if self.rss:
            values = [r for _, r in self.rss]
            lines.append(row("server RSS start / max / end",
                             f"{values[0]:.1f} / {max(values):.1f} / {values[-1]:.1f} MB"))
            half = [(t, r) for t, r in self.rss if t >= duration / 2]
            slope = statistics.linear_regression(*zip(*half)).slope * 60 if len(half) >= 3 else None
            lines.append(row("RSS slope, second half", "too few samples" if slope is None else
                             f"{slope:+.2f} MB/min ({len(half)} samples)"))
        else:
            lines.append(row("server RSS", "not sampled (no PID)"))
        lines.append(row("/health at the end", f"`{json.dumps(health)}`"))
        if self.examples:
            lines += ["", f"### errors (at most {SHOWN_ERRORS} of each category)"]
            lines += [example for category in sorted(self.examples) for example in self.examples[category]]
        return "\n".join(lines) + "\n"


async def check_error(req: Request, resp: aiohttp.ClientResponse):
    status, param = req.expect
    text = await resp.text(errors="replace")
    if resp.status != status:
        raise status_failure(resp.status, text)
    try:
        error = json.loads(text)["error"]
        need(isinstance(error["message"], str) and isinstance(error["type"], str), "message and type")
    except (ValueError, KeyError, TypeError):
        raise Failure("bad body", f"HTTP {resp.status} without an OpenAI error body: {text[:200]!r}") from None
    if param and error.get("param") != param:
        raise Failure("bad body", f"error param {error.get('param')!r}, expected {param!r}: {text[:200]}")
    return None, 0, None


def check_completion(req: Request, raw: bytes):
    try:
        body = json.loads(raw)
        texts = [None] * req.n
        for choice in body["choices"]:
            need(choice["finish_reason"] in FINISH_REASONS, f"finish_reason {choice['finish_reason']!r}")
            index = choice["index"]
            need(0 <= index < req.n and texts[index] is None, f"choice index {index!r} for n={req.n}")
            need(isinstance(choice["message"]["content"], str), "message.content is not a string")
            texts[index] = choice["message"]["content"]
        tokens = body["usage"]["completion_tokens"]
        need(None not in texts, "a choice is missing")
        need(isinstance(tokens, int) and 0 <= tokens <= req.n * req.max_tokens, f"completion_tokens {tokens}")
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise Failure("bad body", f"{type(exc).__name__} {exc} in {raw[:300]!r}") from None
    check_stops(req, texts, "bad body")
    return texts, tokens, None


async def check_stream(req: Request, resp: aiohttp.ClientResponse, start: float):
    if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
        raise Failure("malformed stream", f"Content-Type {resp.headers.get('Content-Type')!r}")
    texts, finished, usage, done, ttft, pieces = [""] * req.n, [None] * req.n, None, False, None, 0
    async for data in sse_events(resp.content):
        if done:
            raise Failure("malformed stream", f"event after [DONE]: {data[:200]}")
        if data == "[DONE]":
            done = True
            continue
        try:
            chunk = json.loads(data)
            if "error" in chunk:
                raise Failure("error event", data[:300])
            need(chunk["object"] == "chat.completion.chunk", f"object {chunk['object']!r}")
            if chunk.get("usage") is not None:
                need(req.usage and usage is None and chunk["choices"] == [], "unexpected usage chunk")
                usage = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                i = choice["index"]
                need(0 <= i < req.n and finished[i] is None, f"choice {i} after its finish_reason or out of range")
                if choice["delta"].get("content"):
                    texts[i] += choice["delta"]["content"]
                    pieces += 1
                    ttft = time.monotonic() - start if ttft is None else ttft
                    if req.kind == "disconnect":
                        resp.close()  # drop the connection mid-stream
                        return None, 0, None
                if choice["finish_reason"] is not None:
                    need(choice["finish_reason"] in FINISH_REASONS, f"finish_reason {choice['finish_reason']!r}")
                    finished[i] = choice["finish_reason"]
        except (ValueError, KeyError, TypeError) as exc:
            raise Failure("malformed stream", f"{type(exc).__name__} {exc} in event {data[:200]!r}") from None
    if not done or None in finished or (req.usage and usage is None):
        raise Failure("malformed stream", f"ended with [DONE] {done}, finish_reasons {finished}, usage {usage}")
    if usage is not None and not 0 <= usage <= req.n * req.max_tokens:
        raise Failure("malformed stream", f"usage.completion_tokens {usage} for n={req.n} max_tokens={req.max_tokens}")
    check_stops(req, texts, "malformed stream")
    return texts, pieces if usage is None else usage, ttft


async def sse_events(content: aiohttp.StreamReader):
    """The data of each event; a Failure for any line but `data: ...` (or an SSE comment) and blank separators."""
    data = None
    async for raw in content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data is not None:
                yield data
            data = None
        elif line.startswith(":"):
            continue
        elif line.startswith("data: ") and data is None:
            data = line[len("data: "):]
        else:
            raise Failure("malformed stream", f"unexpected line {line[:200]!r}")
    if data is not None:
        raise Failure("malformed stream", f"last event not ended by a blank line: {data[:200]!r}")


def check_stops(req: Request, texts: list[str], category: str) -> None:
    for text in texts:
        if any(stop in text for stop in req.stops):
            raise Failure(category, f"text {text!r} contains one of its stop strings {req.stops!r}")


def status_failure(status: int, text: str) -> Failure:
    return Failure("5xx" if status >= 500 else "wrong status", f"HTTP {status}: {text[:300]}")


def percentiles(values: list[float]) -> str:
    if len(values) < 2:
        return "n/a"
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    return f"{cuts[9] * 1000:.0f} / {cuts[18] * 1000:.0f} ms ({len(values)})"


def read_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def find_listener(port: int) -> int | None:
    """The PID of the process with a listening TCP socket on `port` (/proc/net/tcp* inodes, then /proc/*/fd)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for fields in map(str.split, rows):
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir() if inodes else ():
        if proc.name.isdigit():
            try:
                if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                    return int(proc.name)
            except OSError:
                continue
    return None


async def wait_ready(session: aiohttp.ClientSession, url: str, seconds: float = 60) -> str | None:
    """Wait for /health to answer 200 (a loading model answers 503); returns the served model's name."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                if resp.status == 200:
                    return (await resp.json()).get("model")
                last = f"/health answers {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"soak: the server at {url} is not ready after {seconds:g} s ({last})")
        await asyncio.sleep(1)


async def run(args) -> int:
    url = args.url.rstrip("/")
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    connector = aiohttp.TCPConnector(limit=args.streams + 2)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
        try:
            model = await wait_ready(session, url)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 2
        soak = Soak(args, model)
        pid, parts = args.pid, urlsplit(url)
        if pid is None and (parts.hostname in ("localhost", "::1") or (parts.hostname or "").startswith("127.")):
            pid = find_listener(parts.port or (443 if parts.scheme == "https" else 80))
        if pid is None or read_rss_mb(pid) is None:
            print(f"soak: no server process found{f' (pid {pid})' if pid else ''}; continuing without RSS "
                  "(pass --pid)", file=sys.stderr)
            pid = None
        t0 = time.monotonic()
        sampler = asyncio.create_task(soak.sample_rss(pid, t0)) if pid else None
        print(f"soak: {args.streams} streams for {args.minutes:g} min against {url} (server pid {pid})",
              file=sys.stderr)
        deadline = t0 + args.minutes * 60
        await asyncio.gather(*(soak.worker(session, random.Random(args.seed * 1000 + i), deadline)
                               for i in range(args.streams)))
        duration = time.monotonic() - t0
        if sampler:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            if (rss := read_rss_mb(pid)) is not None:
                soak.rss.append((duration, rss))
        try:
            async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                health = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            health = {"unreachable": repr(exc)}
    table = soak.report(duration, health)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 1 if soak.errors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent workers (default 8)")
    parser.add_argument("--minutes", type=float, default=10, help="how long to send requests (default 10)")
    parser.add_argument("--api-key", default=os.environ.get("EDGEVLM_API_KEY"),
                        help="bearer key, if the server has one (default: $EDGEVLM_API_KEY)")
    parser.add_argument("--pid", type=int, help="server process to sample RSS of (default: the port's listener)")
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--seed", type=int, default=0, help="fixes the request mix (default 0)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per request (default 120)")
    args = parser.parse_args()
    if args.streams < 1 or args.minutes <= 0 or args.timeout <= 0:
        parser.error("--streams, --minutes and --timeout must be positive")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
