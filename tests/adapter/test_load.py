"""A bounded fault and load run that CI affords (issue 12, "keep it proven"): real processes
over loopback, correctness only, never wall-clock limits. ``bench/hardening_load.py`` runs the
same code at the issue's full sizes and prints the figures."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support import load


def test_streams_under_load_are_whole_and_alike_and_the_queue_drains(tmp_path: Path) -> None:
    async def run() -> None:
        with load.worker(tmp_path) as worker, load.adapter(tmp_path, worker.url) as adapter:
            figures = await load.load(adapter, streams=1_000, concurrency=64)
            assert dict(figures.outcomes) == {"complete": 1_000}  # 0 lost/truncated/malformed
            assert figures.error_frames == 0
            assert figures.texts_per_prompt_max == 1  # the same text for the same prompt
            assert await load.until_queue_empty(worker.url) >= 0
            assert await load.queue_length(worker.url) == 0
            aborted = await load.aborts(adapter, worker.url, count=200, concurrency=64)
            assert aborted.first_frames == 200
            assert aborted.queue_left == 0  # every aborted stream freed its worker slot

    asyncio.run(run())


def test_worker_sigkill_mid_stream_gives_every_stream_an_error_frame(tmp_path: Path) -> None:
    async def run() -> None:
        with (
            load.worker(tmp_path, tokens_per_second=20) as worker,
            load.adapter(tmp_path, worker.url) as adapter,
        ):
            killed = await load.kill_mid_stream(adapter, worker, streams=50)
        assert dict(killed.outcomes) == {"complete": 50}  # NUL-terminated, no broken body
        assert killed.error_frames == 50 and set(killed.codes) <= {50001, 50005}

    asyncio.run(run())


def test_sigterm_with_streams_and_enough_grace_completes_them_all(tmp_path: Path) -> None:
    async def run() -> None:
        with (
            load.worker(tmp_path, tokens_per_second=50) as worker,
            load.adapter(tmp_path, worker.url, "--shutdown-grace", "30") as adapter,
        ):
            figures = await load.sigterm_with_streams(adapter, streams=50, max_new_tokens=40)
        assert dict(figures.outcomes) == {"complete": 50}
        assert figures.finished == 50 and figures.exit_code == 0

    asyncio.run(run())
