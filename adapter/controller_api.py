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

Two guards DB-GPT's controller does not have (README, "Threat model"):

- **Strict bodies.** A body is decoded with ``protocol.strict_json``: a lone surrogate, a
  non-finite number or runaway nesting is a 422 like any malformed body, never stored (one
  stored surrogate used to make every later listing a 500). Listings are rendered so that no
  stored value can make them fail.
- **Who may write** (``WritePolicy``): reads stay open (DB-GPT's clients send no credentials),
  but a write naming a worker key the adapter registered itself is refused (403) whoever sends
  it, and writes from other workers need ``--controller-accept-workers``, the API key when one
  is set, and a client address in ``--controller-allow-hosts`` when that list is given. Every
  refusal is a 403 ``{"detail"}`` saying why, counted by the caller's ``on_refused``.

One divergence: an explicit ``null`` for ``weight``, ``check_healthy``, ``healthy``, ``enabled``
or ``remove_from_registry`` is a 422 here (DB-GPT's dataclass types them ``Optional`` and stores
the null). No DB-GPT client sends one, and a stored null would break expiry and listings.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from adapter.registry import ModelRegistry
from protocol import strict_json
from protocol.dbgpt import ModelInstance
from protocol.errors import InvalidRequest

__all__ = ["WritePolicy", "controller_router"]

log = logging.getLogger("fastchat_adapter.controller")


@dataclass(frozen=True)
class WritePolicy:
    """Who may register, heartbeat or delete through the HTTP API. The default is DB-GPT's own
    (anyone), which the tests' fake controller keeps; the adapter builds a closed one from its
    settings (``adapter/app.py``)."""

    accept_workers: bool = True
    api_key: str | None = None
    allow_hosts: frozenset[str] = frozenset()
    on_refused: Callable[[str], None] = lambda reason: None

    def refusal(
        self, registry: ModelRegistry, model_name: str, request: Request
    ) -> tuple[str, str] | None:
        """``(reason, message)`` when this write must be refused, else ``None``."""
        client = request.client.host if request.client else "unknown"
        if registry.is_own(model_name):
            return "own_entry", (
                f"{model_name.strip()!r} is registered by this adapter itself: its entries "
                "change only with the adapter's own workers"
            )
        if not self.accept_workers:
            return "disabled", (
                "this controller keeps only the adapter's own models; start the adapter with "
                "--controller-accept-workers to let other workers register"
            )
        if self.allow_hosts and client not in self.allow_hosts:
            return "host", f"client {client} is not in --controller-allow-hosts"
        if self.api_key is not None:
            given = request.headers.get("authorization", "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return "api_key", (
                    "missing or wrong API key: send 'Authorization: Bearer <key>' to write"
                )
        return None


class _StrictJSONRequest(Request):
    """``json()`` through ``protocol.strict_json``. FastAPI turns a ``JSONDecodeError`` raised
    here into its own 422 ``json_invalid`` answer, with our message in ``ctx.error``."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            raw = await self.body()
            try:
                self._json = strict_json.loads(raw)
            except InvalidRequest as exc:
                if isinstance(exc.__cause__, json.JSONDecodeError):
                    raise exc.__cause__ from None  # FastAPI's own answer, with the offset
                doc = raw.decode("utf-8", "replace")
                raise json.JSONDecodeError(str(exc), doc, 0) from None
        return self._json


class _StrictRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict


def _listing(instances: list[ModelInstance]) -> Response:
    """A listing no stored value can break: ASCII escapes for any string, and an entry that
    still cannot be written (a non-finite weight) is left out and logged, not a 500."""
    rendered: list[str] = []
    for instance in instances:
        try:
            rendered.append(json.dumps(instance.to_wire(), allow_nan=False))
        except ValueError:
            log.warning("registry entry %r cannot be listed: left out", instance.model_name)
    return Response(f"[{','.join(rendered)}]", media_type="application/json")


def controller_router(registry: ModelRegistry, policy: WritePolicy | None = None) -> APIRouter:
    """The five controller routes, under ``/api`` like DB-GPT's."""
    policy = policy or WritePolicy()
    router = APIRouter(prefix="/api", tags=["DB-GPT controller"], route_class=_StrictRoute)

    def guarded(model_name: str, request: Request, change: Callable[[], None]) -> Response | bool:
        """Apply ``change`` to the registry, or answer 403 if the policy refuses the write."""
        verdict = policy.refusal(registry, model_name, request)
        if verdict is None:
            change()
            return True
        reason, message = verdict
        policy.on_refused(reason)
        log.warning("controller write refused (%s): %s", reason, message)
        return JSONResponse({"detail": message}, 403)

    @router.get("/health")
    async def health() -> dict[str, str]:
        # DB-GPT's clients poll this every 5 s; without it each of their calls waits 2 s.
        return {"status": "ok"}

    @router.post("/controller/models", response_model=bool)
    async def register_instance(instance: ModelInstance, request: Request) -> Response | bool:
        return guarded(instance.model_name, request, lambda: registry.register(instance))

    @router.post("/controller/heartbeat", response_model=bool)
    async def heartbeat(instance: ModelInstance, request: Request) -> Response | bool:
        return guarded(instance.model_name, request, lambda: registry.heartbeat(instance))

    @router.delete("/controller/models", response_model=bool)
    async def deregister_instance(
        request: Request,
        model_name: str,
        host: str,
        port: int,
        remove_from_registry: bool = False,
    ) -> Response | bool:
        return guarded(
            model_name,
            request,
            lambda: registry.deregister(
                model_name, host, port, remove_from_registry=remove_from_registry
            ),
        )

    @router.get("/controller/models", response_model=list[dict[str, Any]])
    async def list_instances(model_name: str | None = None, healthy_only: bool = False) -> Response:
        return _listing(registry.instances(model_name, healthy_only=healthy_only))

    return router
