"""Everything one adapter process holds, created once and torn down once.

Routes reach it as ``request.app.state.runtime``. The whole lifecycle, in the order it runs
(``adapter/server.py`` says who calls each step, and why the SIGTERM half cannot live in the
lifespan):

- ``create``: settings -> metrics, the one HTTP pool, the FastChat client, the worker pool, the
  standalone registry (no ``--controller-address``) and the registrar; nothing runs yet.
- ``start`` (lifespan startup, before the socket accepts): poll the workers once, start the
  status poll, the standalone registry's expiry, then registration and heartbeats.
- ``begin_shutdown`` (SIGTERM, while streams still run): not ready, stop heartbeats,
  deregister everywhere.
- ``stop`` (lifespan shutdown, after uvicorn drained the streams): cancel the background tasks,
  close the HTTP pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

from adapter import __version__
from adapter.metrics import Metrics
from adapter.pool import WorkerPool
from adapter.registration import Registrar
from adapter.registry import ModelRegistry, run_expiry
from adapter.settings import Settings
from adapter.streaming import GoingAway
from adapter.upstream import DEFAULT_READ_TIMEOUT, FastChatClient, make_http_client
from protocol.fastchat import ErrorCode
from protocol.framing import encode_frame
from protocol.translate import error_output

log = logging.getLogger("fastchat_adapter")


_GOING_AWAY_FRAME: Final = encode_frame(
    error_output(
        ErrorCode.CONTROLLER_NO_WORKER,
        "fastchat-adapter is shutting down and its shutdown grace ran out before this answer "
        "was complete: the worker is going away; retry the request",
    ).to_wire()
)


@dataclass
class InFlight:
    """Downstream requests open right now (``num_requests_running`` + ``_waiting``), kept by
    ``Tracker``; uvicorn's graceful shutdown is what waits for them to drain."""

    count: int = 0

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count = max(0, self.count - 1)


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics
    http: httpx.AsyncClient
    client: FastChatClient
    pool: WorkerPool
    # Keeps every DB-GPT controller's view of us true (adapter/registration.py).
    registrar: Registrar
    # Standalone only (no --controller-address): the controller registry we serve ourselves.
    registry: ModelRegistry | None = None
    inflight: InFlight = field(default_factory=InFlight)
    shutting_down: bool = False
    # Set by adapter/server.py just before the shutdown grace runs out: open streams then end
    # with an error frame instead of being cut without a word.
    going_away: GoingAway = field(default_factory=lambda: GoingAway(b""))
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        metrics = Metrics()
        metrics.build_info.labels(__version__).set(1)
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
            multimodal_models=settings.multimodal_models,
        )
        registry = ModelRegistry() if settings.standalone else None
        registrar = Registrar.create(settings, pool, http, metrics, registry)
        pool.add_listener(registrar.on_pool_event)  # worker down/up/model list -> controllers
        runtime = cls(settings, metrics, http, client, pool, registrar, registry)
        runtime.going_away = GoingAway(_GOING_AWAY_FRAME, metrics.streams_cut_at_shutdown.inc)
        return runtime

    @property
    def ready(self) -> bool:
        """Ready: not shutting down, at least one upstream worker answers, and what it serves
        is registered (``Registrar.registered_everywhere``; immediate when standalone)."""
        registered = self.registrar.registered_everywhere
        return not self.shutting_down and self.pool.any_alive() and registered

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        return task

    async def start(self) -> None:
        """Lifespan startup, in order; uvicorn accepts connections only after it returns."""
        # 1. One poll before serving, so the first requests already know the workers.
        await self.pool.refresh()
        # 2. Keep polling: routing, readiness and registration all follow these answers.
        self.spawn(self.pool.run(self.settings.status_interval), "status-poll")
        # 3. Standalone, we are the controller: silent instances turn unhealthy, as on DB-GPT.
        if self.registry is not None:
            expiry = run_expiry(
                self.registry,
                interval=self.settings.heartbeat_interval,
                timeout=self.settings.standalone_heartbeat_timeout,
            )
            self.spawn(expiry, "registry-expiry")
        # 4. Register what the live workers serve on every controller, then heartbeat.
        self.registrar.start(self.spawn)

    async def begin_shutdown(self) -> None:
        """SIGTERM's first half, while streams still run (``AdapterServer`` calls it)."""
        # 1. Not ready: /readyz answers 503 from here on.
        self.shutting_down = True
        # 2. Stop heartbeats, then hard-delete every instance on every controller, so DB-GPT
        #    stops routing here before the streams end. A failure must not block the exit.
        try:
            await self.registrar.shutdown()
        except Exception:
            log.exception("deregistration failed")

    async def stop(self) -> None:
        """Lifespan shutdown: uvicorn runs it after the streams drained or the grace ran out."""
        # 1. A lifespan that ended without our SIGTERM path still deregisters.
        if not self.shutting_down:
            await self.begin_shutdown()
        # 2. Cancel the background tasks (status poll, expiry, heartbeats) and wait for them.
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        # 3. Close the HTTP pools last: nothing uses them any more.
        self.client.close()
        await self.http.aclose()
