"""Issue 12's figures at full size, re-measured and printed (not a test: see
tests/adapter/test_load.py for the bounded run CI asserts on).

    python bench/hardening_load.py            # everything, about 5-10 minutes on 2 cores
    python bench/hardening_load.py --quick    # a tenth of the sizes

Real processes over loopback: the reference worker and ``fastchat-adapter serve``. Printed:
streams under load (lost/truncated/malformed, texts per prompt, RSS, fds), client aborts
(queue back to 0), a worker SIGKILL mid-stream, SIGTERM with enough grace, SIGTERM with the
grace running out, a 200,000-input embeddings body (RSS, upstream calls after the client
left), and 200 connections sending their heads at 1 byte/s.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import load
from tests.support.fake_worker import FakeWorker


async def streams_and_aborts(tmp: Path, rounds: int, streams: int, aborts: int) -> None:
    with load.worker(tmp) as worker, load.adapter(tmp, worker.url) as adapter:
        for r in range(rounds):
            f = await load.load(adapter, streams=streams, concurrency=256)
            print(
                f"load round {r + 1}: {f.streams} streams at 256: {dict(f.outcomes)}, "
                f"error frames {f.error_frames}, texts per prompt <= {f.texts_per_prompt_max}, "
                f"{f.seconds:.1f} s, RSS {f.rss_mb[0]:.0f} -> {f.rss_mb[1]:.0f} MB, "
                f"fds {f.fds[0]} -> {f.fds[1]}"
            )
        for r in range(rounds):
            a = await load.aborts(adapter, worker.url, count=aborts, concurrency=256)
            print(
                f"aborts round {r + 1}: {a.aborts} aborted after the first frame "
                f"({a.first_frames} first frames): worker queue back to 0 in "
                f"{a.queue_empty_after:.3f} s (left: {a.queue_left})"
            )


async def kill(tmp: Path) -> None:
    with (
        load.worker(tmp, tokens_per_second=20) as worker,
        load.adapter(tmp, worker.url) as adapter,
    ):
        k = await load.kill_mid_stream(adapter, worker, streams=50)
    print(
        f"worker SIGKILL mid-stream: {k.error_frames}/{k.streams} error frames "
        f"{dict(k.codes)}, {dict(k.outcomes)}, {k.error_after_ms[0]:.0f}-"
        f"{k.error_after_ms[1]:.0f} ms after the kill"
    )


async def sigterm(tmp: Path) -> None:
    with (
        load.worker(tmp, tokens_per_second=50) as worker,
        load.adapter(tmp, worker.url, "--shutdown-grace", "30") as adapter,
    ):
        s = await load.sigterm_with_streams(adapter, streams=50, max_new_tokens=60)
    print(
        f"SIGTERM, 50 streams, grace 30 s: {dict(s.outcomes)}, {s.finished} finished, "
        f"exit {s.exit_code}"
    )
    with (
        load.worker(tmp, tokens_per_second=5) as worker,
        load.adapter(tmp, worker.url, "--shutdown-grace", "2") as adapter,
    ):
        started = time.monotonic()
        s = await load.sigterm_with_streams(adapter, streams=50, max_new_tokens=100)
        took = time.monotonic() - started
    print(
        f"SIGTERM, 50 x 20 s streams, grace 2 s: {dict(s.outcomes)}, {s.going_away} ended "
        f"with the going-away error frame, exit {s.exit_code}, {took:.1f} s in all"
    )


async def embeddings(tmp: Path) -> None:
    inputs = ["a"] * 200_000
    embed = "/worker_get_embeddings"
    for extra in ((), ("--max-embedding-inputs", "200000")):
        with FakeWorker() as worker, load.adapter(tmp, worker.url, *extra) as adapter:
            before = adapter.rss_mb()
            status = "client gave up after 3 s"
            async with httpx.AsyncClient(trust_env=False) as client:
                try:
                    reply = await client.post(
                        adapter.url + "/api/worker/embeddings",
                        json={"model": load.MODEL, "input": inputs},
                        timeout=3.0,
                    )
                    status = f"{reply.status_code} {reply.text[:100]}"
                except httpx.TimeoutException:
                    pass
            await asyncio.sleep(0.5)  # let the cancellation land
            calls_then = len(worker.bodies(embed))
            peak = adapter.rss_mb()
            await asyncio.sleep(5)
            calls_later = len(worker.bodies(embed))
            peak = max(peak, adapter.rss_mb())
        label = " ".join(extra) or "defaults"
        print(
            f"embeddings, 200,000 inputs ({label}): {status}; RSS {before:.0f} -> {peak:.0f} MB; "
            f"{calls_then} upstream calls, {calls_later - calls_then} more in the 5 s after "
            "the client left"
        )


def slow_heads(tmp: Path, connections: int) -> None:
    with load.worker(tmp) as worker, load.adapter(tmp, worker.url) as adapter:
        port = int(adapter.url.rsplit(":", 1)[1])
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
        fds_open = adapter.fds()
        started = time.monotonic()
        closed = 0
        while closed < connections and time.monotonic() - started < 60:
            closed = 0
            for sock in socks:
                try:
                    sock.sendall(b"G")
                except OSError:
                    closed += 1
            time.sleep(1.0)
        took = time.monotonic() - started
        fds_after = adapter.fds()
        metrics = httpx.get(adapter.url + "/metrics", trust_env=False).text
        name = "fastchat_adapter_connections_timed_out_total"
        counted = [m for m in metrics.splitlines() if m.startswith(name)]
        for sock in socks:
            sock.close()
    print(
        f"{connections} connections sending a head at 1 byte/s: {closed} closed by the adapter "
        f"within {took:.0f} s; adapter fds {fds_open} -> {fds_after}; {counted}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes")
    ns = parser.parse_args()
    scale = 10 if ns.quick else 1
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        asyncio.run(streams_and_aborts(tmp, 3, 10_000 // scale, 1_000 // scale))
        asyncio.run(kill(tmp))
        asyncio.run(sigterm(tmp))
        asyncio.run(embeddings(tmp))
        slow_heads(tmp, 200)


if __name__ == "__main__":
    main()
