"""The OpenAI-compatible HTTP server (aiohttp): /v1/chat/completions, /v1/models, /health, /metrics, /openapi.json,
and the playground page at / (static files from runtime/playground/, under /playground/).

The event loop only parses, admits and writes. Checking a request's messages and decoding its images run on one
preparing thread; the model's engine thread (scheduler.py) runs the vision encoder and the decoder for every
request at once, batched. The server talks to the model through `VisionLanguageModel`: prepare, submit, and the
events it sends back (Steps, an error, JobEnd).

Whatever a client sends, or fails to read, what the server holds for it is bounded (README: "Limits"):
- admission is decided before a body is read: requests running or waiting (`max_queue`) and the bytes of their
  bodies (`max_pending_body_bytes`) → 429; a declared body over `max_body_bytes` → 413 unread; a body that has
  not arrived after `read_timeout` → 408;
- a request's cost: `n` ≤ `max_n` and ≤ the engine's `max_batch` slots, n × max_tokens ≤ `max_request_tokens`, a
  prompt plus max_tokens within one KV slot → 400; the prompt's text and images are checked before the work they
  cost (`VisionLanguageModel.prepare`); the engine's KV slab and image cache are fixed in size (EngineConfig);
- a client that stops reading: a write still blocked after `write_timeout` drops the connection and cancels its
  generation within a step.
Endings are honest: a stream cut short (shutdown, an internal error) ends with an error event before
`data: [DONE]` and never with a `finish_reason`; a cut non-streaming request gets a 503. SIGTERM/SIGINT let running
and waiting requests finish for up to `shutdown_timeout` while new ones get 503, then cut the rest that way.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from edgevlm import __version__

from . import api, memory, openapi, tools
from .errors import Cancelled, EdgeVLMError, InvalidRequestError
from .limits import ServerLimits
from .vlm import EngineConfig, JobEnd, VisionLanguageModel
from . import metrics as metrics_format


@dataclass(frozen=True)
class ServerConfig:
    model_path: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    device: str = "cpu"
    threads: int | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    engine: EngineConfig = field(default_factory=EngineConfig)
    verify: str = "auto"  # package verification (ModelPackage.verify): "auto" or "always"


@dataclass
class ServerState:
    model: VisionLanguageModel | None = None
    load_error: str | None = None
    fingerprint: str = ""
    created: int = 0
    in_flight: int = 0  # admitted and not done: running or waiting for the worker
    body_bytes: int = 0  # declared body sizes of the requests in flight
    # Since start, every admitted request ends as exactly one of completed, cancelled or failed:
    # admitted == completed + cancelled + failed + in_flight at all times.
    admitted: int = 0
    completed: int = 0
    cancelled: int = 0  # the client went away or stalled, or shutdown cut it
    failed: int = 0  # answered with an error after admission (bad image, prompt too long, internal error)
    rejected: int = 0  # turned away before admission: 429, 413, 503 while draining
    draining: bool = False  # shutting down: new requests get 503
    stopping: threading.Event = field(default_factory=threading.Event)  # generations stop at their next step
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while nothing is in flight

    def __post_init__(self):
        self.idle.set()

    def count(self, outcome: str) -> None:
        """One request ended as `outcome` (completed, cancelled, failed or rejected): /health and /metrics."""
        setattr(self, outcome, getattr(self, outcome) + 1)
        if self.model is not None:
            self.model.metrics.requests.labels(outcome).inc()

    def counters(self) -> dict:
        return {"requests": self.in_flight, "admitted": self.admitted, "completed": self.completed,
                "cancelled": self.cancelled, "failed": self.failed, "rejected": self.rejected}


logger = logging.getLogger("edgevlm.server")

STATE = web.AppKey("state", ServerState)
CONFIG = web.AppKey("config", ServerConfig)
WORKER = web.AppKey("worker", ThreadPoolExecutor)
MAX_COALESCED = 32  # a stream's chunks held for one write at most: an engine ahead of its client is still heard


def error_response(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _error_from(exc: EdgeVLMError) -> web.Response:
    return error_response(exc.status, exc.message, type_=exc.type, param=exc.param, code=exc.code,
                          headers=exc.headers or None)


class _Busy(EdgeVLMError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    headers = {"Retry-After": "1"}


class _ShuttingDown(Cancelled):
    code = "server_shutting_down"

    def __init__(self, what: str = "the server is shutting down and takes no new requests"):
        super().__init__(what)


class _BodyUnread(EdgeVLMError):
    """Answered before the body was (all) read: the connection closes rather than drain what is left of it."""

    type = "invalid_request_error"
    headers = {"Connection": "close"}


class _TooLarge(_BodyUnread):
    status = 413
    code = "request_too_large"

    def __init__(self, limit: int):
        super().__init__(f"request body too large: the limit is {limit / 1e6:g} MB (edgevlm serve --max-body-mb)")


class _RequestTimeout(_BodyUnread):
    status = 408
    code = "request_timeout"

    def __init__(self, seconds: float):
        super().__init__(f"the request body did not arrive within {seconds:g} s (edgevlm serve --read-timeout)")


class _NotReady(EdgeVLMError):
    status = 503
    type = "server_error"
    code = "model_not_ready"

    def __init__(self, load_error: str | None):
        super().__init__(f"the model failed to load: {load_error}" if load_error else
                         "the model is still loading; retry when GET /health answers 200")


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except EdgeVLMError as exc:
        return _error_from(exc)
    except web.HTTPException as exc:
        if exc.status == 404:
            return error_response(404, f"unknown route {request.method} {request.path}", code="not_found")
        if exc.status == 405:
            return error_response(405, f"method {request.method} not allowed on {request.path}",
                                  code="method_not_allowed")
        raise
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:  # a bug of ours, never the client's: logged, answered in OpenAI's shape, server stays up
        logger.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(500, "internal server error", type_="server_error", code="internal_error")


def _auth_middleware(api_key: str | None):
    expected = api_key.encode() if api_key else b""

    @web.middleware
    async def auth(request: web.Request, handler):
        if api_key and request.path.startswith("/v1/"):
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            # Constant time: how long the comparison takes says nothing about how much of the key matched.
            given = token.strip().encode("utf-8", "surrogateescape")
            if not (hmac.compare_digest(given, expected) and scheme.lower() == "bearer"):
                return error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                      type_="authentication_error", code="invalid_api_key")
        return await handler(request)

    return auth


# The playground: a hand-written page (no build step, nothing fetched from elsewhere) served as static files. Like
# /health it needs no API key: the page holds nothing secret, and it sends the key the user types to /v1 itself.
PLAYGROUND = Path(__file__).parent / "playground"
_PLAYGROUND_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                     ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
# The browser loads nothing but this server's own files: no CDN, no fonts, no outside requests; images are data:
# or blob: URLs made in the page.
_PLAYGROUND_CSP = ("default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
                   "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _playground_file(name: str, headers: dict | None = None) -> web.FileResponse:
    path = PLAYGROUND / name
    if path.suffix not in _PLAYGROUND_TYPES or not path.is_file():
        raise web.HTTPNotFound()  # the errors middleware answers it in OpenAI's shape
    return web.FileResponse(path, headers={"Content-Type": _PLAYGROUND_TYPES[path.suffix],
                                           "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                                           **(headers or {})})


async def playground(request: web.Request) -> web.FileResponse:
    return _playground_file("index.html", {"Content-Security-Policy": _PLAYGROUND_CSP})


async def playground_asset(request: web.Request) -> web.FileResponse:
    """A file of the playground's folder by its bare name (no folders, so no way out of it)."""
    return _playground_file(request.match_info["name"])


def make_app(config: ServerConfig, *, loader: Callable[[], VisionLanguageModel] | None = None) -> web.Application:
    """The aiohttp application. `loader` builds the model (default: load `config.model_path`) on the worker."""
    app = web.Application(middlewares=[errors_middleware, _auth_middleware(config.api_key)],
                          client_max_size=config.limits.max_body_bytes)
    app[CONFIG] = config
    app[STATE] = ServerState(created=api.now())
    app[WORKER] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgevlm-prepare")
    load = loader or (lambda: VisionLanguageModel.load(config.model_path, verify=config.verify,
                                                       device=config.device, threads=config.threads,
                                                       image_limits=config.limits.images,
                                                       engine_config=config.engine, defer_vision=True))

    async def start_loading(app: web.Application) -> None:
        state = app[STATE]

        def run() -> None:
            try:
                model = load()
                model.warm_up()
                state.fingerprint = api.system_fingerprint(model)
                state.model = model
                print(f"edgevlm: KV cache {model.engine.kv_cache}", flush=True)
                print(f"edgevlm: model {model.name} ready", flush=True)
                _open_vision(model)
                app[WORKER].submit(lambda: model.grammars)  # next on the worker, before any request's work
            except EdgeVLMError as exc:
                state.load_error = exc.message
                print(f"edgevlm: error: {exc.message}", file=sys.stderr, flush=True)

        app[WORKER].submit(run)

    async def shutdown(app: web.Application) -> None:
        app[STATE].draining = True
        app[STATE].stopping.set()  # whatever still runs stops at its next step (serve() drained it first)

    async def cleanup(app: web.Application) -> None:
        app[WORKER].shutdown(wait=True, cancel_futures=True)
        if app[STATE].model is not None:
            app[STATE].model.close()

    app.on_startup.append(start_loading)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", playground)
    app.router.add_get(r"/playground/{name:[A-Za-z0-9_-][A-Za-z0-9_.-]*}", playground_asset)
    return app


def _open_vision(model: VisionLanguageModel) -> None:
    """Make the vision encoder's session on a thread, after ready (a deferred one: `Engine(defer_vision=True)`;
    0.4 s of a SmolVLM-256M start), then an int4 package's int8 prefill graph (~1 s): a request with images, or any
    prompt, that comes first waits for them on the engine's thread."""
    engine = getattr(model, "engine", None)
    if engine is None or not hasattr(engine, "open_vision"):
        return

    def run() -> None:
        for open_session in (engine.open_vision, getattr(engine, "open_prefill", None)):
            try:
                if open_session is not None:
                    open_session()
            except EdgeVLMError as exc:  # each request that needs the session gets this error too
                print(f"edgevlm: error: {exc.message}", file=sys.stderr, flush=True)

    threading.Thread(target=run, name="edgevlm-vision", daemon=True).start()


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.model is None:
        status = "error" if state.load_error else "loading"
        return web.json_response({"status": status, "error": state.load_error}, status=503)
    if state.draining:
        return web.json_response({"status": "draining", "model": state.model.name, **state.counters()}, status=503)
    return web.json_response({"status": "ok", "model": state.model.name, **state.counters()})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format: requests by outcome, latency histograms, throughput, slots and caches (README)."""
    model = _ready_model(request)
    return web.Response(body=model.metrics.render(), headers={"Content-Type": metrics_format.CONTENT_TYPE})


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi.document(__version__))


def _ready_model(request: web.Request) -> VisionLanguageModel:
    state = request.app[STATE]
    if state.model is None:
        raise _NotReady(state.load_error)
    return state.model


async def list_models(request: web.Request) -> web.Response:
    model = _ready_model(request)
    card = api.model_card(model.name, request.app[STATE].created)
    return web.json_response({"object": "list", "data": [card]})


async def get_model(request: web.Request) -> web.Response:
    model = _ready_model(request)
    if request.match_info["model_id"] != model.name:
        return error_response(404, f"model '{request.match_info['model_id']}' does not exist; this server serves "
                                   f"'{model.name}'", param="model", code="model_not_found")
    return web.json_response(api.model_card(model.name, request.app[STATE].created))


class _Admission:
    """A place in the bounded queue and the body budget, held from admission until the response is done.

    The handler records how the request ended (`outcome`); leaving without one is a failure, or a cancellation
    when it left with `Cancelled` or was itself cancelled.
    """

    def __init__(self, state: ServerState, limits: ServerLimits, body_bytes: int):
        self.state, self.limits, self.body_bytes = state, limits, body_bytes
        self.outcome: str | None = None

    def __enter__(self):
        state, limits = self.state, self.limits
        if state.in_flight >= limits.max_queue:
            state.count("rejected")
            raise _Busy(f"the server is busy ({limits.max_queue} requests running or waiting); retry shortly")
        # One body within --max-body-mb is always admitted on an idle server, whatever the pending budget.
        if state.in_flight and state.body_bytes + self.body_bytes > limits.max_pending_body_bytes:
            state.count("rejected")
            raise _Busy(f"the server is busy ({state.body_bytes / 1e6:.1f} MB of request bodies in progress, limit "
                        f"{limits.max_pending_body_bytes / 1e6:g} MB); retry shortly")
        state.in_flight += 1
        state.admitted += 1
        state.body_bytes += self.body_bytes
        state.idle.clear()
        return self

    def __exit__(self, exc_type, exc, tb):
        state = self.state
        cut = exc_type is not None and issubclass(exc_type, (Cancelled, asyncio.CancelledError))
        outcome = self.outcome or ("cancelled" if cut else "failed")
        state.count(outcome)
        state.in_flight -= 1
        state.body_bytes -= self.body_bytes
        if not state.in_flight:
            state.idle.set()


async def _read_body(request: web.Request, limits: ServerLimits) -> bytes:
    try:
        return await asyncio.wait_for(request.read(), limits.read_timeout)
    except asyncio.TimeoutError:
        raise _RequestTimeout(limits.read_timeout) from None
    except web.HTTPRequestEntityTooLarge:  # a chunked body that grew past client_max_size
        raise _TooLarge(limits.max_body_bytes) from None
    except ConnectionError:  # nobody is left to answer
        raise Cancelled("the client went away before its request arrived") from None
    except web.RequestPayloadError as exc:  # a Content-Encoding its bytes do not match, a broken chunk
        raise InvalidRequestError(f"the request body could not be read: {exc}") from None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    model = _ready_model(request)
    state, limits = request.app[STATE], request.app[CONFIG].limits
    if state.draining:
        state.count("rejected")
        raise _ShuttingDown()
    declared = request.content_length
    if declared is not None and declared > limits.max_body_bytes:
        state.count("rejected")
        raise _TooLarge(limits.max_body_bytes)
    with _Admission(state, limits, limits.max_body_bytes if declared is None else declared) as admission:
        body = api.parse_json(await _read_body(request, limits))
        chat = api.parse_chat_request(body, vocab_size=model.vocab_size, defaults=model.defaults.values)
        api.check_cost(chat.params, limits, model)
        return await _complete(request, model, chat, admission)


async def _complete(request: web.Request, model: VisionLanguageModel, chat: api.ChatRequest,
                    admission: _Admission) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    state, config, worker = request.app[STATE], request.app[CONFIG], request.app[WORKER]
    cancel = threading.Event()
    transport = request.transport

    def cancelled() -> bool:
        return cancel.is_set() or state.stopping.is_set() or transport is None or transport.is_closing()

    def prepare():
        if cancelled():  # it waited behind others while its client left or the server began to stop
            raise _cut(state)
        return api.prepare(model, chat, config.limits, cancelled=cancelled)  # with tools: the generic format's

    prompt, schema = await loop.run_in_executor(worker, prepare)
    events: asyncio.Queue = asyncio.Queue()

    def emit(event) -> None:  # called on the engine's thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop closed under us at shutdown: nobody is left to tell
            pass

    try:
        model.submit(prompt, chat.params, emit, schema=schema, cancelled=cancelled)
        answer = _Answer(request, model, chat, prompt, admission, cancel)
        if chat.stream:
            return await answer.stream(events)
        return await answer.respond(events)
    finally:  # answered, failed, or the client went away: the engine drops what is left at its next step
        cancel.set()


def _cut(state: ServerState) -> Cancelled:
    """The error for an answer that stopped before its end: shutdown, or a client that went away."""
    if state.stopping.is_set():
        return _ShuttingDown("the server is shutting down: this answer was cut short")
    return Cancelled("the generation was cancelled")


class _Stalled(Exception):
    """A write waited longer than --write-timeout: the client stopped reading."""


class _Answer:
    """One request's answer, from the engine's events (Steps, an exception, then JobEnd) to the HTTP response."""

    def __init__(self, request, model, chat, prompt, admission, cancel: threading.Event):
        self.request, self.model, self.chat, self.prompt, self.admission = request, model, chat, prompt, admission
        self.cancel = cancel
        self.state = request.app[STATE]
        self.id, self.created = api.completion_id(), api.now()
        self.name = chat.model or model.name

    def _logprob(self, step) -> dict:
        return api.step_logprob(step, self.model.token_text, self.chat.params.top_logprobs)

    def _usage(self, completion_tokens: int, end: JobEnd) -> dict:
        return api.usage(len(self.prompt.input_ids), completion_tokens, self.prompt.image_tokens, end.cached_tokens)

    async def respond(self, events: asyncio.Queue) -> web.Response:
        chat, state, steps, error = self.chat, self.state, [], None
        while not isinstance(event := await events.get(), JobEnd):
            if isinstance(event, Exception):
                error = event
            else:
                steps.append(event)
        if error is not None:
            raise error
        if api.unfinished(steps, chat.params.n):  # cut short: never sent as an answer
            self.admission.outcome = "cancelled"
            raise _cut(state)
        self.admission.outcome = "completed"
        return web.json_response(api.completion(self.id, self.created, self.name, state.fingerprint,
                                                api.choices(steps, chat, self.model.token_text),
                                                self._usage(len(steps), event)))

    async def stream(self, events: asyncio.Queue) -> web.StreamResponse:
        request, chat, state = self.request, self.chat, self.state
        write_timeout = request.app[CONFIG].limits.write_timeout
        # The status is decided by the first event: a request that fails or is cut before its first token (while
        # it waits for a slot, or in its prefill) gets an error status, not a stream.
        first = await events.get()
        if isinstance(first, Exception):
            raise first
        if isinstance(first, JobEnd):
            raise _cut(state)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)

        transport = request.transport
        # A write waits only once the transport holds more than its high-water mark (the client is not reading);
        # below it the write goes straight out, without the task and timer of a timed wait (~40 us a token on the
        # event loop, which shares the CPU with the decoder's threads).
        high_water = transport.get_write_buffer_limits()[1] if transport is not None else 0
        pending: list[bytes] = []  # chunks of the events already queued, sent in one write

        async def send(data: bytes) -> None:
            if transport is not None and transport.get_write_buffer_size() + len(data) <= high_water:
                await response.write(data)
                return
            try:
                await asyncio.wait_for(response.write(data), write_timeout)
            except asyncio.TimeoutError:
                raise _Stalled from None

        async def flush() -> None:
            if pending:
                data = b"".join(pending)
                pending.clear()
                await send(data)

        async def next_event():
            # Events the engine queued while the last write went out are sent together: one write (one system
            # call, one wake-up of the client) for all of them.
            if events.empty() or len(pending) >= MAX_COALESCED:
                await flush()
            return events.get_nowait() if not events.empty() else await events.get()

        def chunk(choices, usage=None) -> bytes:
            payload = api.chunk(self.id, self.created, self.name, state.fingerprint, choices, usage)
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

        completion_tokens, finished, error = 0, set(), None
        answers = [tools.ToolAnswer() for _ in range(chat.params.n)] if chat.tools else None
        try:
            for index in range(chat.params.n):
                await send(chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}]))
            event = first
            while not isinstance(event, JobEnd):
                if isinstance(event, Exception):
                    error = event if isinstance(event, EdgeVLMError) else EdgeVLMError("generation failed")
                    event = await next_event()
                    continue
                completion_tokens += 1
                logprobs = {"content": [self._logprob(event)]} if chat.params.logprobs else None
                deltas = [{"content": event.text}] if event.text or logprobs else []
                if answers is not None:
                    try:
                        deltas = answers[event.choice].feed(event.text)
                    except ValueError:  # output off the generic format (the grammar should make it impossible)
                        logger.exception("unreadable tool-call output")
                        error, deltas = EdgeVLMError("the model's tool-call output could not be read"), []
                        self.cancel.set()
                for delta in deltas:
                    pending.append(chunk([{"index": event.choice, "delta": delta, "logprobs": logprobs,
                                           "finish_reason": None}]))
                if event.finish_reason:
                    finished.add(event.choice)
                    finish_reason = (answers[event.choice].finish_reason(event.finish_reason) if answers is not None
                                     else event.finish_reason)
                    pending.append(chunk([{"index": event.choice, "delta": {}, "logprobs": None,
                                           "finish_reason": finish_reason}]))
                event = await next_event()
            await flush()
            if error is None and len(finished) < chat.params.n:
                error = _cut(state)  # it stopped before every choice ended: say so, never end it like an answer
            if error is not None:
                await send(f"data: {json.dumps(error.to_dict())}\n\n".encode())
            elif chat.include_usage:
                await send(chunk([], self._usage(completion_tokens, event)))
            await send(b"data: [DONE]\n\n")
            self.admission.outcome = ("completed" if error is None else
                                      "cancelled" if isinstance(error, Cancelled) else "failed")
        except (_Stalled, ConnectionError):  # the client went away or stopped reading: free its place and slots
            self.cancel.set()
            self.admission.outcome = "cancelled"
            if request.transport is not None:
                request.transport.abort()  # drop what it never read
        return response


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts: a busy port fails here, before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


async def drain(app: web.Application, timeout: float) -> None:
    """Graceful shutdown: new requests get 503; running and waiting ones get up to `timeout` seconds to finish;
    then the rest are cut (an error event, or a 503) and given a few seconds to say so."""
    state = app[STATE]
    state.draining = True
    if state.in_flight:
        print(f"edgevlm: shutting down: {state.in_flight} request(s) in progress get up to {timeout:g} s to finish",
              flush=True)
        try:
            await asyncio.wait_for(state.idle.wait(), timeout)
        except asyncio.TimeoutError:
            print(f"edgevlm: cutting {state.in_flight} request(s) short", flush=True)
    state.stopping.set()
    try:  # a generation stops within one decoder step; an image being encoded, after its own tiles
        await asyncio.wait_for(state.idle.wait(), 30)
    except asyncio.TimeoutError:
        pass


async def serve(config: ServerConfig, *, loader: Callable[[], VisionLanguageModel] | None = None) -> None:
    """Run until SIGINT/SIGTERM; print the address once listening and a line when the model is ready.

    The port is bound before the model starts loading, so a bind failure (OSError) is raised before anything is
    printed as ready.
    """
    sock = listen(config.host, config.port)
    memory.configure()
    host, port = sock.getsockname()[:2]
    print(f"edgevlm: listening on http://{host}:{port} (loading {config.model_path})", flush=True)
    app = make_app(config, loader=loader)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("edgevlm: shutting down", flush=True)
    await drain(app, config.limits.shutdown_timeout)
    await runner.cleanup()
