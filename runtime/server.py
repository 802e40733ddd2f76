"""The OpenAI-compatible HTTP server (aiohttp): /v1/chat/completions, /v1/models, /health.

The event loop only parses, admits and writes; everything that computes (image decoding, the vision encoder,
decoding) runs on one worker thread, because onnxruntime already uses every core for one request. Requests wait
in a bounded queue (429 past it). A streaming client that goes away cancels its generation within one decoder step.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from edgevlm import __version__

from . import api
from .errors import EdgeVLMError, InvalidRequestError
from .images import ImageLimits
from .vlm import VisionLanguageModel


@dataclass(frozen=True)
class ServerConfig:
    model_path: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    device: str = "cpu"
    threads: int | None = None
    max_queue: int = 16  # requests running or waiting; more get 429
    max_body_bytes: int = 20 * 1024 * 1024
    image_limits: ImageLimits = field(default_factory=ImageLimits)


@dataclass
class ServerState:
    model: VisionLanguageModel | None = None
    load_error: str | None = None
    fingerprint: str = ""
    created: int = 0
    admitted: int = 0  # running + waiting
    completed: int = 0
    cancelled: int = 0
    shutting_down: threading.Event = field(default_factory=threading.Event)


logger = logging.getLogger("edgevlm.server")

STATE = web.AppKey("state", ServerState)
CONFIG = web.AppKey("config", ServerConfig)
WORKER = web.AppKey("worker", ThreadPoolExecutor)


def error_response(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _error_from(exc: EdgeVLMError) -> web.Response:
    return error_response(exc.status, exc.message, type_=exc.type, param=exc.param, code=exc.code)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except EdgeVLMError as exc:
        return _error_from(exc)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_body_bytes
        return error_response(413, f"request body too large: the limit is {limit / 1e6:.1f} MB "
                                   "(edgevlm serve --max-body-mb)", code="request_too_large")
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
    @web.middleware
    async def auth(request: web.Request, handler):
        if api_key and request.path.startswith("/v1/"):
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or token.strip() != api_key:
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
                          client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[STATE] = ServerState(created=api.now())
    app[WORKER] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgevlm-worker")
    load = loader or (lambda: VisionLanguageModel.load(config.model_path, device=config.device,
                                                       threads=config.threads, image_limits=config.image_limits))

    async def start_loading(app: web.Application) -> None:
        state = app[STATE]

        def run() -> None:
            try:
                model = load()
                model.engine.warm_up()
                state.fingerprint = _fingerprint(model)
                state.model = model
                print(f"edgevlm: model {model.name} ready", flush=True)
            except EdgeVLMError as exc:
                state.load_error = exc.message
                print(f"edgevlm: error: {exc.message}", file=sys.stderr, flush=True)

        app[WORKER].submit(run)

    async def shutdown(app: web.Application) -> None:
        app[STATE].shutting_down.set()  # running generations stop at their next step

    async def cleanup(app: web.Application) -> None:
        app[WORKER].shutdown(wait=True, cancel_futures=True)

    app.on_startup.append(start_loading)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.model is None:
        status = "error" if state.load_error else "loading"
        return web.json_response({"status": status, "error": state.load_error}, status=503)
    return web.json_response({"status": "ok", "model": state.model.name, "requests": state.admitted,
                              "completed": state.completed, "cancelled": state.cancelled})


def _ready_model(request: web.Request) -> VisionLanguageModel:
    state = request.app[STATE]
    if state.model is None:
        raise _NotReady(state.load_error)
    return state.model


class _NotReady(EdgeVLMError):
    status = 503
    type = "server_error"
    code = "model_not_ready"

    def __init__(self, load_error: str | None):
        super().__init__(f"the model failed to load: {load_error}" if load_error else
                         "the model is still loading; retry when GET /health answers 200")


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
    """A place in the bounded queue, held from admission until the response is done."""

    def __init__(self, state: ServerState, limit: int):
        self.state, self.limit = state, limit

    def __enter__(self):
        if self.state.admitted >= self.limit:
            raise _QueueFull(self.limit)
        self.state.admitted += 1
        return self

    def __exit__(self, *exc):
        self.state.admitted -= 1


class _QueueFull(EdgeVLMError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, limit: int):
        super().__init__(f"the server is busy ({limit} requests running or waiting); retry shortly")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    model = _ready_model(request)
    state, config, worker = request.app[STATE], request.app[CONFIG], request.app[WORKER]
    raw = await request.read()  # past client_max_size: 413
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequestError("the request body is not valid JSON") from None
    template_tools = "tools" in model.template.template
    chat = api.parse_chat_request(body, vocab_size=model.package.text["vocab_size"],
                                  template_supports_tools=template_tools)
    try:
        with _Admission(state, config.max_queue):
            return await _complete(request, model, chat, state, worker)
    except _QueueFull as exc:
        return error_response(429, exc.message, type_=exc.type, code=exc.code, headers={"Retry-After": "1"})


async def _complete(request, model, chat, state, worker) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    prompt = await loop.run_in_executor(worker, lambda: model.prepare(chat.messages, tools=chat.tools))
    max_tokens = chat.params.max_tokens or model.engine.context_length
    cancel = threading.Event()
    transport = request.transport

    def cancelled() -> bool:
        return cancel.is_set() or state.shutting_down.is_set() or transport is None or transport.is_closing()

    request_id, created = api.completion_id(), api.now()
    name = chat.model or model.name
    if chat.stream:
        return await _stream(request, model, chat, prompt, max_tokens, cancel, cancelled, state, worker,
                             request_id, created, name)

    def run() -> list:
        return list(model.generate(prompt, chat.params, max_tokens=max_tokens, cancelled=cancelled))

    steps = await loop.run_in_executor(worker, run)
    if cancelled():  # the client went away or the server is stopping: the answer is incomplete
        state.cancelled += 1
        return error_response(503, "the generation was cancelled", type_="server_error", code="cancelled")
    state.completed += 1
    choices = []
    for index in range(chat.params.n):
        own = [s for s in steps if s.choice == index]
        choice = {"index": index, "message": {"role": "assistant", "content": "".join(s.text for s in own)},
                  "finish_reason": own[-1].finish_reason if own else "length", "logprobs": None}
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


async def _stream(request, model, chat, prompt, max_tokens, cancel, cancelled, state, worker, request_id, created,
                  name) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def run() -> None:
        try:
            for step in model.generate(prompt, chat.params, max_tokens=max_tokens, cancelled=cancelled):
                loop.call_soon_threadsafe(events.put_nowait, step)
        except Exception as exc:  # sent to the client as an error event; the server keeps serving
            loop.call_soon_threadsafe(events.put_nowait, exc)
        loop.call_soon_threadsafe(events.put_nowait, _DONE)

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)

    def chunk(choices, usage=None) -> bytes:
        payload = api.chunk(request_id, created, name, state.fingerprint, choices, usage)
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    job = loop.run_in_executor(worker, run)
    completion_tokens = 0
    try:
        for index in range(chat.params.n):
            await response.write(chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]))
        while (event := await events.get()) is not _DONE:
            if isinstance(event, Exception):
                error = event if isinstance(event, EdgeVLMError) else EdgeVLMError("generation failed")
                await response.write(f"data: {json.dumps(error.to_dict())}\n\n".encode())
                continue
            completion_tokens += 1
            logprobs = None
            if chat.params.logprobs:
                logprobs = {"content": [_logprob(model, event, chat.params.top_logprobs)]}
            if event.text or logprobs:
                await response.write(chunk([{"index": event.choice, "delta": {"content": event.text},
                                             "logprobs": logprobs, "finish_reason": None}]))
            if event.finish_reason:
                await response.write(chunk([{"index": event.choice, "delta": {}, "logprobs": None,
                                             "finish_reason": event.finish_reason}]))
        if chat.include_usage:
            await response.write(chunk([], api.usage(len(prompt.input_ids), completion_tokens,
                                                     prompt.image_tokens)))
        await response.write(b"data: [DONE]\n\n")
        state.completed += 1
    except ConnectionError:  # the client went away: stop generating, free the cache, keep serving others
        cancel.set()
        state.cancelled += 1
        await job
        return response
    except asyncio.CancelledError:
        cancel.set()
        state.cancelled += 1
        await asyncio.shield(job)
        raise
    await job
    return response


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM; print the address once listening and a line when the model is ready."""
    app = make_app(config)
    runner = web.AppRunner(app, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    host, port = site._server.sockets[0].getsockname()[:2]
    print(f"edgevlm: listening on http://{host}:{port} (loading {config.model_path})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("edgevlm: shutting down", flush=True)
    await runner.cleanup()
