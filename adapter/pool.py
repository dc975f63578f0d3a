"""What the adapter knows about its FastChat workers: who is alive, what they serve, how busy.

The pool polls every worker's ``/worker_get_status`` in the background. Those answers drive
three things: routing (shortest queue, like FastChat's own ``shortest_queue`` dispatch), the
registration lifecycle (listeners hear when a worker goes down, comes back or changes its model
list), and metrics. Per (worker, model) it caches the conversation template and context length,
dropping them when the worker restarts or its model list changes, and never caching an error.

Two discovery modes share this one class:
- static: ``--worker-address`` / ``--embedding-worker-address`` URLs, each polled directly;
- FastChat controller: one pseudo-worker keyed by the controller URL whose model list is the
  controller's live models (its aggregate ``/worker_get_status`` skips dead workers); each request
  is then dispatched with the controller's own ``/get_worker_address``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from adapter.errors import NoWorker, UpstreamError
from adapter.metrics import Metrics
from adapter.upstream import FastChatClient
from protocol.fastchat import ConvTemplate

log = logging.getLogger("fastchat_adapter.pool")

WorkerKind = Literal["llm", "text2vec"]


@dataclass
class Worker:
    """One upstream as last seen. ``url`` is a worker, or a FastChat controller (dispatching)."""

    url: str
    kind: WorkerKind
    dispatching: bool = False
    alive: bool = False
    model_names: tuple[str, ...] = ()
    queue_length: int = 0
    speed: float = 1.0
    last_seen: float | None = None
    generation: int = 0  # bumps on every down->up transition or model-list change
    down_logged: bool = False  # its being down was logged (once per down spell)


@dataclass(frozen=True)
class Route:
    """Where one request goes: a worker URL and the model name to send it."""

    worker: str
    model: str
    kind: WorkerKind


@dataclass(frozen=True)
class ModelInfo:
    """Cached per (worker, model): what prompt building needs."""

    conv: ConvTemplate
    context_length: int


@dataclass(frozen=True)
class PoolEvent:
    kind: Literal["up", "down", "models_changed"]
    worker: Worker
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


Listener = Callable[[PoolEvent], Awaitable[None]]


@dataclass
class WorkerPool:
    client: FastChatClient
    metrics: Metrics
    only_models: frozenset[str] = frozenset()
    # Models whose workers take images: named by --multimodal-models, plus what a FastChat
    # controller we dispatch through lists as multimodal (refreshed with every poll).
    multimodal_models: frozenset[str] = frozenset()
    workers: dict[str, Worker] = field(default_factory=dict)
    _listed_multimodal: set[str] = field(default_factory=set)
    _listeners: list[Listener] = field(default_factory=list)
    _info: dict[tuple[str, str], tuple[int, ModelInfo]] = field(default_factory=dict)
    # The fetch in progress per key, shared by every request that finds the cache cold; the
    # entry goes as soon as the fetch ends, so unknown keys leave nothing behind.
    _info_fetches: dict[tuple[str, str], asyncio.Future[ModelInfo]] = field(default_factory=dict)

    @classmethod
    def from_addresses(
        cls,
        client: FastChatClient,
        metrics: Metrics,
        *,
        llm: Iterable[str] = (),
        text2vec: Iterable[str] = (),
        fastchat_controller: str | None = None,
        only_models: Iterable[str] = (),
        multimodal_models: Iterable[str] = (),
    ) -> WorkerPool:
        pool = cls(client, metrics, frozenset(only_models), frozenset(multimodal_models))
        for url in llm:
            pool.workers[url] = Worker(url, "llm")
        for url in text2vec:
            pool.workers[url] = Worker(url, "text2vec")
        if fastchat_controller:
            pool.workers[fastchat_controller] = Worker(fastchat_controller, "llm", dispatching=True)
        return pool

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # --- polling ------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Poll every upstream once, concurrently, and tell listeners what changed."""
        await asyncio.gather(*(self._poll(w) for w in list(self.workers.values())))

    async def run(self, interval: float) -> None:
        """Background loop; cancelled at shutdown."""
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug must cost one poll, not every later one
                log.exception("status poll failed")
            await asyncio.sleep(interval)

    async def _poll(self, worker: Worker) -> None:
        try:
            if worker.dispatching:
                names, queue, speed = await self._poll_controller(worker.url)
            else:
                status = await self.client.status(worker.url)
                names = tuple(sorted(status.model_names))
                queue, speed = status.queue_length, float(status.speed)
        except UpstreamError as exc:
            self.metrics.status_poll_failures.labels(worker.url, exc.reason).inc()
            await self._mark_down(worker, exc)
            return
        if self.only_models:
            names = tuple(n for n in names if n in self.only_models)
        was_alive, old_names = worker.alive, worker.model_names
        worker.alive, worker.model_names = True, names
        worker.queue_length, worker.speed, worker.last_seen = queue, speed, time.monotonic()
        self._export(worker)
        if not was_alive:
            worker.generation += 1
            worker.down_logged = False
            log.info("worker %s is up, serving %s", worker.url, ", ".join(names) or "nothing")
            await self._emit(PoolEvent("up", worker, added=names))
        elif names != old_names:
            worker.generation += 1
            added = tuple(n for n in names if n not in old_names)
            removed = tuple(n for n in old_names if n not in names)
            log.info("worker %s models changed: +%s -%s", worker.url, added, removed)
            await self._emit(PoolEvent("models_changed", worker, added, removed))

    async def _poll_controller(self, url: str) -> tuple[tuple[str, ...], int, float]:
        listed = set(await self.client.list_models(url))
        # The aggregate status skips dead workers, so it is the controller's view of liveness.
        status = await self.client.status(url)
        names = tuple(sorted(listed & set(status.model_names)))
        try:
            self._listed_multimodal = set(await self.client.multimodal_models(url))
        except UpstreamError:  # a controller without the route: no multimodal models
            self._listed_multimodal = set()
        return names, status.queue_length, float(status.speed)

    async def _mark_down(self, worker: Worker, exc: UpstreamError) -> None:
        self.metrics.upstream_up.labels(worker.url).set(0)
        if not worker.down_logged:  # once per change: at the first poll, and after each up
            worker.down_logged = True
            what = "FastChat controller" if worker.dispatching else "FastChat worker"
            log.warning("%s %s is down: %s: %s", what, worker.url, exc.reason, exc.detail)
        if not worker.alive:
            return
        worker.alive = False
        await self._emit(PoolEvent("down", worker, removed=worker.model_names))

    async def report_failure(self, url: str, exc: UpstreamError) -> None:
        """A request failed on ``url``. Its cached templates are dropped (a worker restarted
        between two polls may come back with another model), and a worker found unreachable
        is marked down at once instead of at the next poll."""
        for key in [key for key in self._info if key[0] == url]:
            del self._info[key]
        worker = self.workers.get(url)
        if worker is not None and exc.reason == "unreachable":
            await self._mark_down(worker, exc)

    def _export(self, worker: Worker) -> None:
        self.metrics.upstream_up.labels(worker.url).set(1)
        for name in worker.model_names:
            self.metrics.upstream_queue_length.labels(worker.url, name).set(worker.queue_length)
            self.metrics.upstream_speed.labels(worker.url, name).set(worker.speed)

    async def _emit(self, event: PoolEvent) -> None:
        for listener in self._listeners:
            try:
                await listener(event)
            except Exception:  # a listener's bug must not stop polling
                log.exception("pool listener failed on %s", event.kind)

    # --- views --------------------------------------------------------------------------
    def served(self, kind: WorkerKind | None = None) -> dict[str, list[Worker]]:
        """Model name -> live workers serving it (optionally of one kind)."""
        table: dict[str, list[Worker]] = {}
        for worker in self.workers.values():
            if worker.alive and (kind is None or worker.kind == kind):
                for name in worker.model_names:
                    table.setdefault(name, []).append(worker)
        return table

    def all_names(self, kind: WorkerKind | None = None) -> list[str]:
        return sorted(self.served(kind))

    def any_alive(self) -> bool:
        return any(w.alive for w in self.workers.values())

    # --- routing ------------------------------------------------------------------------
    async def resolve(
        self, model: str | None, kind: WorkerKind = "llm", *, takes_slot: bool = True
    ) -> Route:
        """Pick the worker for a request; ``model=None`` means the only served model.
        ``takes_slot``: the call occupies a worker slot (generate, embeddings), so it counts
        towards the worker's queue until the next poll; count_token and metadata do not."""
        table = self.served(kind)
        if model is None:
            if len(table) != 1:
                raise NoWorker("<unspecified>", table)
            model = next(iter(table))
        candidates = table.get(model)
        if not candidates:
            raise NoWorker(model, table, known=self.knows(model, kind))
        best = min(candidates, key=_load)
        if takes_slot:
            # Like FastChat's controller: count the dispatch at once, the next poll corrects
            # it, so a burst between two polls spreads over the workers instead of piling on
            # one.
            best.queue_length += 1
        if best.dispatching:
            address = await self.client.worker_address(best.url, model)
            if not address:
                raise NoWorker(model, table, known=True)
            return Route(address, model, kind)
        return Route(best.url, model, kind)

    async def resolve_first(
        self, model: str, kinds: tuple[WorkerKind, ...], *, takes_slot: bool = True
    ) -> Route:
        """``resolve`` with the first kind that has a live worker serving ``model``; the
        ``NoWorker`` of none names the models of every kind."""
        table = {name for kind in kinds for name in self.served(kind)}
        for kind in kinds:
            if model in self.served(kind):
                return await self.resolve(model, kind, takes_slot=takes_slot)
        raise NoWorker(model, table, known=self.knows(model))

    def takes_images(self, route: Route) -> bool:
        """Whether the worker of ``route`` is known to take images (see ``multimodal_models``)."""
        return route.model in self.multimodal_models or route.model in self._listed_multimodal

    def knows(self, model: str, kind: WorkerKind | None = None) -> bool:
        """Whether any worker, alive or not, served ``model`` when last seen."""
        return any(
            model in worker.model_names
            for worker in self.workers.values()
            if kind is None or worker.kind == kind
        )

    # --- per (worker, model) cache ------------------------------------------------------
    async def model_info(self, route: Route) -> ModelInfo:
        """Template and context length of ``route``, from the cache or fetched. Concurrent
        callers with a cold cache share one fetch, and its outcome: a failure reaches every
        caller waiting on it at once (never cached; the next caller fetches again). A caller
        that is cancelled leaves the fetch running for the others."""
        key = (route.worker, route.model)
        generation = self._generation_of(route.worker)
        cached = self._info.get(key)
        if cached is not None and cached[0] == generation:
            return cached[1]
        fetch = self._info_fetches.get(key)
        if fetch is None:
            fetch = asyncio.ensure_future(self._fetch_info(route, generation))
            self._info_fetches[key] = fetch
            fetch.add_done_callback(lambda done: self._fetch_over(key, done))
        return await asyncio.shield(fetch)

    async def _fetch_info(self, route: Route, generation: int) -> ModelInfo:
        conv = asyncio.ensure_future(self.client.conv_template(route.worker, route.model))
        details = asyncio.ensure_future(self.client.context_length(route.worker, route.model))
        try:
            await asyncio.gather(conv, details)
        finally:  # after a failure, the other call is not left running
            conv.cancel()
            details.cancel()
        info = ModelInfo(conv.result(), details.result())
        self._info[(route.worker, route.model)] = (generation, info)  # only successes
        return info

    def forget_model_info(self, model: str) -> None:
        """Drop the cached template and context length of ``model`` on every worker."""
        for key in [key for key in self._info if key[1] == model]:
            del self._info[key]

    def _fetch_over(self, key: tuple[str, str], fetch: asyncio.Future[ModelInfo]) -> None:
        if self._info_fetches.get(key) is fetch:
            del self._info_fetches[key]
        if not fetch.cancelled():
            fetch.exception()  # retrieved, even if every caller has gone meanwhile

    def _generation_of(self, url: str) -> int:
        worker = self.workers.get(url)
        if worker is not None:
            return worker.generation
        # Dispatched through a FastChat controller: the controller's generation stands in.
        return sum(w.generation for w in self.workers.values() if w.dispatching)


def _load(worker: Worker) -> float:
    """FastChat's shortest_queue key; ties go to the first worker, as there."""
    return worker.queue_length / (worker.speed or 1.0)
