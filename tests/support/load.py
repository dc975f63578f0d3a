"""Fault and load runs against real processes: the reference worker and the adapter's CLI, each
in its own process, driven over loopback. Shared by ``tests/adapter/test_load.py`` (small,
bounded, asserts correctness only) and ``bench/hardening_load.py`` (issue 12's full sizes,
prints the figures). Every function returns counts and timings; none asserts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

CLI = str(Path(sys.executable).with_name("fastchat-adapter"))
MODEL = "reference-model"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def _wait_up(url: str, path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.post(url + path, json={}, trust_env=False).status_code < 500:
                return
            if httpx.get(url + path, trust_env=False).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def spawned(command: list[str], port: int, probe: str, log: Path) -> Iterator[Proc]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTCHAT_ADAPTER_")}
    with log.open("wb") as out:
        popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        proc = Proc(popen, f"http://127.0.0.1:{port}", log)
        try:
            _wait_up(proc.url, probe)
            yield proc
        finally:
            if popen.poll() is None:
                popen.kill()
            popen.wait()


def worker(
    log_dir: Path, *, tokens_per_second: float = 0.0
) -> contextlib.AbstractContextManager[Proc]:
    port = free_port()
    command = [
        CLI, "reference-worker", "--host", "127.0.0.1", "--port", str(port),
        "--limit-worker-concurrency", "1024", "--tokens-per-second", str(tokens_per_second),
    ]  # fmt: skip
    return spawned(command, port, "/worker_get_status", log_dir / f"worker-{port}.log")


def adapter(log_dir: Path, worker_url: str, *extra: str) -> contextlib.AbstractContextManager[Proc]:
    port = free_port()
    command = [
        CLI, "serve", "--port", str(port), "--worker-address", worker_url,
        "--status-interval", "0.5", "--keepalive-interval", "60", "--log-level", "warning",
        *extra,
    ]  # fmt: skip
    return spawned(command, port, "/readyz", log_dir / f"adapter-{port}.log")


def client_for(concurrency: int = 100, timeout: float = 60) -> httpx.AsyncClient:
    """Idle connections are dropped at 2 s, before uvicorn's 5 s keep-alive timeout closes
    them: else reusing one just as the server closes it loses a request now and then (no
    response, ``ReadError``), the race adapter/upstream.py avoids the same way."""
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0
    )
    return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)


def body(prompt: str, max_new_tokens: int = 8) -> dict[str, object]:
    messages = [{"role": "human", "content": prompt}]
    return {"model": MODEL, "messages": messages, "max_new_tokens": max_new_tokens, "echo": False}


# --- one stream, read and judged ----------------------------------------------------------


@dataclass
class StreamResult:
    how: str  # complete | lost | truncated | malformed
    text: str = ""
    last: dict[str, object] = field(default_factory=dict)
    ended_at: float = 0.0


async def read_stream(
    client: httpx.AsyncClient, url: str, payload: dict[str, object]
) -> StreamResult:
    raw = b""
    try:
        async with client.stream("POST", url + "/api/worker/generate_stream", json=payload) as r:
            async for data in r.aiter_raw():
                raw += data
    except httpx.HTTPError:
        return StreamResult("lost" if not raw else "truncated")
    ended = time.monotonic()
    if not raw.endswith(b"\0"):
        return StreamResult("truncated", ended_at=ended)
    try:
        frames = [json.loads(piece) for piece in raw.split(b"\0") if piece]
    except ValueError:
        return StreamResult("malformed", ended_at=ended)
    if not frames or not all({"text", "error_code"} <= set(f) for f in frames):
        return StreamResult("malformed", ended_at=ended)
    last = frames[-1]
    if last["error_code"] == 0 and last.get("finish_reason") not in ("stop", "length"):
        return StreamResult("truncated", last=last, ended_at=ended)
    return StreamResult("complete", str(last["text"]), last, ended)


# --- the runs -----------------------------------------------------------------------------


@dataclass
class LoadFigures:
    streams: int
    outcomes: Counter[str]
    texts_per_prompt_max: int
    error_frames: int
    seconds: float
    rss_mb: tuple[float, float]
    fds: tuple[int, int]


async def load(
    adapter_proc: Proc, streams: int, concurrency: int, prompts: int = 16
) -> LoadFigures:
    """``streams`` streams, ``concurrency`` at a time, over ``prompts`` distinct prompts."""
    limit = asyncio.Semaphore(concurrency)
    texts: dict[int, set[str]] = defaultdict(set)
    outcomes: Counter[str] = Counter()
    errors = 0
    rss0, fds0 = adapter_proc.rss_mb(), adapter_proc.fds()
    started = time.monotonic()
    async with client_for(concurrency) as client:

        async def one(i: int) -> None:
            nonlocal errors
            async with limit:
                result = await read_stream(client, adapter_proc.url, body(f"prompt {i % prompts}"))
            outcomes[result.how] += 1
            if result.how == "complete":
                if result.last["error_code"]:
                    errors += 1
                else:
                    texts[i % prompts].add(result.text)

        await asyncio.gather(*(one(i) for i in range(streams)))
    seconds = time.monotonic() - started
    most = max((len(t) for t in texts.values()), default=0)
    return LoadFigures(
        streams, outcomes, most, errors, seconds, (rss0, adapter_proc.rss_mb()),
        (fds0, adapter_proc.fds()),
    )  # fmt: skip


async def queue_length(worker_url: str) -> int:
    async with httpx.AsyncClient(trust_env=False) as client:
        status = (await client.post(worker_url + "/worker_get_status", json={})).json()
    return int(status["queue_length"])


async def until_queue_empty(worker_url: str, timeout: float = 30.0) -> float:
    """Seconds until the worker's queue is 0 (or ``timeout``; then the queue is not 0)."""
    started = time.monotonic()
    while await queue_length(worker_url) and time.monotonic() - started < timeout:
        await asyncio.sleep(0.005)
    return time.monotonic() - started


@dataclass
class AbortFigures:
    aborts: int
    first_frames: int
    queue_empty_after: float
    queue_left: int


async def aborts(adapter_proc: Proc, worker_url: str, count: int, concurrency: int) -> AbortFigures:
    """``count`` streams closed by the client right after their first frame."""
    limit = asyncio.Semaphore(concurrency)
    seen = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal seen
        async with limit:
            url = adapter_proc.url + "/api/worker/generate_stream"
            async with client.stream("POST", url, json=body(f"abort {i}", 200)) as reply:
                async for data in reply.aiter_raw():
                    if data.strip(b"\0"):
                        seen += 1
                        break  # leaving the block closes the connection mid-stream

    async with client_for(concurrency) as client:
        await asyncio.gather(*(one(client, i) for i in range(count)))
    waited = await until_queue_empty(worker_url)
    return AbortFigures(count, seen, waited, await queue_length(worker_url))


@dataclass
class KillFigures:
    streams: int
    error_frames: int
    codes: Counter[int]
    outcomes: Counter[str]
    error_after_ms: tuple[float, float]  # min, max from SIGKILL to the error frame


async def kill_mid_stream(adapter_proc: Proc, worker_proc: Proc, streams: int) -> KillFigures:
    """``streams`` slow streams; the worker is SIGKILLed once each has its first frame."""
    firsts = [asyncio.Event() for _ in range(streams)]

    async def one(client: httpx.AsyncClient, i: int) -> StreamResult:
        raw = b""
        url = adapter_proc.url + "/api/worker/generate_stream"
        try:
            async with client.stream("POST", url, json=body(f"kill {i}", 500)) as reply:
                async for data in reply.aiter_raw():
                    raw += data
                    if data.strip(b"\0"):
                        firsts[i].set()
        except httpx.HTTPError:
            firsts[i].set()
            return StreamResult("lost")
        frames = [json.loads(p) for p in raw.split(b"\0") if p]
        how = "complete" if raw.endswith(b"\0") and frames else "truncated"
        return StreamResult(how, last=frames[-1] if frames else {}, ended_at=time.monotonic())

    async with client_for(streams) as client:
        tasks = [asyncio.ensure_future(one(client, i)) for i in range(streams)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 60)
        killed = time.monotonic()
        worker_proc.popen.send_signal(signal.SIGKILL)
        results = await asyncio.gather(*tasks)
    errors = [r for r in results if r.last.get("error_code")]
    after = [1000 * (r.ended_at - killed) for r in errors] or [0.0]
    codes = Counter(int(str(r.last["error_code"])) for r in errors)
    outcomes = Counter(r.how for r in results)
    return KillFigures(streams, len(errors), codes, outcomes, (min(after), max(after)))


@dataclass
class ShutdownFigures:
    streams: int
    outcomes: Counter[str]
    finished: int  # ended with finish_reason
    going_away: int  # ended with the going-away error frame
    exit_code: int | None


async def sigterm_with_streams(
    adapter_proc: Proc, streams: int, max_new_tokens: int
) -> ShutdownFigures:
    """``streams`` streams; SIGTERM once each has its first frame; read them all out."""
    firsts = [asyncio.Event() for _ in range(streams)]

    async def one(client: httpx.AsyncClient, i: int) -> StreamResult:
        raw = b""
        url = adapter_proc.url + "/api/worker/generate_stream"
        try:
            async with client.stream("POST", url, json=body(f"term {i}", max_new_tokens)) as reply:
                async for data in reply.aiter_raw():
                    raw += data
                    if data.strip(b"\0"):
                        firsts[i].set()
        except httpx.HTTPError:
            firsts[i].set()
            return StreamResult("lost" if not raw else "truncated")
        frames = [json.loads(p) for p in raw.split(b"\0") if p]
        how = "complete" if raw.endswith(b"\0") and frames else "truncated"
        return StreamResult(how, last=frames[-1] if frames else {})

    async with client_for(streams, timeout=120) as client:
        tasks = [asyncio.ensure_future(one(client, i)) for i in range(streams)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 60)
        adapter_proc.popen.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks)
    exit_code = await asyncio.to_thread(adapter_proc.popen.wait, 60)
    finished = sum(1 for r in results if r.last.get("finish_reason") in ("stop", "length"))
    going = sum(1 for r in results if "going away" in str(r.last.get("text", "")))
    outcomes = Counter(r.how for r in results)
    return ShutdownFigures(streams, outcomes, finished, going, exit_code)
