"""Everything one adapter process holds, created once and torn down once.

Routes reach it as ``request.app.state.runtime``. Background tasks (status polling, heartbeats)
start in ``start()`` and stop in ``stop()``; the ordered SIGTERM sequence (not ready, stop
heartbeats, deregister, drain, exit) lives in ``adapter/server.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx

from adapter.metrics import Metrics
from adapter.pool import WorkerPool
from adapter.registration import Registrar
from adapter.registry import ModelRegistry, run_expiry
from adapter.settings import Settings
from adapter.upstream import DEFAULT_READ_TIMEOUT, FastChatClient, make_http_client

log = logging.getLogger("fastchat_adapter")

VERSION = "0.1.0"


@dataclass
class InFlight:
    """Counts open downstream requests so shutdown can wait for them to drain."""

    count: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count <= 0:
            self.count = 0
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True if every request finished within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics
    http: httpx.AsyncClient
    client: FastChatClient
    pool: WorkerPool
    # Keeps every DB-GPT controller's view of us true (adapter/registration.py).
    registrar: Registrar | None = None
    # Standalone only (no --controller-address): the controller registry we serve ourselves.
    registry: ModelRegistry | None = None
    inflight: InFlight = field(default_factory=InFlight)
    shutting_down: bool = False
    # Run in order by begin_shutdown(), before uvicorn stops accepting and drains streams.
    shutdown_steps: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        metrics = Metrics()
        metrics.build_info.labels(VERSION).set(1)
        # Every call to a worker is bounded by the idle timeout when it is the shorter: a
        # wedged worker hangs count_token or the template fetch as surely as a generation.
        read_timeout = min(DEFAULT_READ_TIMEOUT, settings.idle_timeout)
        http = make_http_client(settings.connect_timeout, read_timeout)
        client = FastChatClient(
            http, idle_timeout=settings.idle_timeout, generate_timeout=settings.generate_timeout
        )
        pool = WorkerPool.from_addresses(
            client,
            metrics,
            llm=settings.worker_address,
            text2vec=settings.embedding_worker_address,
            fastchat_controller=settings.fastchat_controller_address,
            only_models=settings.model_names,
        )
        registry = ModelRegistry() if settings.standalone else None
        registrar = Registrar.create(settings, pool, http, metrics, registry)
        pool.add_listener(registrar.on_pool_event)  # worker down/up/model list -> controllers
        runtime = cls(settings, metrics, http, client, pool, registrar, registry)
        runtime.shutdown_steps.append(registrar.shutdown)  # stop heartbeats, deregister
        return runtime

    @property
    def ready(self) -> bool:
        """Ready: not shutting down, at least one upstream worker answers, and what it serves
        is registered (``Registrar.registered_everywhere``; immediate when standalone)."""
        registered = self.registrar is None or self.registrar.registered_everywhere
        return not self.shutting_down and self.pool.any_alive() and registered

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        return task

    async def start(self) -> None:
        # One poll before serving, so the first requests already know the workers.
        await self.pool.refresh()
        self.spawn(self.pool.run(self.settings.status_interval), "status-poll")
        if self.registry is not None:
            expiry = run_expiry(
                self.registry,
                interval=self.settings.heartbeat_interval,
                timeout=self.settings.standalone_heartbeat_timeout,
            )
            self.spawn(expiry, "registry-expiry")
        if self.registrar is not None:
            self.registrar.start(self.spawn)  # registers at once, then heartbeats

    async def begin_shutdown(self) -> None:
        """First half of SIGTERM: not ready, then each step (stop heartbeats, deregister)."""
        self.shutting_down = True
        for step in self.shutdown_steps:
            try:
                await step()
            except Exception:  # a failed step must not keep the process from exiting
                log.exception("shutdown step %s failed", getattr(step, "__name__", step))

    async def stop(self) -> None:
        if not self.shutting_down:  # lifespan ended without our SIGTERM path: still deregister
            await self.begin_shutdown()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.http.aclose()
