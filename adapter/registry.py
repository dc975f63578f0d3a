"""DB-GPT's in-memory model registry, rebuilt from its measured behaviour (docs/protocol.md §5.3).

This is the state behind the standalone controller API (``adapter/controller_api.py``) and the
fake controller of the tests. It does no I/O and never awaits, so on one event loop every call
is atomic. The rules, as measured on DB-GPT 0.8.2's ``EmbeddedModelRegistry``:

- identity is (``model_name``, ``host``, ``port``), with whitespace stripped from name and host;
- register: a new instance is stored as sent, but ``healthy`` forced true and ``last_heartbeat``
  = now; an existing one takes only ``weight``, ``prompt_template``, ``healthy=true`` and
  ``last_heartbeat`` (``enabled`` and ``check_healthy`` keep their first values);
- a heartbeat of an unknown instance registers it (that is how a restarted controller refills);
- delete is soft (``healthy=false``, still listed, revived by any later register or heartbeat)
  unless ``remove_from_registry``; deleting an unknown instance is not an error;
- expiry marks unhealthy, never deletes, when ``now - last_heartbeat > timeout`` and the instance
  has ``check_healthy``.

One quirk is deliberately not copied: DB-GPT's listing with an unknown ``model_name`` inserts an
empty key. Expiry runs on the monotonic clock (a wall-clock jump must not expire everything);
``last_heartbeat`` is still reported as DB-GPT does, naive local time, and always with
microseconds (DB-GPT's ``isoformat()`` drops them when they happen to be zero).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from protocol.dbgpt import ModelInstance

__all__ = ["ModelRegistry", "run_expiry"]

log = logging.getLogger("fastchat_adapter.controller")


@dataclass
class _Entry:
    """One stored instance: the body it was first registered with plus the mutable fields."""

    instance: ModelInstance
    weight: float
    prompt_template: str | None
    healthy: bool
    last_heartbeat: datetime
    seen: float  # monotonic time of the last register or heartbeat, for expiry
    own: bool = False  # written by this adapter itself (its EmbeddedController), not over HTTP

    def to_instance(self) -> ModelInstance:
        return self.instance.model_copy(
            update={
                "weight": self.weight,
                "prompt_template": self.prompt_template,
                "healthy": self.healthy,
                "last_heartbeat": self.last_heartbeat.isoformat(timespec="microseconds"),
            }
        )


class ModelRegistry:
    """Instances grouped by worker key in first-registration order, as DB-GPT lists them."""

    def __init__(
        self,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = datetime.now,
    ) -> None:
        self._monotonic = monotonic
        self._wall = wall
        self._by_name: dict[str, dict[tuple[str, int], _Entry]] = {}

    def register(self, instance: ModelInstance, *, own: bool = False) -> None:
        """``own``: the adapter registers one of its own models (see ``is_own``)."""
        name, host = instance.model_name.strip(), instance.host.strip()
        entry = self._find(name, host, instance.port)
        now_wall, now = self._wall(), self._monotonic()
        if entry is None:
            stored = instance.model_copy(update={"model_name": name, "host": host})
            self._by_name.setdefault(name, {})[(host, instance.port)] = _Entry(
                stored, instance.weight, instance.prompt_template, True, now_wall, now, own
            )
            return
        entry.weight, entry.prompt_template = instance.weight, instance.prompt_template
        entry.healthy, entry.last_heartbeat, entry.seen = True, now_wall, now
        entry.own = entry.own or own

    def heartbeat(self, instance: ModelInstance, *, own: bool = False) -> None:
        """Refresh a known instance; an unknown one is registered from the heartbeat body."""
        entry = self._find(instance.model_name.strip(), instance.host.strip(), instance.port)
        if entry is None:
            self.register(instance, own=own)
            return
        entry.healthy, entry.last_heartbeat, entry.seen = True, self._wall(), self._monotonic()

    def is_own(self, model_name: str) -> bool:
        """Some instance of this worker key was written by the adapter itself: the HTTP API
        must not delete it or add instances beside it (``adapter/controller_api.py``)."""
        entries = self._by_name.get(model_name.strip(), {})
        return any(entry.own for entry in entries.values())

    def deregister(
        self, model_name: str, host: str, port: int, *, remove_from_registry: bool = False
    ) -> None:
        name, host = model_name.strip(), host.strip()
        entries = self._by_name.get(name, {})
        if remove_from_registry:
            entries.pop((host, port), None)
            if not entries:
                self._by_name.pop(name, None)
        elif (entry := entries.get((host, port))) is not None:
            entry.healthy = False

    def instances(
        self, model_name: str | None = None, *, healthy_only: bool = False
    ) -> list[ModelInstance]:
        """Every instance, or those of one worker key; an empty name means all (like DB-GPT)."""
        everything = list(self._by_name.values())
        groups = [self._by_name.get(model_name, {})] if model_name else everything
        return [
            entry.to_instance()
            for group in groups
            for entry in group.values()
            if entry.healthy or not healthy_only
        ]

    def expire(self, timeout: float) -> list[str]:
        """Mark unhealthy what has been silent longer than ``timeout`` seconds; return the keys
        newly marked (``name@type host:port``), for logging."""
        now, marked = self._monotonic(), []
        for name, group in self._by_name.items():
            for (host, port), entry in group.items():
                if entry.instance.check_healthy and now - entry.seen > timeout and entry.healthy:
                    entry.healthy = False
                    marked.append(f"{name} {host}:{port}")
        return marked

    def clear(self) -> None:
        """Forget everything, as a controller restart does."""
        self._by_name.clear()

    def _find(self, name: str, host: str, port: int) -> _Entry | None:
        return self._by_name.get(name, {}).get((host, port))


async def run_expiry(registry: ModelRegistry, *, interval: float, timeout: float) -> None:
    """The registry's checker: every ``interval`` seconds, mark unhealthy what has been silent
    for more than ``timeout``. So an instance turns unhealthy between ``timeout`` and
    ``timeout + interval`` after its last heartbeat, as on DB-GPT. Cancelled at shutdown."""
    while True:
        await asyncio.sleep(interval)
        for key in registry.expire(timeout):
            log.info("no heartbeat from %s for %g s: marked unhealthy", key, timeout)
