"""DB-GPT's model-controller HTTP API over ``adapter.registry`` (docs/protocol.md §5.2).

Mounted by ``adapter/app.py`` in standalone mode (no ``--controller-address``), so a DB-GPT
apiserver can use the adapter's own address as its ``controller_addr``; the tests' fake
controller serves the same router. The expiry checker lives beside the registry
(``adapter.registry.run_expiry``). Shapes, as measured on DB-GPT 0.8.2:

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

from typing import Any

from fastapi import APIRouter

from adapter.registry import ModelRegistry
from protocol.dbgpt import ModelInstance

__all__ = ["controller_router"]


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
