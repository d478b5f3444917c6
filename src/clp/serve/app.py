"""The FastAPI app: OpenAI-compatible routes over one ``clp.api.Model``.

``create_app(model)`` takes an already loaded model (tests pass a tiny random backbone);
``run(model, ...)`` serves it with uvicorn. Everything that can be refused is refused before
the request is queued, so a bad request costs the backbone nothing and never disturbs the
generations of others.
"""

from __future__ import annotations

import asyncio
import hmac
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from clp.api import MODES, Model
from clp.errors import ClpError
from clp.serve import protocol
from clp.serve.engine import Engine, Job, on_torch_thread
from clp.serve.prometheus import ServerMetrics
from clp.serve.protocol import ApiError, GenRequest, Limits

DISCONNECT_POLL_SECONDS = 0.05
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PROM_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text exposition format


@dataclass
class ServerConfig:
    """What ``clp serve`` sets: the served name, the default mode, the limits, the key."""

    model_name: str | None = None  # the id in /v1/models; default: the backbone's name
    mode: str | None = None  # of requests that set none; None: the model's default_mode
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_queue: int = 64  # requests that may wait; more get 429
    default_max_tokens: int = 512  # for requests that set no max_tokens
    max_body_bytes: int = 4 << 20  # larger request bodies get 413
    tree_nodes: int = 0  # verify requests draft a tree of this many nodes (0: a chain)
    tree: str = "dynamic"  # its shape: dynamic or static

    def validate(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ClpError(f"unknown mode '{self.mode}'; available: {', '.join(MODES)}")
        if self.max_queue < 1:
            raise ClpError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.default_max_tokens < 1:
            raise ClpError(f"default max tokens must be >= 1, got {self.default_max_tokens}")


class CountRequests:
    """Counts every answered request by path and status, streamed or not. A plain ASGI
    middleware: starlette's BaseHTTPMiddleware would buffer streams and hide disconnects."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.request(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counted)


def create_app(model: Model, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app serving ``model``; its engine starts and stops with the app's lifespan."""
    config = config or ServerConfig()
    config.validate()
    if config.mode is None:
        config = replace(config, mode=model.default_mode)
    on_torch_thread(_load_artifacts, model, config.mode)
    if config.tree_nodes:  # a tree the runtime or the heads cannot draft fails at start
        on_torch_thread(policy_for, model, config, "verify")
    name = config.model_name or model.backbone.name
    metrics = ServerMetrics()
    engine = Engine(model, config.max_queue, metrics)
    limits = Limits(
        model_name=name,
        context_length=model.backbone.context_length,
        vocab_size=len(model.tokenizer),
        default_mode=config.mode,
        default_max_tokens=config.default_max_tokens,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="clp", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.add_middleware(CountRequests, metrics=metrics)
    _add_error_handlers(app)
    server = _Routes(model, config, name, limits, engine)

    app.get("/health")(server.health)
    app.get("/metrics")(server.metrics)
    app.get("/v1/models")(server.models)
    app.post("/v1/chat/completions")(server.chat)
    app.post("/v1/completions")(server.completions)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal, ours or the framework's (unknown route, wrong method), as OpenAI's
    error object."""

    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


class _Routes:
    """The route handlers, sharing the model, the limits and the engine."""

    def __init__(self, model: Model, config: ServerConfig, name: str, limits, engine: Engine):
        self.model, self.config, self.name = model, config, name
        self.limits, self.engine = limits, engine
        self.started = int(time.time())

    async def health(self) -> dict:
        """Liveness for load balancers and scripts: up, which model, how busy."""
        q = self.engine.queue
        return {
            "status": "ok",
            "model": self.name,
            "mode": self.config.mode,
            "queue_length": q.qsize() if q else 0,
            "running": int(self.engine.current is not None),
        }

    async def metrics(self) -> PlainTextResponse:
        """Prometheus scrapes this; open like /health, it holds counts and no content."""
        return PlainTextResponse(self.engine.metrics.render(), media_type=PROM_TYPE)

    async def models(self, request: Request) -> dict:
        self._check_key(request)
        card = {"id": self.name, "object": "model", "created": self.started, "owned_by": "clp"}
        return {"object": "list", "data": [card]}

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, protocol.parse_chat)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, protocol.parse_completion)

    async def _complete(self, request: Request, parse: Callable) -> Response:
        """Validate, queue, then stream the events or wait for the result."""
        self._check_key(request)
        data = protocol.parse_json(await self._body(request))
        req: GenRequest = parse(data, self.model.tokenizer, self.limits)
        job = Job(req, await self._policy(req), asyncio.get_running_loop())
        self.engine.submit(job)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        if req.stream:
            return StreamingResponse(
                self._sse(job, watcher), media_type="text/event-stream", headers=SSE_HEADERS
            )
        try:
            result = await job.result()
        finally:
            watcher.cancel()
            job.cancel()  # a no-op when done; stops the generation if this handler was cancelled
        if result.stop_reason == "cancelled":  # nobody to answer; 499 in the request counts
            raise ApiError(499, "the client disconnected", code="cancelled")
        return JSONResponse(protocol.response(req, result, self.name))

    async def _sse(self, job: Job, watcher: asyncio.Task) -> AsyncIterator[bytes]:
        """The chunks of a streamed reply, ``data: [DONE]`` last. A chat stream opens with
        the assistant role at once, so the client sees the request accepted while it queues."""
        req = job.request
        try:
            if req.kind == "chat":
                yield protocol.sse(protocol.chunk(req, self.name, None))
            async for kind, value in job.stream():
                if job.cancelled.is_set():
                    return  # the client is gone: nothing to send it
                if kind == "text":
                    yield protocol.sse(protocol.chunk(req, self.name, value))
                elif kind == "error":
                    yield protocol.sse(value.body())
                else:
                    for c in protocol.final_chunks(req, value, self.name):
                        yield protocol.sse(c)
            yield protocol.sse("[DONE]")
        finally:
            watcher.cancel()
            job.cancel()

    def _check_key(self, request: Request) -> None:
        """401 unless the request carries the server's key (only when one is set)."""
        key = self.config.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), key):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    async def _body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit (declared or not)."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise _too_large(limit)
        except ClientDisconnect:  # gone before its body arrived: nobody to answer
            raise ApiError(499, "the client disconnected", code="cancelled") from None
        return bytes(body)

    async def _policy(self, req: GenRequest):
        """A fresh policy for the request's mode, built from the artifacts loaded at start."""
        try:
            return policy_for(self.model, self.config, req.mode, req.tau)
        except ClpError as exc:
            raise ApiError(400, str(exc), param="tau" if "tau" in str(exc) else "mode") from exc


def policy_for(model: Model, config: ServerConfig, mode: str, tau: float | None = None):
    """The policy of ``mode``; verify drafts the server's tree."""
    trees = {"tree_nodes": config.tree_nodes, "tree": config.tree} if mode == "verify" else {}
    return model.policy(mode, tau, **trees)


def _load_artifacts(model: Model, default_mode: str) -> None:
    """Load what every mode needs, on the torch thread, so a request's policy is built without
    running torch anywhere else. The default mode must work (fail at start, not at the first
    request); another mode whose artifacts are missing fails on its requests."""
    model.policy(default_mode)
    for mode in MODES:
        try:
            model.policy(mode)
        except ClpError:
            pass


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` when its client goes away, whether it waits in the queue or runs (a
    streamed response notices only when it next writes; this notices within 50 ms)."""
    while not job.finished:
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


def run(
    model: Model,
    config: ServerConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Serve ``model`` until Ctrl-C."""
    import uvicorn

    config = config or ServerConfig()
    if host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(
            f"warning: serving on {host} without --api-key: anyone who reaches it can use it",
            file=sys.stderr,
        )
    app = create_app(model, config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
