"""``WorkerPool``: the template cache, failure reports and the refusal codes (respx workers)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import respx

from adapter.metrics import Metrics
from adapter.pool import NoWorker, PoolEvent, WorkerPool
from adapter.upstream import FastChatClient, UpstreamError, make_http_client
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
