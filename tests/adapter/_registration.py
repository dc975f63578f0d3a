"""Helpers shared by the registration tests: settings, a running runtime, waiting, timing."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from adapter.runtime import Runtime
from adapter.settings import Settings
from tests.support.fake_controller import Call, FakeController
from tests.support.servers import LoopbackServer

REGISTER = ("POST", "/api/controller/models")
HEARTBEAT = ("POST", "/api/controller/heartbeat")
DELETE = ("DELETE", "/api/controller/models")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings(**values: Any) -> Settings:
    """Test settings: fast polls and heartbeats unless told otherwise, a port of our own."""
    base: dict[str, Any] = {
        "port": free_port(),
        "status_interval": 0.1,
        "heartbeat_interval": 0.2,
        "connect_timeout": 1.0,
    }
    return Settings(**(base | values))


def body(key: str, port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    """Exactly what DB-GPT's ModelRegistryClient sends to register and heartbeat (§5.5)."""
    return {
        "model_name": key,
        "host": host,
        "port": port,
        "weight": 1.0,
        "check_healthy": True,
        "healthy": False,
        "enabled": True,
        "prompt_template": None,
        "last_heartbeat": None,
        "remove_from_registry": False,
    }


@asynccontextmanager
async def running(config: Settings) -> AsyncIterator[Runtime]:
    """A runtime started in the test's loop (no HTTP server: registration needs none)."""
    runtime = Runtime.create(config)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def eventually(
    check: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
) -> float:
    """Wait until ``check()`` holds; return the monotonic time it was first seen to. The check
    runs in the loop: keep it cheap and non-blocking (see ``until_listed`` for the controller)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic()


async def until_listed(
    fake: FakeController, expected: dict[str, bool], timeout: float = 5.0
) -> float:
    """Wait until the controller's listing (over HTTP, from a thread, so the adapter's loop
    keeps running) is exactly ``expected`` (key -> healthy); return when it was seen so."""
    deadline = time.monotonic() + timeout
    while (seen := await asyncio.to_thread(fake.health)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"controller lists {seen}, expected {expected}")
        await asyncio.sleep(0.005)
    return time.monotonic()


def calls(fake: FakeController, kind: tuple[str, str], key: str | None = None) -> list[Call]:
    return fake.calls_to(*kind, model_name=key)


@asynccontextmanager
async def serving(app: FastAPI, port: int) -> AsyncIterator[LoopbackServer]:
    """The adapter's app on its own loopback server thread (for the standalone controller)."""
    server = LoopbackServer(app, port=port)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)
