"""What the adapter costs a stream (a script, not a test).

Starts the reference worker (``fastchat-adapter reference-worker``, one chunk per token, as fast
as it can) and the adapter in front of it (``fastchat-adapter serve``), each as its own process on
loopback, then streams the same generations two ways:

- **direct**: ``POST /worker_generate_stream`` on the worker, with the prompt already rendered;
- **adapter**: ``POST /api/worker/generate_stream`` on the adapter, with DB-GPT's chat body
  (so each request also pays the adapter's ``/count_token`` call).

For concurrency 1 and 64 it prints, side by side, the time to first frame (median and p95, from
sending the request to the first complete frame) and the aggregate frames per second, plus the
adapter process's CPU seconds per 1,000 frames relayed (utime + stime from ``/proc/<pid>/stat``,
so Linux only). The client runs in this process; all three share the machine's cores, so the
figures are relative: compare the two columns of one run, not runs on different machines.

Run: ``.venv/bin/python bench/bench_adapter.py [--tokens 128] [--requests 2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

MODEL = "reference-model"
USER = "Tell me a story about a lighthouse keeper."
# The reference worker serves vicuna_v1.1: the prompt the adapter renders for USER.
PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    f"gives helpful, detailed, and polite answers to the user's questions. USER: {USER} "
    "ASSISTANT:"
)
CONCURRENCY = (1, 64)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat, in clock ticks)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def process(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "adapter", *args]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_until_up(client: httpx.AsyncClient, method: str, url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if (await client.request(method, url)).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not come up")
        await asyncio.sleep(0.1)


@dataclass
class Result:
    ttff: list[float]  # seconds, one per request
    frames: int
    wall: float
    cpu: float | None = None  # adapter CPU seconds during the run

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.wall

    def ttff_ms(self, quantile: float) -> float:
        ordered = sorted(self.ttff)
        return 1000 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]


async def one_stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> tuple[float, int]:
    started = time.perf_counter()
    first: float | None = None
    frames = 0
    async with client.stream("POST", url, json=body) as response:
        async for data in response.aiter_raw():
            # No keep-alive frames in this setup: every NUL ends one frame.
            count = data.count(b"\0")
            if count and first is None:
                first = time.perf_counter() - started
            frames += count
    if first is None or response.status_code != 200:
        raise SystemExit(f"{url}: no frame (HTTP {response.status_code})")
    return first, frames


async def run(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], concurrency: int, requests: int
) -> Result:
    async def user() -> list[tuple[float, int]]:
        return [await one_stream(client, url, body) for _ in range(requests)]

    started = time.perf_counter()
    per_user = await asyncio.gather(*(user() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    done = [result for results in per_user for result in results]
    return Result([t for t, _ in done], sum(n for _, n in done), wall)


async def bench(args: argparse.Namespace) -> None:
    worker_port, adapter_port = free_port(), free_port()
    worker_url = f"http://127.0.0.1:{worker_port}"
    adapter_url = f"http://127.0.0.1:{adapter_port}"
    worker_args = [
        "reference-worker",
        f"--port={worker_port}",
        f"--model-names={MODEL}",
        "--stream-interval=1",
        f"--tokens-per-second={args.tokens_per_second}",
        f"--limit-worker-concurrency={max(CONCURRENCY)}",
        "--context-length=4096",
    ]
    adapter_args = [
        "serve",
        f"--port={adapter_port}",
        f"--worker-address={worker_url}",
        "--log-level=warning",
        "--keepalive-interval=3600",
    ]
    direct_body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_new_tokens": args.tokens,
        "temperature": 0.0,
        "echo": False,
    }
    chat_body = {
        "model": MODEL,
        "messages": [{"role": "human", "content": USER, "round_index": 0}],
        "max_new_tokens": args.tokens,
        "echo": False,
    }
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(60.0)
    with process(*worker_args), process(*adapter_args) as adapter:
        async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
            await wait_until_up(client, "POST", worker_url + "/worker_get_status")
            await wait_until_up(client, "GET", adapter_url + "/readyz")
            direct = worker_url + "/worker_generate_stream"
            relayed = adapter_url + "/api/worker/generate_stream"
            await run(client, direct, direct_body, 4, 2)  # warm up connections and caches
            await run(client, relayed, chat_body, 4, 2)
            rows: list[tuple[int, Result, Result]] = []
            for concurrency in CONCURRENCY:
                requests = args.requests * (8 if concurrency == 1 else 1)
                plain = await run(client, direct, direct_body, concurrency, requests)
                before = cpu_seconds(adapter.pid)
                through = await run(client, relayed, chat_body, concurrency, requests)
                through.cpu = cpu_seconds(adapter.pid) - before
                rows.append((concurrency, plain, through))
    report(args, rows)


def report(args: argparse.Namespace, rows: list[tuple[int, Result, Result]]) -> None:
    rate = "as fast as it can" if not args.tokens_per_second else f"{args.tokens_per_second} tok/s"
    print(
        f"reference worker: {args.tokens} tokens per request, one frame per token, {rate}; "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    header = f"{'':>26} {'direct':>12} {'adapter':>12} {'overhead':>10}"
    for concurrency, plain, through in rows:
        print(f"\nconcurrency {concurrency} ({len(plain.ttff)} streams, {through.frames} frames)")
        print(header)
        for label, a, b in (
            ("time to first frame p50", plain.ttff_ms(0.5), through.ttff_ms(0.5)),
            ("time to first frame p95", plain.ttff_ms(0.95), through.ttff_ms(0.95)),
        ):
            print(f"{label + ' (ms)':>26} {a:12.2f} {b:12.2f} {b - a:+10.2f}")
        a, b = plain.frames_per_second, through.frames_per_second
        print(f"{'frames/s':>26} {a:12.0f} {b:12.0f} {100 * (b / a - 1):+9.1f}%")
        assert through.cpu is not None
        per_thousand = through.cpu / through.frames * 1000
        print(f"{'adapter CPU s/1000 frames':>26} {'':>12} {per_thousand:12.4f}")
    mean_ttff = statistics.mean(t for _, _, through in rows for t in through.ttff)
    print(f"\n(adapter mean time to first frame over all runs: {1000 * mean_ttff:.2f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="max_new_tokens per request")
    parser.add_argument(
        "--requests", type=int, default=2, help="requests per client at concurrency 64 (x8 at 1)"
    )
    parser.add_argument(
        "--tokens-per-second", type=float, default=0.0, help="worker pace; 0: as fast as it can"
    )
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
