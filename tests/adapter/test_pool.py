"""``WorkerPool``: the template cache, failure reports and the refusal codes (respx workers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import respx

from adapter.errors import NoWorker, UpstreamError
from adapter.metrics import Metrics
from adapter.pool import PoolEvent, WorkerPool
from adapter.upstream import FastChatClient, make_http_client
from protocol.fastchat import ErrorCode

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
    started = asyncio.get_running_loop().time()
    results = await asyncio.gather(
        *(pool.model_info(route) for _ in range(4)), return_exceptions=True
    )
    elapsed = asyncio.get_running_loop().time() - started
    assert all(isinstance(r, UpstreamError) and r.reason == "http_status" for r in results)
    assert worker["conv"].call_count == 1 and elapsed < 1.0
    await asyncio.wait_for(details_cancelled.wait(), 1.0)
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
