"""The ASGI application: DB-GPT's worker API, the standalone controller API and the probes.

Data flows one way: a route (``worker_api``) asks ``protocol.translate`` to build the FastChat
request, ``upstream`` sends it, ``protocol.translate`` turns each answer back into DB-GPT's shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from adapter import __version__, ops_api, worker_api
from adapter.controller_api import WritePolicy, controller_router
from adapter.logs import AccessLogMiddleware
from adapter.runtime import Runtime
from adapter.settings import Settings
from adapter.streaming import RAW_SEND, expose_raw_send


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    runtime = runtime or Runtime.create(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="fastchat-adapter", version=__version__, lifespan=lifespan)
    app.state.runtime = runtime
    app.include_router(worker_api.router)  # /api/worker/*: DB-GPT's worker API
    app.add_middleware(worker_api.StreamLane)  # added first = innermost: inside the guard
    ops_api.mount(app, settings)  # probes, metrics, body limit, API key, access log
    if runtime.registry is not None:  # standalone: we are the DB-GPT controller too
        app.include_router(controller_router(runtime.registry, write_policy(runtime)))
    return app


def write_policy(runtime: Runtime) -> WritePolicy:
    """Who may write our standalone registry over HTTP (README, "Threat model")."""
    settings, refused = runtime.settings, runtime.metrics.controller_writes_refused
    return WritePolicy(
        accept_workers=settings.controller_accept_workers,
        api_key=settings.api_key,
        allow_hosts=frozenset(settings.controller_allow_hosts),
        on_refused=lambda reason: refused.labels(reason).inc(),
    )


def front(app: FastAPI) -> ASGIApp:
    """What the server runs: ``app`` with the server's own ``send`` exposed (``streaming``),
    and ``POST /api/worker/generate_stream`` entered at our access log, past the layers FastAPI
    and Starlette put outside it (error, telemetry and body-limit middleware: 7 % of a short
    stream's CPU, py-spy). Inside, the same layers as any route: access log, guard, the
    stream's lane. An unexpected error reaches the server, which logs it and answers 500 if
    nothing was sent (the answer Starlette's error middleware would have sent)."""
    outer = expose_raw_send(app)
    lane: ASGIApp | None = None

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal lane
        if (
            scope["type"] == "http"
            and scope["path"] == worker_api.STREAM_PATH
            and scope["method"] == "POST"
            and not scope.get("root_path")
        ):
            lane = lane or _access_log_layer(app)
            if lane is not None:
                scope["app"], scope[RAW_SEND] = app, send
                await lane(scope, receive, send)
                return
        await outer(scope, receive, send)

    return serve


def _access_log_layer(app: FastAPI) -> ASGIApp | None:
    """The access log in ``app``'s middleware stack (built now if it was not yet), or None."""
    if app.middleware_stack is None:
        app.middleware_stack = app.build_middleware_stack()
    layer: object = app.middleware_stack
    while layer is not None and not isinstance(layer, AccessLogMiddleware):
        layer = getattr(layer, "app", None)
    return cast(ASGIApp | None, layer)
