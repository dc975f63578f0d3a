"""Keeps every DB-GPT controller's view of this adapter true: the registration lifecycle.

What is registered: for each model name a live worker serves, the instance ``name@llm`` (or
``name@text2vec`` for embedding workers) at the adapter's advertised host and port, with the
full ModelInstance body DB-GPT's own workers send (§5.5); optionally ``WorkerManager@service``.
``weight`` stays 1.0: DB-GPT 0.8 routes by ``random.choice`` and ignores it (§5.4), and only a
register (not a heartbeat) updates it, so forwarding queue length there would buy nothing;
queue length and speed are exported as metrics by the pool instead.

The lifecycle, in order:

1. ``start``: one task per controller, woken whenever there is something to send, converges
   that controller to the live set: pending deletes first, then registers of what it lacks,
   then heartbeats when one is due. All calls to one controller come from its one task, so
   they reach it in order (a heartbeat can never overtake the delete that followed it). A
   failing controller is retried with exponential backoff and jitter, capped at one heartbeat
   interval; the others are not held up, and requests are served all the while. Its failures
   are counted (``registration_failures_total``) and logged with their cause at the first one,
   then every ``WARN_EVERY`` seconds; an address that answers 404/405 is asked whether it is a
   FastChat controller or worker, and the warning says so (``ControllerLink.identify``).
2. every ``heartbeat_interval``: poll the workers (``pool.refresh``), then heartbeat only what
   the workers that answered serve. A heartbeat re-creates a deleted instance (§10 item 18),
   so a dead worker's models are never heartbeated; the same re-creation is what puts
   everything back on a restarted controller within one interval.
3. pool events: a worker that stops answering has its models soft-deleted (unhealthy, still
   listed) at once; when it answers again they are registered (revived); names dropped from a
   worker's list are hard-deleted, new ones registered. A name still served by another live
   worker of the same type is left alone.
4. ``shutdown`` (SIGTERM, before streams drain): no call may start any more, heartbeats stop
   (an in-flight call is let finish, so nothing lands after the deletes), then every
   instance is deleted with ``remove_from_registry=true`` on every controller, concurrently,
   each call bounded by a short timeout.

With ``--controller-mode failover`` the controllers share one registry database and are one
link (``FailoverController``): each call goes to one of them, the next on failure. Models that
``dbgpt model stop`` took out (``stop_model``) stay out of registers and heartbeats until
``start_model``.

``registered_everywhere`` (readiness): every live instance is registered on every controller,
except controllers whose last call failed, and on at least one. So a single controller down at
start keeps the adapter not-ready; with several, an unreachable one does not block readiness
while it is being retried. With nothing to register it is vacuously true (the runtime's
readiness requires a live worker anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_exponential, wait_random_exponential

from adapter.controller_client import (
    ControllerLink,
    EmbeddedController,
    FailoverController,
    HttpController,
)
from adapter.errors import ControllerError
from adapter.metrics import Metrics
from adapter.pool import PoolEvent, WorkerPool
from adapter.registry import ModelRegistry
from adapter.settings import Settings
from protocol.dbgpt import ModelInstance, WorkerType, worker_key
from protocol.errors import InvalidMessage

__all__ = ["SERVICE_KEY", "Registrar"]

log = logging.getLogger("fastchat_adapter.registration")

SERVICE_KEY = "WorkerManager@service"  # DB-GPT's worker-manager entry (§5.4)
SHUTDOWN_CALL_TIMEOUT = 2.0  # per deregistration call at SIGTERM; all run concurrently
# A controller that keeps failing is warned about (with the cause) at its first failure, then
# at most this often: retries run every few seconds and must not flood the log.
WARN_EVERY = 60.0

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


class _Closed(Exception):
    """Shutdown began: the controller task must not send anything more."""


@dataclass
class _Controller:
    """What we believe one controller holds, and what we still owe it."""

    link: ControllerLink
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    call_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # held during one call
    registered: set[str] = field(default_factory=set)  # keys it holds healthy, as we know
    known: set[str] = field(default_factory=set)  # every key ever sent (deleted at shutdown)
    pending: dict[str, bool] = field(default_factory=dict)  # key -> hard? deletes owed
    heartbeat_due: bool = False
    reachable: bool | None = None  # outcome of the last call; None before the first
    task: asyncio.Task[None] | None = None
    last_warning: float | None = None  # loop time of the last failure warning
    hint: str | None = None  # what the address answers like, when not a DB-GPT controller
    identified: bool = False  # the hint was looked for (once per process)


class Registrar:
    def __init__(
        self, settings: Settings, pool: WorkerPool, metrics: Metrics, links: list[ControllerLink]
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._metrics = metrics
        self._controllers = [_Controller(link) for link in links]
        self._interval = settings.heartbeat_interval
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._closed = False
        self._bad_names: set[str] = set()
        self._stopped: set[str] = set()  # keys `dbgpt model stop` took out of the registry

    @classmethod
    def create(
        cls,
        settings: Settings,
        pool: WorkerPool,
        http: httpx.AsyncClient,
        metrics: Metrics,
        registry: ModelRegistry | None,
    ) -> Registrar:
        """Links to every ``--controller-address`` (fan-out), to one of them at a time
        (``--controller-mode failover``), or to our own registry when standalone."""
        links: list[ControllerLink]
        if registry is not None:
            links = [EmbeddedController(settings.effective_controllers[0], registry)]
        else:
            links = [HttpController(url, http) for url in settings.controller_address]
        if settings.controller_mode == "failover" and len(links) > 1:
            count = metrics.controller_failovers
            links = [FailoverController(links, lambda url: count.labels(url).inc())]
        return cls(settings, pool, metrics, links)

    # --- 1. start -----------------------------------------------------------------------
    def start(self, spawn: Spawn) -> None:
        for c in self._controllers:
            c.task = spawn(self._serve(c), f"controller {c.link.name}")
            c.wake.set()  # register what is live now, without waiting for a heartbeat
        self._heartbeat_task = spawn(self._heartbeat_loop(), "heartbeats")

    # --- 2. heartbeats ------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self._interval
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            due += self._interval  # a fixed rate: a slow poll does not push the next one back
            # Fresh liveness first: only the workers that answer this poll get a heartbeat.
            try:
                await self._pool.refresh()
            except Exception:  # a bug must not end heartbeats; the last known state stands
                log.exception("status poll before heartbeats failed")
            for c in self._controllers:
                c.heartbeat_due = True
                c.wake.set()

    # --- 3. pool events -----------------------------------------------------------------
    async def on_pool_event(self, event: PoolEvent) -> None:
        """Pool listener. Only records what to send and wakes the controller tasks, so a slow
        controller never holds up status polling."""
        if self._closed:
            return
        worker_type = WorkerType(event.worker.kind)
        keys = {k for k in map(self._key_or_none(worker_type), event.removed) if k}
        gone = keys - set(self.live_instances())  # still served by another worker: keep
        if event.kind == "down":
            self._forget(gone, hard=False)
        elif event.kind == "models_changed":
            self._forget(gone, hard=True)
        else:  # "up": re-register explicitly, which revives soft-deleted instances
            revived = {k for k in map(self._key_or_none(worker_type), event.added) if k}
            for c in self._controllers:
                c.registered -= revived
        for c in self._controllers:
            c.wake.set()

    def _forget(self, keys: set[str], *, hard: bool) -> None:
        for c in self._controllers:
            c.registered -= keys
            for key in keys:
                c.pending[key] = hard or c.pending.get(key, False)
            self._export(c)

    # --- `dbgpt model stop|start|restart` (adapter/model_control.py) --------------------
    def stop_model(self, key: str, *, remove: bool) -> None:
        """Deregister ``key`` everywhere (marked unhealthy, or removed with ``remove``) and keep
        it out of registers and heartbeats until ``start_model``."""
        self._stopped.add(key)
        self._forget({key}, hard=remove)
        for c in self._controllers:
            c.wake.set()

    def start_model(self, key: str) -> None:
        """Register ``key`` again (if a live worker serves it) on every controller."""
        self._stopped.discard(key)
        for c in self._controllers:
            c.registered.discard(key)
            c.wake.set()

    async def deletes_sent(self, key: str, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until no controller still owes a delete of
        ``key``; whether that happened."""
        return await self._settled(
            lambda: not any(key in c.pending for c in self._controllers), timeout
        )

    async def registers_sent(self, key: str, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until every controller whose last call succeeded
        holds ``key`` registered; whether that happened."""

        def held() -> bool:
            return all(key in c.registered for c in self._controllers if c.reachable is not False)

        return await self._settled(held, timeout)

    async def _settled(self, done: Callable[[], bool], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # --- the per-controller task --------------------------------------------------------
    async def _serve(self, c: _Controller) -> None:
        cap = self._interval  # retrying less often than we heartbeat would be pointless
        first = min(0.5, cap / 4)
        # Equal jitter: half the exponential step fixed, half random, so a fleet of adapters
        # that lost the same controller does not come back in lockstep.
        wait = wait_exponential(multiplier=first / 2, max=cap / 2) + wait_random_exponential(
            multiplier=first / 2, max=cap / 2
        )
        try:
            while True:
                await c.wake.wait()
                c.wake.clear()
                async for attempt in AsyncRetrying(
                    wait=wait,
                    retry=retry_if_exception_type(ControllerError),
                    before_sleep=self._log_retry(c),
                ):
                    with attempt:
                        await self._converge(c)
        except _Closed:
            return

    async def _converge(self, c: _Controller) -> None:
        """Send this controller what it lacks; raise ControllerError at the first failure."""
        # Deletes first: a dead or dropped model must stop getting traffic before all else.
        for key, hard in list(c.pending.items()):
            if key in self.live_instances():
                del c.pending[key]  # served again: the register below revives it
                continue
            await self._call(c, "delete", self._instance(key), hard=hard)
            if c.pending.get(key) == hard:  # an event may have upgraded it meanwhile
                del c.pending[key]
        sent: set[str] = set()
        for key in list(self.live_instances()):
            if key not in c.registered and (instance := self.live_instances().get(key)):
                await self._call(c, "register", instance)
                sent.add(key)
        if c.heartbeat_due:
            skipped = len(self._dead_keys())
            if skipped:
                self._metrics.heartbeats.labels(c.link.name, "skipped_dead").inc(skipped)
            for key in list(self.live_instances()):
                # Looked up again before each call: the worker may have died since.
                if key not in sent and (instance := self.live_instances().get(key)):
                    await self._call(c, "heartbeat", instance)
            c.heartbeat_due = False

    async def _call(
        self, c: _Controller, op: str, instance: ModelInstance, *, hard: bool = False
    ) -> None:
        async with c.call_lock:
            if self._closed:
                raise _Closed
            try:
                if op == "register":
                    await c.link.register(instance)
                elif op == "heartbeat":
                    await c.link.heartbeat(instance)
                else:
                    await c.link.deregister(instance, remove=hard)
            except ControllerError as exc:
                self._metrics.registration_failures.labels(c.link.name, op, exc.reason).inc()
                await self._warn(c, exc)
                if op == "heartbeat":
                    self._metrics.heartbeats.labels(c.link.name, "error").inc()
                # It may have restarted and forgotten everything: register it all again.
                c.reachable = False
                c.registered.clear()
                self._export(c)
                raise
        if c.reachable is False:
            log.info("controller %s answers again", c.link.name)
        c.reachable = True
        if op == "heartbeat":
            self._metrics.heartbeats.labels(c.link.name, "ok").inc()
        else:
            log.info("%s %s on %s", _VERBS[op, hard], instance.model_name, c.link.name)
        key = instance.model_name
        if op == "delete":
            c.registered.discard(key)
        else:
            c.known.add(key)
            if key not in c.pending:  # the worker died while this call was on the wire
                c.registered.add(key)
        self._export(c)

    async def _warn(self, c: _Controller, exc: ControllerError) -> None:
        """The cause, at the first failure and then every ``WARN_EVERY`` seconds at most."""
        now = asyncio.get_running_loop().time()
        repeated = c.reachable is False and c.last_warning is not None
        if repeated and now - (c.last_warning or 0.0) < WARN_EVERY:
            return
        if exc.status in (404, 405) and not c.identified:
            c.identified = True
            c.hint = await c.link.identify()
        c.last_warning = now
        hint = f" ({c.hint})" if c.hint else ""
        log.warning("%s; retrying with backoff%s", exc, hint)

    def _export(self, c: _Controller) -> None:
        self._metrics.registered_models.labels(c.link.name).set(len(c.registered))

    def _log_retry(self, c: _Controller) -> Callable[[RetryCallState], None]:
        def before_sleep(state: RetryCallState) -> None:
            wait = state.next_action.sleep if state.next_action else 0.0
            number = state.attempt_number
            log.debug("controller %s: attempt %d failed, next in %.2f s", c.link.name, number, wait)

        return before_sleep

    # --- 4. shutdown --------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Stop heartbeats, then hard-delete everything everywhere. Idempotent."""
        if self._closed:
            return
        self._closed = True  # from here on no controller task starts a call
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        await asyncio.gather(*(self._stop_task(c) for c in self._controllers))
        live = set(self.live_instances())
        calls = [
            self._final_delete(c, key)
            for c in self._controllers
            for key in sorted(c.known | c.registered | set(c.pending) | live)
        ]
        await asyncio.gather(*calls)
        for c in self._controllers:
            c.registered.clear()
            self._export(c)

    async def _stop_task(self, c: _Controller) -> None:
        # Let a call already on the wire finish first (bounded): were it cancelled, the
        # controller could still apply it after our delete and keep a stale entry.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(c.call_lock.acquire(), SHUTDOWN_CALL_TIMEOUT)
            c.call_lock.release()
        if c.task is not None:
            c.task.cancel()

    async def _final_delete(self, c: _Controller, key: str) -> None:
        try:
            await c.link.deregister(self._instance(key), remove=True, timeout=SHUTDOWN_CALL_TIMEOUT)
        except ControllerError as exc:
            log.warning("could not deregister %s: %s", key, exc)
        else:
            log.info("deregistered %s from %s", key, c.link.name)

    # --- views --------------------------------------------------------------------------
    @property
    def registered_everywhere(self) -> bool:
        """See the module docstring for the exact rule."""
        if self._closed:
            return False
        live = set(self.live_instances())
        if not live:
            return True
        holding = [c for c in self._controllers if live <= c.registered]
        failing = [c for c in self._controllers if c.reachable is False]
        return bool(holding) and len(holding) + len(failing) == len(self._controllers)

    def live_instances(self) -> dict[str, ModelInstance]:
        """Worker key -> the instance to register, for everything live workers serve now."""
        table: dict[str, ModelInstance] = {}
        for worker in self._pool.workers.values():
            if worker.alive:
                to_key = self._key_or_none(WorkerType(worker.kind))
                for key in filter(None, map(to_key, worker.model_names)):
                    table[key] = self._instance(key)
        if self._settings.register_service:
            table[SERVICE_KEY] = self._instance(SERVICE_KEY)
        for key in self._stopped:
            table.pop(key, None)
        return table

    def _dead_keys(self) -> set[str]:
        dead = set()
        for worker in self._pool.workers.values():
            if not worker.alive:
                to_key = self._key_or_none(WorkerType(worker.kind))
                dead |= {k for k in map(to_key, worker.model_names) if k}
        return dead - set(self.live_instances())

    def _instance(self, key: str) -> ModelInstance:
        # Every other field at DB-GPT's defaults: exactly the body its own client sends.
        return ModelInstance(
            model_name=key, host=self._settings.advertised_host, port=self._settings.port
        )

    def _key_or_none(self, worker_type: WorkerType) -> Callable[[str], str | None]:
        def to_key(name: str) -> str | None:
            try:
                return worker_key(name, worker_type)
            except InvalidMessage:
                if name not in self._bad_names:  # say it once, not every heartbeat
                    self._bad_names.add(name)
                    log.warning("not registering %r: DB-GPT model names cannot contain '@'", name)
                return None

        return to_key


_VERBS = {
    ("register", False): "registered",
    ("delete", False): "marked unhealthy (soft delete)",
    ("delete", True): "removed",
}
