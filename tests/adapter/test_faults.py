"""Faults found in review: each test pins one defect that the other suites did not cover."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.adapter.helpers import chat, serving, settings, stream
from tests.support.fake_worker import FakeWorker, Hang
from tests.support.worker_client import connect, wait_for_queue_length

StartFake = Callable[..., FakeWorker]


async def test_a_worker_hanging_after_its_final_chunk_does_not_hold_the_stream_open(
    fake_worker: StartFake,
) -> None:
    # The final chunk (finish_reason set) is out, then the worker sends nothing and keeps the
    # body open. DB-GPT's apiserver sends its last finish event and [DONE] only when our body
    # ends, so draining the upstream must be bounded, not wait for the idle timeout.
    fake = fake_worker()
    async with serving(settings(fake.url, idle_timeout=20.0)) as adapter:
        _, clean = await stream(adapter.client, chat(max_new_tokens=3))
        fake.fail_next(Hang(30.0, after_chunks=len(clean)))  # after the last chunk
        started = time.perf_counter()
        status, frames = await stream(adapter.client, chat(max_new_tokens=3))
        elapsed = time.perf_counter() - started
    assert status == 200 and frames == clean
    assert elapsed < 5.0
    await fake.wait_for_disconnects(1)  # the upstream was closed, freeing the slot
    async with connect(fake.url) as worker:
        await wait_for_queue_length(worker, 0)


async def test_a_worker_hanging_on_count_token_times_out_after_the_idle_timeout(
    fake_worker: StartFake,
) -> None:
    # A wedged (e.g. SIGSTOPped) worker hangs the first call of a request, count_token once the
    # template is cached: the idle timeout bounds that silence too, not a fixed 30 s.
    fake = fake_worker()
    async with serving(settings(fake.url, idle_timeout=0.5)) as adapter:
        await stream(adapter.client, chat(max_new_tokens=2))  # template and details cached
        fake.fail_next(Hang(20.0, after_chunks=None), path="/count_token")
        started = time.perf_counter()
        status, frames = await stream(adapter.client, chat(max_new_tokens=2))
        elapsed = time.perf_counter() - started
    assert status == 200 and len(frames) == 1
    assert frames[0]["error_code"] == 50006 and "idle_timeout" in frames[0]["text"]
    assert elapsed < 5.0
