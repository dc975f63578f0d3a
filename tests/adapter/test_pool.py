"""``adapter/pool.py``: what the adapter knows about its FastChat workers, and where a request goes.

``WorkerPool`` itself against respx workers (the template cache, failure reports, the refusal
codes, the poll loop); then through the adapter: routing by shortest queue against fake workers
on loopback, slots, the template cache across a worker restart, and dispatch through a FastChat
controller (``--fastchat-controller-address``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import respx
from fastapi import FastAPI, Request

from adapter.errors import NoWorker, UpstreamError
from adapter.metrics import Metrics
from adapter.pool import PoolEvent, WorkerPool
from adapter.tools.reference_worker import ReferenceWorkerConfig
from adapter.tools.reference_worker import create_app as reference_app
from adapter.upstream import FastChatClient, make_http_client
from protocol.fastchat import ErrorCode
from tests.adapter.helpers import (
    MODEL,
    STREAM,
    UPSTREAM_STREAM,
    ZERO_SHOT,
    StartFake,
    chat,
    eventually,
    mocked_worker,
    serving,
    settings_for,
    stream,
    stream_ok,
    vicuna_prompt,
)
from tests.support.servers import LoopbackServer
from tests.support.worker_client import connect, wait_for_queue_length

W = "http://worker-a"
CONV = {
    "name": "raw",
    "system_template": "{system_message}",
    "system_message": "",
    "roles": ["", ""],
    "messages": [],
    "offset": 0,
    "sep_style": 4,
    "sep": "",
}


@pytest.fixture
async def pool() -> AsyncIterator[WorkerPool]:
    http = make_http_client(1.0)
    try:
        yield WorkerPool.from_addresses(FastChatClient(http, idle_timeout=1.0), Metrics(), llm=[W])
    finally:
        await http.aclose()


@pytest.fixture
def worker() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=W, assert_all_called=False) as mock:
        status = {"model_names": ["m"], "speed": 1, "queue_length": 0}
        mock.post("/worker_get_status", name="status").respond(json=status)
        mock.post("/worker_get_conv_template", name="conv").respond(json={"conv": CONV})
        mock.post("/model_details", name="details").respond(json={"context_length": 99})
        yield mock


async def test_model_info_is_cached_until_a_failure_is_reported(
    pool: WorkerPool, worker: respx.MockRouter
) -> None:
    await pool.refresh()
    route = await pool.resolve("m")
    info = await pool.model_info(route)
    assert (info.conv.name, info.context_length) == ("raw", 99)
    assert await pool.model_info(route) is info
    await pool.report_failure(W, UpstreamError(W, "broken_stream", "reset"))
    assert pool.workers[W].alive  # only an unreachable worker is marked down at once
    assert await pool.model_info(route) == info
    assert worker["conv"].call_count == worker["details"].call_count == 2


async def test_unreachable_marks_the_worker_down_and_refusals_say_why(
    pool: WorkerPool, worker: respx.MockRouter
) -> None:
    events: list[PoolEvent] = []

    async def listen(event: PoolEvent) -> None:
        events.append(event)

    pool.add_listener(listen)
    await pool.refresh()
    await pool.report_failure(W, UpstreamError(W, "unreachable", "refused"))
    assert [e.kind for e in events] == ["up", "down"]
    with pytest.raises(NoWorker) as down:
        await pool.resolve("m")
    assert down.value.error_code == ErrorCode.CONTROLLER_NO_WORKER
    assert str(down.value) == "no live FastChat worker serves model 'm'; served models: none"
    with pytest.raises(NoWorker) as unknown:
        await pool.resolve("other")
    assert unknown.value.error_code == ErrorCode.INVALID_MODEL


async def test_only_slot_taking_calls_count_towards_the_queue(
    pool: WorkerPool, worker: respx.MockRouter
) -> None:
    await pool.refresh()
    await pool.resolve("m", takes_slot=False)
    assert pool.workers[W].queue_length == 0
    await pool.resolve("m")
    assert pool.workers[W].queue_length == 1
    await pool.refresh()  # the next poll says what the worker really has
    assert pool.workers[W].queue_length == 0


async def test_concurrent_first_requests_share_one_fetch_and_its_failure(
    pool: WorkerPool, worker: respx.MockRouter
) -> None:
    # A slow failing template fetch: the requests waiting on it get its error at once, instead
    # of each fetching again in turn (N waiters waiting N fetch times), and the details call
    # that was still running is cancelled, not left behind. The error is not cached.
    details_cancelled = asyncio.Event()

    async def slow_failure(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.3)
        return httpx.Response(500, text="template exploded")

    async def slow_details(request: httpx.Request) -> httpx.Response:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            details_cancelled.set()
            raise
        return httpx.Response(200, json={"context_length": 99})

    worker["conv"].side_effect = slow_failure
    worker["details"].side_effect = slow_details
    await pool.refresh()
    route = await pool.resolve("m", takes_slot=False)
    results = await asyncio.gather(
        *(pool.model_info(route) for _ in range(4)), return_exceptions=True
    )
    assert all(isinstance(r, UpstreamError) and r.reason == "http_status" for r in results)
    assert worker["conv"].call_count == 1  # one fetch, its error handed to every waiter
    assert all(r is results[0] for r in results)
    await eventually(details_cancelled.is_set, what="the details call cancelled")
    worker["conv"].side_effect = None
    worker["details"].side_effect = None
    infos = await asyncio.gather(*(pool.model_info(route) for _ in range(4)))
    assert worker["conv"].call_count == 2  # fetched again after the error, once for all
    assert all(info is infos[0] for info in infos)
    assert not pool._info_fetches  # nothing kept per key once the fetch is over


async def test_the_poll_loop_survives_an_unexpected_error(
    pool: WorkerPool, worker: respx.MockRouter
) -> None:
    # A bug or an odd reply must cost one poll, not stop polling for the process's lifetime
    # (workers would then never be seen going down or coming back).
    worker["status"].side_effect = [RuntimeError("surprise")] + [
        httpx.Response(200, json={"model_names": ["m"], "speed": 1, "queue_length": 0})
    ] * 50
    loop = asyncio.ensure_future(pool.run(0.01))
    try:
        for _ in range(200):
            if pool.workers[W].alive:
                break
            await asyncio.sleep(0.01)
        assert pool.workers[W].alive
        assert not loop.done()
    finally:
        loop.cancel()


async def test_template_errors_are_not_cached() -> None:
    async with mocked_worker() as (client, mock):
        template = httpx.Response(200, json={"conv": ZERO_SHOT})
        mock["conv"].side_effect = [httpx.Response(502, text="bad gateway"), template]
        body = {"model": "m", "messages": [{"role": "human", "content": "Hi"}]}
        failed = await stream_ok(client, body)
        assert failed[0]["error_code"] == 50001
        assert "/worker_get_conv_template: HTTP 502: bad gateway" in failed[0]["text"]
        assert (await stream_ok(client, body))[-1]["text"] == "Hello"
        await stream_ok(client, body)
        assert mock["conv"].call_count == 2  # fetched again after the error, then cached


# --- routing, through the adapter -------------------------------------------------------


CONV_PATH = "/worker_get_conv_template"


async def test_template_cache_is_refetched_after_a_worker_restart(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url, status_interval=0.05)) as adapter:
        worker = adapter.runtime.pool.workers[fake.url]
        for _ in range(2):
            await stream(adapter.client, chat(max_new_tokens=1))
        assert len(fake.bodies(CONV_PATH)) == len(fake.bodies("/model_details")) == 1

        await asyncio.to_thread(fake.stop)
        await eventually(lambda: not worker.alive, what="the worker seen down")
        await asyncio.to_thread(fake.start)
        await eventually(lambda: worker.alive, what="the worker seen up")
        status, frames = await stream(adapter.client, chat(max_new_tokens=1))
    assert status == 200 and frames[-1]["error_code"] == 0
    assert len(fake.bodies(CONV_PATH)) == len(fake.bodies("/model_details")) == 2


async def test_the_shortest_queue_gets_the_request(fake_worker: StartFake) -> None:
    busy = fake_worker(ReferenceWorkerConfig(tokens_per_second=10))
    idle = fake_worker(ReferenceWorkerConfig(tokens_per_second=10))
    async with serving(settings_for(busy.url, idle.url, status_interval=0.05)) as adapter:
        pool = adapter.runtime.pool
        async with connect(busy.url) as direct:  # someone else's stream holds a slot of busy
            body = {"model": "m", "prompt": "x", "max_new_tokens": 100, "echo": False}
            async with direct.stream("POST", UPSTREAM_STREAM, json=body):
                await eventually(
                    lambda: pool.workers[busy.url].queue_length == 1, what="busy seen busy"
                )
                await eventually(
                    lambda: pool.workers[idle.url].queue_length == 0, what="idle seen idle"
                )
                await stream(adapter.client, chat(max_new_tokens=1))
    assert len(idle.bodies(UPSTREAM_STREAM)) == 1
    assert busy.bodies(UPSTREAM_STREAM) == [body]


async def test_a_burst_between_two_polls_spreads_over_the_workers(
    fake_worker: StartFake,
) -> None:
    # No poll in between (status_interval 60 s): each dispatch counts at once, as in
    # FastChat's controller, so equal workers take turns instead of one taking all.
    first = fake_worker()
    second = fake_worker()
    async with serving(settings_for(first.url, second.url)) as adapter:
        replies = await asyncio.gather(
            *(stream(adapter.client, chat(f"q{i}", max_new_tokens=1)) for i in range(4))
        )
    assert all(status == 200 and frames[-1]["error_code"] == 0 for status, frames in replies)
    assert len(first.bodies(UPSTREAM_STREAM)) == len(second.bodies(UPSTREAM_STREAM)) == 2


async def test_slots_are_never_leaked_by_a_burst_of_streams(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(tokens_per_second=200))
    async with serving(settings_for(fake.url, keepalive_interval=0.05)) as adapter:

        async def leave_early(i: int) -> None:
            async with adapter.client.stream("POST", STREAM, json=chat(f"{i}", max_new_tokens=50)):
                await asyncio.sleep(0.01 * i)

        await asyncio.gather(*(leave_early(i) for i in range(8)))
        await asyncio.gather(*(stream(adapter.client, chat(max_new_tokens=5)) for _ in range(4)))
        async with connect(fake.url) as direct:
            await wait_for_queue_length(direct, 0)
        await eventually(lambda: adapter.runtime.inflight.count == 0, what="drained")
    assert fake.disconnects >= 1  # some left mid-stream, not only before the upstream call


# --- dispatch through a FastChat controller ------------------------------------------------
#
# The adapter mirrors the models a FastChat controller lists and, per request, asks that
# controller's own ``/get_worker_address`` which worker to use (docs/protocol.md §2), so one adapter
# fronts a whole FastChat fleet. A small FastChat-controller double on loopback hands out the
# address of a fake worker and records what it was asked.


@dataclass
class FastChatController:
    """Answers like fastchat.serve.controller: list_models, aggregate status, dispatch."""

    worker_url: str
    models: list[str]
    address: str | None = None  # what /get_worker_address answers; None: the worker's URL
    asked: list[str] = field(default_factory=list)
    multimodal: list[str] | None = None  # None: no /list_multimodal_models (older FastChat)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/list_models")
        async def list_models() -> dict[str, Any]:
            return {"models": self.models}

        @app.post("/worker_get_status")
        async def status() -> dict[str, Any]:
            return {"model_names": sorted(self.models), "speed": 1, "queue_length": 0}

        if self.multimodal is not None:
            listed = self.multimodal

            @app.post("/list_multimodal_models")
            async def list_multimodal_models() -> dict[str, Any]:
                return {"models": listed}

        @app.post("/get_worker_address")
        async def get_worker_address(request: Request) -> dict[str, Any]:
            model = (await request.json())["model"]
            self.asked.append(model)
            address = self.worker_url if self.address is None else self.address
            return {"address": address if model in self.models else ""}

        return app


async def test_requests_are_dispatched_by_the_fastchat_controller(
    fake_worker: StartFake, serve_app: Callable[..., LoopbackServer]
) -> None:
    worker = fake_worker()
    controller = FastChatController(worker.url, [MODEL])
    fastchat = serve_app(controller.app())
    async with serving(settings_for(fastchat_controller_address=fastchat.url)) as adapter:
        status, frames = await stream(adapter.client, chat("Hello"))
    assert status == 200
    assert (
        frames
        and frames[-1]["error_code"] == 0
        and frames[-1]["finish_reason"]
        in (
            "stop",
            "length",
        )
    )
    assert controller.asked == [MODEL]  # one dispatch for the one request
    sent = worker.bodies(UPSTREAM_STREAM)
    assert [body["prompt"] for body in sent] == [vicuna_prompt("Hello")]
    assert sent[0]["model"] == MODEL and sent[0]["echo"] is False


async def test_a_model_the_fastchat_controller_does_not_list_is_named_in_band(
    fake_worker: StartFake, serve_app: Callable[..., LoopbackServer]
) -> None:
    worker = fake_worker()
    controller = FastChatController(worker.url, [MODEL])
    fastchat = serve_app(controller.app())
    async with serving(settings_for(fastchat_controller_address=fastchat.url)) as adapter:
        status, frames = await stream(adapter.client, chat("Hello") | {"model": "nope"})
    assert status == 200 and len(frames) == 1
    assert frames[0]["error_code"] == 40301
    assert "'nope'" in frames[0]["text"] and MODEL in frames[0]["text"]
    assert controller.asked == []  # decided from the mirrored list, no dispatch needed
    assert worker.bodies(UPSTREAM_STREAM) == []


async def test_an_empty_dispatch_answer_is_no_worker(
    fake_worker: StartFake, serve_app: Callable[..., LoopbackServer]
) -> None:
    worker = fake_worker()
    controller = FastChatController(worker.url, [MODEL], address="")
    fastchat = serve_app(controller.app())
    async with serving(settings_for(fastchat_controller_address=fastchat.url)) as adapter:
        status, frames = await stream(adapter.client, chat("Hello"))
    assert status == 200 and len(frames) == 1
    assert frames[0]["error_code"] == 50005
    assert controller.asked == [MODEL]
    assert worker.bodies(UPSTREAM_STREAM) == []


async def test_models_the_fastchat_controller_lists_as_multimodal_get_images(
    fake_worker: StartFake, serve_app: Callable[..., LoopbackServer]
) -> None:
    """Its /list_multimodal_models (workers registered with `multimodal`) makes the adapter
    send images on; a controller without that route (the double above) means none."""
    worker = fake_worker()
    controller = FastChatController(worker.url, [MODEL], multimodal=[MODEL])
    fastchat = serve_app(controller.app())
    image = {"type": "image", "object": {"data": "http://a/cat.png", "format": "url"}}
    text = {"type": "text", "object": {"data": "Hello", "format": "text"}}
    body = chat() | {"messages": [{"role": "human", "content": [text, image]}]}
    async with serving(settings_for(fastchat_controller_address=fastchat.url)) as adapter:
        status, _ = await stream(adapter.client, body)
    assert status == 200
    assert worker.bodies(UPSTREAM_STREAM)[0]["images"] == ["http://a/cat.png"]


async def test_a_worker_down_is_a_warning_at_start_and_at_each_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Down at start, up, down again: one WARNING per down spell, naming worker and cause."""
    server = LoopbackServer(reference_app(ReferenceWorkerConfig(model_names=("m",))))
    server.start()
    server.stop()  # the port is known and closed: the worker is down at start
    caplog.set_level(logging.INFO, logger="fastchat_adapter.pool")
    http = make_http_client(1.0)
    metrics = Metrics()
    client = FastChatClient(http, idle_timeout=1.0)
    pool = WorkerPool.from_addresses(client, metrics, llm=[server.url])

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    try:
        await pool.refresh()
        await pool.refresh()  # still down: said once
        [first] = warnings()
        assert first.startswith(f"FastChat worker {server.url} is down: unreachable: "), first
        await asyncio.to_thread(server.start)
        await pool.refresh()
        assert any(f"worker {server.url} is up" in r.getMessage() for r in caplog.records)
        await asyncio.to_thread(server.stop)
        await pool.refresh()
        await pool.refresh()
        assert len(warnings()) == 2 and warnings()[1].startswith(f"FastChat worker {server.url}")
    finally:
        await http.aclose()
    failures = {"worker": server.url, "reason": "unreachable"}
    sample = metrics.registry.get_sample_value(
        "fastchat_adapter_status_poll_failures_total", failures
    )
    assert sample == 4
