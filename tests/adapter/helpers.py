"""Helpers for the worker API tests: the adapter on loopback in front of fake FastChat workers.

The adapter runs on a real uvicorn in its own thread (``LoopbackServer``), so streaming, chunk
timing and disconnects go through real sockets. Its runtime lives in that thread's loop: tests
only *read* it (metrics, pool state), never call its coroutines.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import httpx

from adapter.app import create_app
from adapter.runtime import Runtime
from adapter.settings import Settings
from tests.support.servers import LoopbackServer

MODEL: Final = "reference-model"
STREAM: Final = "/api/worker/generate_stream"
UPSTREAM_STREAM: Final = "/worker_generate_stream"
# The reference worker's template is vicuna_v1.1 (PROTOCOLS.md §1.9, §4.4).
VICUNA_SYSTEM: Final = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)


def vicuna_prompt(user: str) -> str:
    return f"{VICUNA_SYSTEM} USER: {user} ASSISTANT:"


def chat(content: str = "Hi", **extra: Any) -> dict[str, Any]:
    """A generate body as DB-GPT's apiserver sends it for one user message (§8.2)."""
    messages = [{"role": "human", "content": content, "round_index": 0}]
    return {"model": MODEL, "messages": messages, "echo": False, **extra}


def settings(*workers: str, **values: Any) -> Settings:
    """No background polling or keep-alive noise unless a test asks for it."""
    base: dict[str, Any] = {
        "worker_address": list(workers),
        "status_interval": 60.0,
        "heartbeat_interval": 60.0,
        "keepalive_interval": 60.0,
        "connect_timeout": 1.0,
        "idle_timeout": 10.0,
    }
    return Settings(**(base | values))


@dataclass
class Adapter:
    server: LoopbackServer
    client: httpx.AsyncClient
    runtime: Runtime

    def sample(self, name: str, **labels: str) -> float:
        value = self.runtime.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@asynccontextmanager
async def serving(config: Settings) -> AsyncIterator[Adapter]:
    app = create_app(config)
    server = LoopbackServer(app)
    await asyncio.to_thread(server.start)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            yield Adapter(server, client, app.state.runtime)
    finally:
        await asyncio.to_thread(server.stop)


def split(raw: bytes) -> tuple[list[dict[str, Any]], int]:
    """(frames, keep-alive count) of a complete NUL-framed body; empty pieces are keep-alives."""
    *pieces, tail = raw.split(b"\0")
    assert tail == b"", f"the body does not end with a NUL: {raw[-80:]!r}"
    return [json.loads(p) for p in pieces if p], sum(1 for p in pieces if not p)


async def stream(client: httpx.AsyncClient, body: Any) -> tuple[int, list[dict[str, Any]]]:
    """POST to generate_stream; the status and the frames (keep-alives dropped)."""
    async with client.stream("POST", STREAM, json=body) as response:
        raw = await response.aread()
    return response.status_code, split(raw)[0]


async def timed_pieces(client: httpx.AsyncClient, body: Any) -> list[tuple[float, bytes]]:
    """Every NUL-terminated piece of the stream (b"" for a keep-alive) with its arrival time,
    in seconds since the request was sent."""
    pieces: list[tuple[float, bytes]] = []
    pending = b""
    started = time.perf_counter()
    async with client.stream("POST", STREAM, json=body) as response:
        async for data in response.aiter_raw():
            now = time.perf_counter() - started
            *done, pending = (pending + data).split(b"\0")
            pieces += [(now, piece) for piece in done]
    assert pending == b""
    return pieces


async def eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def calls(requests: list[Any]) -> list[str]:
    """The paths of recorded upstream requests, status polls left out."""
    return [r.path for r in requests if r.path != "/worker_get_status"]
