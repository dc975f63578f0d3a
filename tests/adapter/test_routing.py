"""Which worker a generation goes to, and when the template cache is refetched, against real
fake workers on loopback (the pool's polling and routing, seen through the worker API)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from adapter.tools.reference_worker import ReferenceWorkerConfig
from tests.adapter.helpers import (
    STREAM,
    UPSTREAM_STREAM,
    chat,
    eventually,
    serving,
    settings,
    stream,
)
from tests.support.fake_worker import FakeWorker
from tests.support.worker_client import connect, wait_for_queue_length

StartFake = Callable[..., FakeWorker]
CONV = "/worker_get_conv_template"


async def test_template_cache_is_refetched_after_a_worker_restart(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    async with serving(settings(fake.url, status_interval=0.05)) as adapter:
        worker = adapter.runtime.pool.workers[fake.url]
        for _ in range(2):
            await stream(adapter.client, chat(max_new_tokens=1))
        assert len(fake.bodies(CONV)) == len(fake.bodies("/model_details")) == 1

        await asyncio.to_thread(fake.stop)
        await eventually(lambda: not worker.alive, what="the worker seen down")
        await asyncio.to_thread(fake.start)
        await eventually(lambda: worker.alive, what="the worker seen up")
        status, frames = await stream(adapter.client, chat(max_new_tokens=1))
    assert status == 200 and frames[-1]["error_code"] == 0
    assert len(fake.bodies(CONV)) == len(fake.bodies("/model_details")) == 2


async def test_the_shortest_queue_gets_the_request(fake_worker: StartFake) -> None:
    busy = fake_worker(ReferenceWorkerConfig(tokens_per_second=10))
    idle = fake_worker(ReferenceWorkerConfig(tokens_per_second=10))
    async with serving(settings(busy.url, idle.url, status_interval=0.05)) as adapter:
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
    async with serving(settings(first.url, second.url)) as adapter:
        replies = await asyncio.gather(
            *(stream(adapter.client, chat(f"q{i}", max_new_tokens=1)) for i in range(4))
        )
    assert all(status == 200 and frames[-1]["error_code"] == 0 for status, frames in replies)
    assert len(first.bodies(UPSTREAM_STREAM)) == len(second.bodies(UPSTREAM_STREAM)) == 2


async def test_slots_are_never_leaked_by_a_burst_of_streams(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(tokens_per_second=200))
    async with serving(settings(fake.url, keepalive_interval=0.05)) as adapter:

        async def leave_early(i: int) -> None:
            async with adapter.client.stream("POST", STREAM, json=chat(f"{i}", max_new_tokens=50)):
                await asyncio.sleep(0.01 * i)

        await asyncio.gather(*(leave_early(i) for i in range(8)))
        await asyncio.gather(*(stream(adapter.client, chat(max_new_tokens=5)) for _ in range(4)))
        async with connect(fake.url) as direct:
            await wait_for_queue_length(direct, 0)
        await eventually(lambda: adapter.runtime.inflight.count == 0, what="drained")
    assert fake.disconnects >= 1  # some left mid-stream, not only before the upstream call
