"""The OpenAI-compatible HTTP server (aiohttp): /v1/chat/completions, /v1/models, /health, /openapi.json.

The event loop only parses, admits and writes; everything that computes (image decoding, the vision encoder,
decoding) runs on one worker thread, because onnxruntime already uses every core for one request.

Whatever a client sends, or fails to read, what the server holds for it is bounded (README: "Limits"):
- admission is decided before a body is read: requests running or waiting (`max_queue`) and the bytes of their
  bodies (`max_pending_body_bytes`) → 429; a declared body over `max_body_bytes` → 413 unread; a body that has
  not arrived after `read_timeout` → 408;
- a request's cost: `n` ≤ `max_n`, n × max_tokens ≤ `max_request_tokens`, its KV cache ≤ `max_kv_bytes` → 400;
  the prompt's text and images are checked before the work they cost (`VisionLanguageModel.prepare`);
- a client that stops reading: a write still blocked after `write_timeout` drops the connection and cancels its
  generation within a step.
Endings are honest: a stream cut short (shutdown, an internal error) ends with an error event before
`data: [DONE]` and never with a `finish_reason`; a cut non-streaming request gets a 503. SIGTERM/SIGINT let running
and waiting requests finish for up to `shutdown_timeout` while new ones get 503, then cut the rest that way.
"""

from __future__ import annotations

import asyncio
import hashlib
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
from .sampling import SamplingParams
from .vlm import VisionLanguageModel


@dataclass(frozen=True)
class ServerConfig:
    model_path: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    device: str = "cpu"
    threads: int | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)


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

    def counters(self) -> dict:
        return {"requests": self.in_flight, "admitted": self.admitted, "completed": self.completed,
                "cancelled": self.cancelled, "failed": self.failed, "rejected": self.rejected}


logger = logging.getLogger("edgevlm.server")

STATE = web.AppKey("state", ServerState)
CONFIG = web.AppKey("config", ServerConfig)
WORKER = web.AppKey("worker", ThreadPoolExecutor)


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


def _fingerprint(model: VisionLanguageModel) -> str:
    digest = hashlib.sha256()
    for name, entry in sorted(model.package.manifest["files"].items()):
        digest.update(f"{name}:{entry['sha256']}".encode())
    return f"fp_edgevlm{__version__}_{digest.hexdigest()[:12]}"


def make_app(config: ServerConfig, *, loader: Callable[[], VisionLanguageModel] | None = None) -> web.Application:
    """The aiohttp application. `loader` builds the model (default: load `config.model_path`) on the worker."""
    app = web.Application(middlewares=[errors_middleware, _auth_middleware(config.api_key)],
                          client_max_size=config.limits.max_body_bytes)
    app[CONFIG] = config
    app[STATE] = ServerState(created=api.now())
    app[WORKER] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgevlm-worker")
    load = loader or (lambda: VisionLanguageModel.load(config.model_path, device=config.device,
                                                       threads=config.threads, image_limits=config.limits.images))

    async def start_loading(app: web.Application) -> None:
        state = app[STATE]

        def run() -> None:
            try:
                model = load()
                model.engine.warm_up()
                state.fingerprint = _fingerprint(model)
                state.model = model
                print(f"edgevlm: model {model.name} ready", flush=True)
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

    app.on_startup.append(start_loading)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/openapi.json", openapi_json)
    return app


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.model is None:
        status = "error" if state.load_error else "loading"
        return web.json_response({"status": status, "error": state.load_error}, status=503)
    if state.draining:
        return web.json_response({"status": "draining", "model": state.model.name, **state.counters()}, status=503)
    return web.json_response({"status": "ok", "model": state.model.name, **state.counters()})


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
            state.rejected += 1
            raise _Busy(f"the server is busy ({limits.max_queue} requests running or waiting); retry shortly")
        # One body within --max-body-mb is always admitted on an idle server, whatever the pending budget.
        if state.in_flight and state.body_bytes + self.body_bytes > limits.max_pending_body_bytes:
            state.rejected += 1
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
        setattr(state, outcome, getattr(state, outcome) + 1)
        state.in_flight -= 1
        state.body_bytes -= self.body_bytes
        if not state.in_flight:
            state.idle.set()


class _Budget:
    """What one request may cost under the server's limits: checked at parse time, then once its prompt's
    length is known (before the vision encoder runs), which also settles each choice's max_tokens."""

    def __init__(self, params: SamplingParams, limits: ServerLimits, model: VisionLanguageModel):
        self.n, self.requested = params.n, params.max_tokens
        self.context = model.engine.context_length
        self.total = limits.max_request_tokens or self.context
        self.kv_per_token, self.max_kv = model.engine.kv_bytes_per_token, limits.max_kv_bytes
        self.max_tokens: int | None = None
        if self.n > limits.max_n:
            raise InvalidRequestError(f"Invalid 'n': {self.n} choices exceed this server's limit of "
                                      f"{limits.max_n} (edgevlm serve --max-n)", param="n")
        if self.n * (self.requested or 1) > self.total:
            raise InvalidRequestError(
                f"Invalid 'max_tokens': n × max_tokens = {self.n} × {self.requested or 1} = "
                f"{self.n * (self.requested or 1)} completion tokens exceed this server's limit of {self.total} per "
                "request (edgevlm serve --max-request-tokens)", param="max_tokens" if self.requested else "n")

    def __call__(self, prompt_tokens: int) -> None:
        tokens = min(self.requested or self.total // self.n, self.context - prompt_tokens)
        positions = self.max_kv // (self.kv_per_token * self.n)  # what each choice's KV rows may hold
        if prompt_tokens + tokens > positions:
            if self.requested is not None or positions - prompt_tokens < 1:
                need = self.n * (prompt_tokens + tokens) * self.kv_per_token
                raise InvalidRequestError(
                    f"this request needs {need / 1e6:.0f} MB of KV cache ({self.n} × ({prompt_tokens} prompt + "
                    f"{tokens} completion tokens)); this server's limit is {self.max_kv / 1e6:g} MB "
                    "(edgevlm serve --max-kv-mb)",
                    param="max_tokens" if self.requested is not None else "n" if self.n > 1 else "messages")
            tokens = positions - prompt_tokens  # max_tokens was left to us: as many as the budget holds
        self.max_tokens = tokens


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
        state.rejected += 1
        raise _ShuttingDown()
    declared = request.content_length
    if declared is not None and declared > limits.max_body_bytes:
        state.rejected += 1
        raise _TooLarge(limits.max_body_bytes)
    with _Admission(state, limits, limits.max_body_bytes if declared is None else declared) as admission:
        body = api.parse_json(await _read_body(request, limits))
        chat = api.parse_chat_request(body, vocab_size=model.package.text["vocab_size"])
        budget = _Budget(chat.params, limits, model)
        return await _complete(request, model, chat, budget, admission)


def _cut(state: ServerState) -> Cancelled:
    """The error for an answer that stopped before its end: shutdown, or a client that went away."""
    if state.stopping.is_set():
        return _ShuttingDown("the server is shutting down: this answer was cut short")
    return Cancelled("the generation was cancelled")


async def _complete(request: web.Request, model: VisionLanguageModel, chat: api.ChatRequest, budget: _Budget,
                    admission: _Admission) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    state, worker = request.app[STATE], request.app[WORKER]
    cancel = threading.Event()
    transport = request.transport

    def cancelled() -> bool:
        return cancel.is_set() or state.stopping.is_set() or transport is None or transport.is_closing()

    # With tools, the answer is the generic format's JSON (tools.py): the conversation describes the tools and the
    # grammar follows their schemas; ToolAnswer turns the JSON back into OpenAI's message and deltas.
    messages = tools.render_conversation(chat.tools, chat.messages) if chat.tools else chat.messages
    schema = chat.tools.schema() if chat.tools else chat.schema

    def prepare():
        if cancelled():  # it waited behind others while its client left or the server began to stop
            raise _cut(state)
        try:
            if schema is not None:  # an unenforceable schema is a 400 before any image is decoded
                model.grammars.compile(schema)
            return model.prepare(messages, check_prompt=budget, cancelled=cancelled)
        finally:
            memory.release()  # a large image's pixels go back to the system, not just to malloc

    prompt = await loop.run_in_executor(worker, prepare)
    request_id, created = api.completion_id(), api.now()
    name = chat.model or model.name
    if chat.stream:
        return await _stream(request, model, chat, prompt, budget.max_tokens, schema, cancel, cancelled, admission,
                             request_id, created, name)

    def run() -> list:
        try:
            return list(model.generate(prompt, chat.params, max_tokens=budget.max_tokens, cancelled=cancelled,
                                       schema=schema))
        finally:
            memory.release()

    steps = await loop.run_in_executor(worker, run)
    if len({s.choice for s in steps if s.finish_reason}) < chat.params.n:  # cut short: never sent as an answer
        admission.outcome = "cancelled"
        raise _cut(state)
    admission.outcome = "completed"
    choices = []
    for index in range(chat.params.n):
        own = [s for s in steps if s.choice == index]
        text, finish_reason = "".join(s.text for s in own), own[-1].finish_reason
        message = {"role": "assistant", "content": text}
        if chat.tools:
            answer = tools.ToolAnswer()
            answer.feed(text)
            message, finish_reason = answer.message(), answer.finish_reason(finish_reason)
        choice = {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": None}
        if chat.params.logprobs:
            choice["logprobs"] = {"content": [_logprob(model, s, chat.params.top_logprobs) for s in own]}
        choices.append(choice)
    return web.json_response({
        "id": request_id, "object": "chat.completion", "created": created, "model": name,
        "system_fingerprint": state.fingerprint, "choices": choices,
        "usage": api.usage(len(prompt.input_ids), len(steps), prompt.image_tokens),
    })


def _logprob(model: VisionLanguageModel, step, top: int | None) -> dict:
    text = model.tokenizer.decode([step.token], skip_special_tokens=False)
    pairs = [(model.tokenizer.decode([t], skip_special_tokens=False), v)
             for t, v in step.sample.top_logprobs[: top or 0]]
    return api.logprob_entry(text, step.sample.logprob, pairs)


_DONE = object()


class _Stalled(Exception):
    """A write waited longer than --write-timeout: the client stopped reading."""


async def _stream(request, model, chat, prompt, max_tokens, schema, cancel, cancelled, admission, request_id,
                  created, name) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    state, config, worker = request.app[STATE], request.app[CONFIG], request.app[WORKER]
    events: asyncio.Queue = asyncio.Queue()

    def emit(event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop closed under us at shutdown: nobody is left to tell
            pass

    def run() -> None:
        try:
            for step in model.generate(prompt, chat.params, max_tokens=max_tokens, cancelled=cancelled,
                                       schema=schema):
                emit(step)
        except Exception as exc:  # sent to the client as an error event; the server keeps serving
            emit(exc)
        finally:
            memory.release()
            emit(_DONE)

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)

    async def send(data: bytes) -> None:
        try:
            await asyncio.wait_for(response.write(data), config.limits.write_timeout)
        except asyncio.TimeoutError:
            raise _Stalled from None

    def chunk(choices, usage=None) -> bytes:
        payload = api.chunk(request_id, created, name, state.fingerprint, choices, usage)
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    job = loop.run_in_executor(worker, run)
    completion_tokens, finished, error = 0, set(), None
    answers = [tools.ToolAnswer() for _ in range(chat.params.n)] if chat.tools else None
    try:
        for index in range(chat.params.n):
            await send(chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                               "logprobs": None, "finish_reason": None}]))
        while (event := await events.get()) is not _DONE:
            if isinstance(event, Exception):
                if not isinstance(event, EdgeVLMError):
                    logger.error("generation failed", exc_info=event)
                error = event if isinstance(event, EdgeVLMError) else EdgeVLMError("generation failed")
                continue
            completion_tokens += 1
            logprobs = None
            if chat.params.logprobs:
                logprobs = {"content": [_logprob(model, event, chat.params.top_logprobs)]}
            deltas = [{"content": event.text}] if event.text or logprobs else []
            if answers is not None:
                try:
                    deltas = answers[event.choice].feed(event.text)
                except ValueError:  # output off the generic format (the grammar should make it impossible)
                    logger.exception("unreadable tool-call output")
                    error, deltas = EdgeVLMError("the model's tool-call output could not be read"), []
                    cancel.set()
            for delta in deltas:
                await send(chunk([{"index": event.choice, "delta": delta, "logprobs": logprobs,
                                   "finish_reason": None}]))
            if event.finish_reason:
                finished.add(event.choice)
                finish_reason = (answers[event.choice].finish_reason(event.finish_reason) if answers is not None
                                 else event.finish_reason)
                await send(chunk([{"index": event.choice, "delta": {}, "logprobs": None,
                                   "finish_reason": finish_reason}]))
        if error is None and len(finished) < chat.params.n:
            error = _cut(state)  # it stopped before every choice ended: say so, never end it like an answer
        if error is not None:
            await send(f"data: {json.dumps(error.to_dict())}\n\n".encode())
        elif chat.include_usage:
            await send(chunk([], api.usage(len(prompt.input_ids), completion_tokens, prompt.image_tokens)))
        await send(b"data: [DONE]\n\n")
        admission.outcome = ("completed" if error is None else
                             "cancelled" if isinstance(error, Cancelled) else "failed")
    except (_Stalled, ConnectionError):  # the client went away or stopped reading: free its place and cache
        cancel.set()
        admission.outcome = "cancelled"
        if request.transport is not None:
            request.transport.abort()  # drop what it never read
        return response
    except asyncio.CancelledError:
        cancel.set()
        raise
    await job
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


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM; print the address once listening and a line when the model is ready.

    The port is bound before the model starts loading, so a bind failure (OSError) is raised before anything is
    printed as ready.
    """
    sock = listen(config.host, config.port)
    memory.configure()
    host, port = sock.getsockname()[:2]
    print(f"edgevlm: listening on http://{host}:{port} (loading {config.model_path})", flush=True)
    app = make_app(config)
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
