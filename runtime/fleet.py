"""Scale-out on Ray Serve: N edgevlm engines behind one OpenAI endpoint, each request sent to the replica whose
caches hold its image or its conversation.

    RAY_USAGE_STATS_ENABLED=0 serve run edgevlm.runtime.fleet:app model=models/demo-shapes replicas=2
    # any `edgevlm serve` flag as key=value: kv-budget-mb=500 max-batch=4 device=cuda num_gpus=1 ...

    from ray import serve
    from edgevlm.runtime.fleet import build
    serve.run(build("models/demo-shapes", replicas=2, kv_budget_mb=500), name="edgevlm", route_prefix="/")

The same routes as `edgevlm serve` (POST /v1/chat/completions, JSON and SSE, GET /v1/models, /health, /metrics,
/openapi.json, the playground) on Serve's HTTP proxy (127.0.0.1:8000 unless Serve's http_options say otherwise),
under the application's route prefix (the API works under any; the playground page, whose paths are absolute,
only at "/").

    HTTP proxy ─► FleetIngress (light, no CPU) ─► handle with CacheAffinityRouter ─► EdgeVLMReplica × N

- `EdgeVLMReplica` runs one engine: the unchanged aiohttp application of server.py (`make_app`), on a Unix socket
  inside the replica, and relays requests to it. So the fleet answers exactly as `edgevlm serve` does — parsing,
  limits, auth (`api_key`), errors, honest endings, metrics — with no second implementation of the routes; the
  relay adds one local socket hop, small next to a decoder step. The replica is healthy once its model is loaded
  and warmed up, and drains running requests on shutdown (`server.drain`).
- `FleetIngress` reads the body (bounded by the replicas' --max-body-mb and --read-timeout) and computes the
  request's affinity key: the SHA-256 of the first image's base64 payload (what the image-feature cache keys on,
  `images.image_payload`), else of the first user message (the start of the conversation, what prefix reuse
  needs); no key for other routes.
- `CacheAffinityRouter` is a Ray Serve custom request router (`RequestRouter`, `request_router_config`, alpha in
  Ray 2.4x-2.6x): a request with a key goes to its owner by rendezvous hashing of the key over the live replica
  ids — stateless, so every router (each ingress replica, each node) agrees and a replica that leaves moves only
  its own keys — then to the next in the key's order when the owner is full (Serve's max_ongoing_requests) or
  has `imbalanced_threshold` more requests queued than the least loaded one; requests without a key take the
  less loaded of two random replicas (Serve's default policy). Serve's model multiplexing was the alternative:
  it keys on a model id per replica and loads/evicts "models", which does not fit many images per replica;
  `PrefixCacheAffinityRouter` (ray.serve.llm) matches text prefixes only and ignores images.

Response header `x-edgevlm-replica` names the replica that answered; request header `x-edgevlm-replica: <id>`
sends a request to that replica when it is live (its /metrics or /health), else as usual. A fleet answers 429
with Retry-After when every replica is full and `max_queued_requests` are waiting at the router, and 503 when no
replica could take it.

Ray is imported here only: nothing else of the runtime imports this module.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import tempfile
from typing import Any

# Never online (README "Never online"): a cluster that this process starts reports no usage statistics. A cluster
# started elsewhere (`ray start`, KubeRay) needs the variable in its own environment. (Ray 2.60's dashboard process
# still probes the cloud metadata address 169.254.169.254 once at start, whatever the variable: README, "Scale-out
# on Ray Serve".)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import RequestRouterConfig  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica  # noqa: E402
from starlette.requests import ClientDisconnect, Request  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402

from . import memory, server  # noqa: E402
from .errors import EdgeVLMError  # noqa: E402
from .images import image_payload  # noqa: E402

REPLICA_HEADER = "x-edgevlm-replica"
CHAT_PATH = "/v1/chat/completions"
# Not relayed: they describe one hop, not the request (RFC 9110 §7.6.1), or are recomputed by the next server.
_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                          "transfer-encoding", "upgrade", "host", "content-length", "date", "server"})


# ---------------------------------------------------------------------------------------------------- routing


def affinity_key(body: Any) -> str | None:
    """The cache a chat request will use: SHA-256 of its first image's base64 payload, else of its first user
    message (canonical JSON); None for a body without messages (the replica answers its 400)."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return None
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                try:
                    return "image:" + hashlib.sha256(image_payload(url).encode()).hexdigest()
                except (EdgeVLMError, UnicodeError):  # not an image the replica will take: its 400, anywhere
                    return None
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            text = json.dumps(message.get("content"), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            return "text:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return None


def _score(key: str, replica_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest(), "big")


def owner_order(key: str, replica_ids) -> list[str]:
    """Rendezvous (highest random weight) hashing: the replicas in the order a key prefers them. The first is the
    key's owner; adding or removing a replica changes the owner only of the keys it gains or held."""
    return sorted(replica_ids, key=lambda rid: _score(key, rid), reverse=True)


class CacheAffinityRouter(RequestRouter):
    """Requests with an affinity key go to the replica that owns it (its caches hold the image or the prefix),
    then down the key's order when that one is full or much busier; others to the less loaded of two."""

    def initialize_state(self, imbalanced_threshold: int = 8):
        self._imbalanced_threshold = imbalanced_threshold

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        pinned = kwargs.get("replica")
        if pinned:
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == pinned]
            if chosen:
                return [chosen]
        key = kwargs.get("affinity")
        if key and len(candidate_replicas) > 1:
            by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
            ranked = [by_id[rid] for rid in owner_order(key, by_id)]
            if not self._much_busier(ranked[0], candidate_replicas):
                return [[r] for r in ranked]
        if len(candidate_replicas) <= 2:
            return [random.sample(candidate_replicas, len(candidate_replicas))]
        return [random.sample(candidate_replicas, 2)]

    def _much_busier(self, owner: RunningReplica, replicas: list[RunningReplica]) -> bool:
        """From the router's cached queue lengths (unknown counts as not busier)."""
        cache = self.replica_queue_len_cache
        owner_len = cache.get(owner.replica_id)
        if owner_len is None:
            return False
        known = [n for n in (cache.get(r.replica_id) for r in replicas) if n is not None]
        return owner_len - min(known) > self._imbalanced_threshold


# ---------------------------------------------------------------------------------------------------- replicas


def _error(status: int, message: str, *, type_: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}},
                        status_code=status, headers=headers)


class EdgeVLMReplica:
    """One engine: server.py's application on a Unix socket of this replica, requests relayed to it."""

    async def __init__(self, config: server.ServerConfig):
        memory.configure()
        self.config = config
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._dir = tempfile.mkdtemp(prefix="edgevlm-replica-")
        self._socket = os.path.join(self._dir, "http.sock")
        self.app = server.make_app(config)
        self._runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=5)
        await self._runner.setup()
        await web.UnixSite(self._runner, self._socket).start()
        state = self.app[server.STATE]
        while state.model is None and state.load_error is None:  # ready (healthy) once loaded and warmed up
            await asyncio.sleep(0.05)
        if state.load_error is not None:
            raise RuntimeError(f"edgevlm: the model failed to load: {state.load_error}")
        self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self._socket),
                                              timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)

    async def forward(self, method: str, target: str, headers: list, body: bytes, *, affinity: str | None = None,
                      replica: str | None = None):
        """The response to one request, streamed: first {"status", "headers"}, then the body's bytes as they come.
        `affinity` and `replica` are for the router (CacheAffinityRouter) only."""
        async with self._session.request(method, "http://edgevlm" + target, headers=headers, data=body or None,
                                         allow_redirects=False) as response:
            try:
                yield {"status": response.status, "replica": self.replica_id,
                       "headers": [(k, v) for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS]}
                async for data in response.content.iter_any():
                    yield data
            except BaseException:  # cancelled (the client went away) or failed: the server sees the socket close
                response.close()  # and cancels the generation at its next step
                raise

    def check_health(self) -> None:
        """Serve's periodic check: a replica is healthy while its model is loaded and it is not draining."""
        state = self.app[server.STATE]
        if state.model is None or state.draining:
            raise RuntimeError(f"edgevlm replica {self.replica_id}: "
                               f"{'draining' if state.draining else state.load_error or 'not loaded'}")

    async def __del__(self):
        try:
            await server.drain(self.app, self.config.limits.shutdown_timeout)
            await self._session.close()
            await self._runner.cleanup()  # closes the model
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)


class FleetIngress:
    """The HTTP entry: reads the request, keys it, and streams the chosen replica's response back."""

    def __init__(self, engine, limits: dict):
        self.engine = engine
        self.max_body, self.read_timeout = limits["max_body_bytes"], limits["read_timeout"]

    async def _body(self, request: Request) -> bytes | Response:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return self._too_large()
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    return False
                chunks.append(chunk)
            return True

        try:
            if not await asyncio.wait_for(read(), self.read_timeout):
                return self._too_large()
        except asyncio.TimeoutError:
            return _error(408, f"the request body did not arrive within {self.read_timeout:g} s (edgevlm serve "
                               "--read-timeout)", type_="invalid_request_error", code="request_timeout")
        return b"".join(chunks)

    def _too_large(self) -> Response:
        return _error(413, f"request body too large: the limit is {self.max_body / 1e6:g} MB (edgevlm serve "
                           "--max-body-mb)", type_="invalid_request_error", code="request_too_large",
                      headers={"Connection": "close"})

    async def __call__(self, request: Request) -> Response:
        try:
            body = await self._body(request)
        except ClientDisconnect:
            return Response(status_code=499)
        if isinstance(body, Response):
            return body
        # The path inside this application: Serve's route prefix (an app at /edgevlm) is the ASGI root_path.
        path, root = request.scope["path"], request.scope.get("root_path", "").rstrip("/")
        if root and path.startswith(root + "/"):
            path = path[len(root):] or "/"
        key = None
        if request.method == "POST" and path == CHAT_PATH:
            try:
                key = affinity_key(json.loads(body))
            except (ValueError, RecursionError):  # not JSON: the replica answers the 400
                pass
        target = path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS]
        stream = self.engine.options(stream=True).forward.remote(
            request.method, target, headers, body, affinity=key, replica=request.headers.get(REPLICA_HEADER))
        try:
            head = await stream.__anext__()
        except BackPressureError:
            return _error(429, "every replica is busy and the fleet's queue is full; retry shortly",
                          type_="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        except Exception as exc:  # no replica could take it (died, or the fleet is shutting down)
            return _error(503, f"no replica could answer: {type(exc).__name__}", type_="server_error",
                          code="replica_unavailable")
        headers = {k.lower(): v for k, v in head["headers"]}
        headers[REPLICA_HEADER] = head["replica"]
        if not headers.get("content-type", "").startswith("text/event-stream"):
            return Response(b"".join([chunk async for chunk in stream]), status_code=head["status"], headers=headers)
        return StreamingResponse(self._relay(stream), status_code=head["status"], headers=headers)

    @staticmethod
    async def _relay(stream):
        try:
            async for chunk in stream:
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            stream.cancel()  # the client went away: the replica's relay and generation stop too
            raise
        except Exception as exc:  # the replica died mid-stream: end honestly, never like a finished answer
            error = {"error": {"message": f"the replica answering this stream failed: {type(exc).__name__}",
                               "type": "server_error", "param": None, "code": "replica_unavailable"}}
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()


# ---------------------------------------------------------------------------------------------------- building

_FLEET_OPTIONS = ("replicas", "num_cpus", "num_gpus", "ingress_replicas", "max_queued_requests")


def _serve_argv(flags: dict) -> list[str]:
    argv = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def build(model_path: str | os.PathLike | None = None, replicas: int = 2, *, num_cpus: float = 1,
          num_gpus: float = 0, ingress_replicas: int = 1, max_queued_requests: int | None = None,
          **serve_flags) -> serve.Application:
    """A Serve application of `replicas` edgevlm engines behind one OpenAI endpoint.

    `serve_flags` are `edgevlm serve`'s options by name (kv_budget_mb=500, max_batch=4, image_cache_mb=100,
    device="cuda", threads=2, api_key=..., max_queue=16, ...), parsed and checked by the same parser; host and
    port are Serve's (its http_options). Each replica reserves `num_cpus` CPUs and `num_gpus` GPUs (Ray
    resources) and runs onnxruntime on `threads` threads (default: num_cpus when it is a whole number). At most
    --max-queue requests run or wait on a replica; `max_queued_requests` more (default: replicas × max-queue) wait
    at the router; past that a 429.
    """
    from .cli import _resolve_model, build_parser

    if {"host", "port"} & serve_flags.keys():
        raise ValueError("host and port are Serve's own: set them in its http_options (serve start --http-host "
                         "--http-port, or a Serve config file)")
    if int(replicas) < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas!r}")
    if float(num_cpus) >= 1 and float(num_cpus).is_integer() and serve_flags.get("threads") is None:
        serve_flags["threads"] = int(float(num_cpus))
    try:
        args = build_parser().parse_args(["serve", *_serve_argv(serve_flags)])
    except SystemExit:  # argparse printed why on stderr
        raise ValueError(f"invalid edgevlm serve options: {serve_flags}") from None
    path = _resolve_model(str(model_path) if model_path is not None else None).resolve()
    if not (path / "model.json").is_file():
        raise ValueError(f"{path} is not an edgevlm model package (no model.json)")
    from .cli import server_config

    config = server_config(args, path)
    limits = config.limits
    max_queued = int(max_queued_requests) if max_queued_requests is not None else int(replicas) * limits.max_queue
    engine = serve.deployment(
        EdgeVLMReplica, name="EdgeVLMReplica", num_replicas=int(replicas),
        ray_actor_options={"num_cpus": float(num_cpus), "num_gpus": float(num_gpus)},
        max_ongoing_requests=limits.max_queue, max_queued_requests=max_queued,
        graceful_shutdown_timeout_s=limits.shutdown_timeout + 5, health_check_period_s=5,
        request_router_config=RequestRouterConfig(request_router_class=CacheAffinityRouter),
    ).bind(config)
    ingress = serve.deployment(
        FleetIngress, name="FleetIngress", num_replicas=int(ingress_replicas), ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=int(replicas) * limits.max_queue + max_queued,
    )
    return ingress.bind(engine, {"max_body_bytes": limits.max_body_bytes, "read_timeout": limits.read_timeout})


def app(args: dict) -> serve.Application:
    """`serve run edgevlm.runtime.fleet:app model=PATH replicas=N [num_cpus=C num_gpus=G] [any edgevlm serve flag
    as name=value]`: Serve's application builder (its values arrive as strings)."""
    args = {k.replace("-", "_"): v for k, v in args.items()}
    fleet = {k: args.pop(k) for k in _FLEET_OPTIONS if k in args}
    for name in ("replicas", "ingress_replicas", "max_queued_requests"):
        if name in fleet:
            fleet[name] = int(fleet[name])
    for name in ("num_cpus", "num_gpus"):
        if name in fleet:
            fleet[name] = float(fleet[name])
    return build(args.pop("model", None), **fleet, **args)


__all__ = ["CacheAffinityRouter", "EdgeVLMReplica", "FleetIngress", "affinity_key", "app", "build", "owner_order"]
