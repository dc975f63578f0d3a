"""The ASGI application: DB-GPT's worker API, the standalone controller API and the probes.

Data flows one way: a route (``worker_api``) asks ``protocol.translate`` to build the FastChat
request, ``upstream`` sends it, ``protocol.translate`` turns each answer back into DB-GPT's shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adapter import __version__, ops_api, worker_api
from adapter.controller_api import WritePolicy, controller_router
from adapter.runtime import Runtime
from adapter.settings import Settings


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
