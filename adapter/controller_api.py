"""DB-GPT's model-controller HTTP API over ``adapter.registry`` (PROTOCOLS.md §5.2).

Mounted by ``adapter/app.py`` in standalone mode (no ``--controller-address``), so a DB-GPT
apiserver can use the adapter's own address as its ``controller_addr``; the tests' fake
controller serves the same router. Shapes, as measured on DB-GPT 0.8.2:

- every successful call answers the bare JSON ``true``, a DELETE of an unknown instance too;
- register and heartbeat take a JSON ModelInstance (unknown keys dropped, a numeric-string
  ``port`` coerced); DELETE reads only its query string; GET lists exactly DB-GPT's keys;
- malformed input gets FastAPI's own 422 ``{"detail": [...]}``, because DB-GPT's controller is
  a FastAPI app with the same signatures, so the same validation produces the same errors.

One divergence: an explicit ``null`` for ``weight``, ``check_healthy``, ``healthy``, ``enabled``
or ``remove_from_registry`` is a 422 here (DB-GPT's dataclass types them ``Optional`` and stores
the null). No DB-GPT client sends one, and a stored null would break expiry and listings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import APIRouter, FastAPI

from adapter.registry import ModelRegistry
from protocol.dbgpt import ModelInstance

__all__ = ["controller_app", "controller_router", "run_expiry"]

log = logging.getLogger("fastchat_adapter.controller")


def controller_router(registry: ModelRegistry) -> APIRouter:
    """The five controller routes, under ``/api`` like DB-GPT's."""
    router = APIRouter(prefix="/api", tags=["DB-GPT controller"])

    @router.get("/health")
    async def health() -> dict[str, str]:
        # DB-GPT's clients poll this every 5 s; without it each of their calls waits 2 s.
        return {"status": "ok"}

    @router.post("/controller/models")
    async def register_instance(instance: ModelInstance) -> bool:
        registry.register(instance)
        return True

    @router.post("/controller/heartbeat")
    async def heartbeat(instance: ModelInstance) -> bool:
        registry.heartbeat(instance)
        return True

    @router.delete("/controller/models")
    async def deregister_instance(
        model_name: str, host: str, port: int, remove_from_registry: bool = False
    ) -> bool:
        registry.deregister(model_name, host, port, remove_from_registry=remove_from_registry)
        return True

    @router.get("/controller/models")
    async def list_instances(
        model_name: str | None = None, healthy_only: bool = False
    ) -> list[dict[str, Any]]:
        return [i.to_wire() for i in registry.instances(model_name, healthy_only=healthy_only)]

    return router


async def run_expiry(registry: ModelRegistry, *, interval: float, timeout: float) -> None:
    """The registry's checker: every ``interval`` seconds, mark unhealthy what has been silent
    for more than ``timeout``. So an instance turns unhealthy between ``timeout`` and
    ``timeout + interval`` after its last heartbeat, as on DB-GPT. Cancelled at shutdown."""
    while True:
        await asyncio.sleep(interval)
        for key in registry.expire(timeout):
            log.info("no heartbeat from %s for %g s: marked unhealthy", key, timeout)


def controller_app(
    registry: ModelRegistry, *, heartbeat_interval: float, heartbeat_timeout: float
) -> FastAPI:
    """A controller on its own (the API plus its expiry checker), like ``dbgpt start
    controller``; used by the tests' fake controller."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        checker = asyncio.create_task(
            run_expiry(registry, interval=heartbeat_interval, timeout=heartbeat_timeout),
            name="registry-expiry",
        )
        try:
            yield
        finally:
            checker.cancel()
            with suppress(asyncio.CancelledError):
                await checker

    app = FastAPI(title="DB-GPT model controller (fastchat-adapter)", lifespan=lifespan)
    app.include_router(controller_router(registry))
    return app
