"""The registrar's side of a DB-GPT controller: three calls, two ways to reach it.

``HttpController`` talks to a real controller (``--controller-address``) over the process's one
pooled HTTP client, sending exactly what DB-GPT's own ``ModelRegistryClient`` sends
(docs/protocol.md §5.5). ``EmbeddedController`` writes into the adapter's own registry in
standalone mode: in-process rather than over loopback HTTP because the adapter's lifespan
startup (where registration begins) runs before uvicorn has bound its socket, and because the
bind host need not be reachable as 127.0.0.1. Both present the same interface, so the
registrar has one code path for both.

``FailoverController`` puts several controllers that share one registry database (DB-GPT's HA
deployment) behind one link: each call goes to one of them, the next one on failure, as DB-GPT's
own workers do. Sending every call to all of them instead would race in the shared database
(register is a SELECT then an INSERT, without a lock) and leave duplicate rows.

Every failure (refused, timed out, non-2xx) is one ``ControllerError``; the registrar retries.
When a controller answers 404 or 405, ``identify`` asks what else the address might be: a
FastChat controller or worker given as ``--controller-address`` (FastChat's own meaning of that
flag) is the usual mistake, and the registrar's warning says so.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from adapter.errors import ControllerError, ControllerReason
from adapter.registry import ModelRegistry
from protocol.dbgpt import ModelInstance

__all__ = ["ControllerLink", "EmbeddedController", "FailoverController", "HttpController"]

log = logging.getLogger("fastchat_adapter.registration")

# A controller call is a dict operation on the far side; anything slower means trouble, and a
# slow call holds up that controller's queue (never the others', nor request serving).
CALL_TIMEOUT = 5.0


class ControllerLink(Protocol):
    """What the registrar needs from one controller. ``name`` labels logs and metrics."""

    @property
    def name(self) -> str: ...

    async def register(self, instance: ModelInstance) -> None: ...

    async def heartbeat(self, instance: ModelInstance) -> None: ...

    async def deregister(
        self, instance: ModelInstance, *, remove: bool, timeout: float = CALL_TIMEOUT
    ) -> None: ...

    async def identify(self) -> str | None:
        """A hint when the address answers like something other than a DB-GPT controller."""


@dataclass(frozen=True)
class HttpController:
    """A DB-GPT controller at ``name``, its URL (no trailing slash)."""

    name: str
    http: httpx.AsyncClient

    async def register(self, instance: ModelInstance) -> None:
        await self._send("POST", "/api/controller/models", json=instance.to_wire())

    async def heartbeat(self, instance: ModelInstance) -> None:
        # The full body, not just the key: a heartbeat of an unknown instance registers it
        # from this body, which is how a restarted controller gets everything back (§5.3).
        await self._send("POST", "/api/controller/heartbeat", json=instance.to_wire())

    async def deregister(
        self, instance: ModelInstance, *, remove: bool, timeout: float = CALL_TIMEOUT
    ) -> None:
        # DELETE reads only the query string (§5.2). A soft delete leaves the parameter out
        # altogether, so it means the same on controllers older than 0.7.
        params = instance.delete_params(remove_from_registry=remove)
        if not remove:
            del params["remove_from_registry"]
        await self._send("DELETE", "/api/controller/models", params=params, timeout=timeout)

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        params: dict[str, str] | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> None:
        try:
            response = await self.http.request(
                method, self.name + path, json=json, params=params, timeout=timeout
            )
        except httpx.HTTPError as exc:
            reason = _reason(exc)
            detail = f"{method} {path}: {reason}: {str(exc) or type(exc).__name__}"
            raise ControllerError(self.name, detail, reason=reason) from exc
        if not response.is_success:
            status, body = response.status_code, response.text[:300]
            detail = f"{method} {path}: HTTP {status} {body}"
            raise ControllerError(self.name, detail, reason="http_status", status=status)

    async def identify(self) -> str | None:
        # A FastChat controller answers POST /list_models (§2); a worker, /worker_get_status
        # (§1.1; a FastChat controller answers that one too, so it is asked second).
        if await self._answers_with("/list_models", "models"):
            return (
                "it answers like a FastChat controller: give it as "
                "--fastchat-controller-address; --controller-address takes DB-GPT controllers"
            )
        if await self._answers_with("/worker_get_status", "model_names"):
            return (
                "it answers like a FastChat worker: give it as --worker-address; "
                "--controller-address takes DB-GPT controllers"
            )
        return None

    async def _answers_with(self, path: str, key: str) -> bool:
        try:
            response = await self.http.post(self.name + path, json={}, timeout=CALL_TIMEOUT)
            reply: Any = response.json() if response.is_success else None
        except (httpx.HTTPError, ValueError):
            return False
        return isinstance(reply, dict) and key in reply


def _reason(exc: httpx.HTTPError) -> ControllerReason:
    if isinstance(exc, httpx.ConnectError):
        return "unreachable"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    return "broken"


@dataclass(frozen=True)
class EmbeddedController:
    """The adapter's own registry (standalone mode): immediate, and it cannot fail."""

    name: str
    registry: ModelRegistry

    # own=True: entries the HTTP API may not touch (adapter/controller_api.py, WritePolicy).
    async def register(self, instance: ModelInstance) -> None:
        self.registry.register(instance, own=True)

    async def heartbeat(self, instance: ModelInstance) -> None:
        self.registry.heartbeat(instance, own=True)

    async def deregister(
        self, instance: ModelInstance, *, remove: bool, timeout: float = CALL_TIMEOUT
    ) -> None:
        self.registry.deregister(
            instance.model_name, instance.host, instance.port, remove_from_registry=remove
        )

    async def identify(self) -> str | None:
        return None  # it is ours, and never fails


class FailoverController:
    """Controllers sharing one registry, as one link: every call goes to the *active* one; on
    a failure the same call goes to the next in the list, and the first that answers becomes
    active (sticky: it stays so until it fails). Only when all fail does the call fail.
    ``on_failover(url)`` is told each switch. Calls are never sent to two controllers at once,
    so the shared registry sees one writer per instance, as with DB-GPT's own workers."""

    def __init__(
        self, links: Sequence[ControllerLink], on_failover: Callable[[str], None] | None = None
    ) -> None:
        if not links:
            raise ValueError("FailoverController needs at least one controller")
        self._links = list(links)
        self._on_failover = on_failover
        self._active = 0

    @property
    def name(self) -> str:
        return ",".join(link.name for link in self._links)

    @property
    def active(self) -> str:
        """The controller that gets the next call."""
        return self._links[self._active].name

    async def register(self, instance: ModelInstance) -> None:
        await self._first_that_answers(lambda link: link.register(instance))

    async def heartbeat(self, instance: ModelInstance) -> None:
        await self._first_that_answers(lambda link: link.heartbeat(instance))

    async def deregister(
        self, instance: ModelInstance, *, remove: bool, timeout: float = CALL_TIMEOUT
    ) -> None:
        await self._first_that_answers(
            lambda link: link.deregister(instance, remove=remove, timeout=timeout)
        )

    async def _first_that_answers(self, call: Callable[[ControllerLink], Awaitable[None]]) -> None:
        start = self._active
        failures: list[ControllerError] = []
        for step in range(len(self._links)):
            index = (start + step) % len(self._links)
            link = self._links[index]
            try:
                await call(link)
            except ControllerError as exc:
                failures.append(exc)
                continue
            if index != self._active:
                log.warning("controller failover: %s -> %s", self.active, link.name)
                self._active = index
                if self._on_failover is not None:
                    self._on_failover(link.name)
            return
        last = failures[-1]
        detail = "every controller failed: " + "; ".join(map(str, failures))
        raise ControllerError(self.name, detail, reason=last.reason, status=last.status)

    async def identify(self) -> str | None:
        for link in self._links:
            hint = await link.identify()
            if hint:
                return f"{link.name}: {hint}"
        return None
