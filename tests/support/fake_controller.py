"""A fake DB-GPT model controller on a real loopback socket, for contract tests.

It *is* the adapter's own standalone controller (``adapter.registry`` + ``adapter.controller_api``,
checked against DB-GPT's semantics in ``tests/adapter/test_registry.py``), wrapped so a test can:

- read every call it received (method, path, query, JSON body, arrival time);
- make it fail: every controller call answers ``fail_status`` (recorded all the same);
- make it slow: ``delays[path]`` seconds before a call to ``path`` is applied and answered
  (``in_flight`` counts calls received but not yet answered);
- stop it (down: connections refused) and restart it on the same port with its state lost,
  as a restarted DB-GPT controller forgets every registration.

Calls arrive on the server's thread; ``calls`` hands out a copy taken under a lock.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl

import httpx
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapter.controller_api import controller_router
from adapter.registry import ModelRegistry, run_expiry
from tests.support.servers import LoopbackServer

__all__ = ["Call", "FakeController", "controller_app"]


def controller_app(
    registry: ModelRegistry, *, heartbeat_interval: float, heartbeat_timeout: float
) -> FastAPI:
    """A controller on its own (the API plus its expiry checker), like ``dbgpt start
    controller``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        checker = asyncio.create_task(
            run_expiry(registry, interval=heartbeat_interval, timeout=heartbeat_timeout),
            name="registry-expiry",
        )
        try:
            yield
        finally:
            checker.cancel()
            with suppress(asyncio.CancelledError):
                await checker

    app = FastAPI(title="DB-GPT model controller (fastchat-adapter)", lifespan=lifespan)
    app.include_router(controller_router(registry))
    return app


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    raw_query: str
    query: dict[str, str]
    body: Any  # decoded JSON, or None when there was no body
    at: float  # time.monotonic() on arrival, comparable with the test's own clock
    done: float  # time.monotonic() once answered (after any delay: when it took effect)
    status: int  # what the fake answered (0 if the request never completed)


class FakeController:
    def __init__(
        self, *, heartbeat_interval: float = 60.0, heartbeat_timeout: float = 120.0, port: int = 0
    ) -> None:
        self.registry = ModelRegistry()
        self.fail_status: int | None = None
        self.delays: dict[str, float] = {}
        self.in_flight = 0
        self._calls: list[Call] = []
        self._lock = threading.Lock()
        app = controller_app(
            self.registry,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
        )
        self.server = LoopbackServer(_Recorder(app, self), port=port)

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        """Down, state lost, up again on the same port."""
        self.server.stop()
        self.registry.clear()
        self.server.start()

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> FakeController:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- what it saw ----------------------------------------------------------------------
    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def calls_to(self, method: str, path: str, model_name: str | None = None) -> list[Call]:
        """Calls of one kind, optionally for one worker key (from the body or the query)."""
        return [
            c
            for c in self.calls
            if c.method == method
            and c.path == path
            and (model_name is None or _model_of(c) == model_name)
        ]

    def clear_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    def listing(self, model_name: str = "", *, healthy_only: bool = False) -> list[dict[str, Any]]:
        """``GET /api/controller/models`` over the socket, like any DB-GPT client."""
        params = {"model_name": model_name, "healthy_only": str(healthy_only).lower()}
        with httpx.Client(trust_env=False) as client:
            reply = client.get(self.url + "/api/controller/models", params=params, timeout=5)
        reply.raise_for_status()
        listed: list[dict[str, Any]] = reply.json()
        return listed

    def health(self) -> dict[str, bool]:
        """Worker key -> healthy, from the listing."""
        return {i["model_name"]: i["healthy"] for i in self.listing()}

    def _count(self, step: int) -> None:
        with self._lock:
            self.in_flight += step

    def _record(self, call: Call) -> None:
        with self._lock:
            self._calls.append(call)


def _model_of(call: Call) -> str | None:
    if isinstance(call.body, dict) and "model_name" in call.body:
        return str(call.body["model_name"])
    return call.query.get("model_name")


class _Recorder:
    """ASGI middleware: buffer and record each request, then answer it or fail it."""

    def __init__(self, app: ASGIApp, fake: FakeController) -> None:
        self.app = app
        self.fake = fake

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        at = time.monotonic()
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        status, recorded = 0, False

        def record() -> None:
            # Before the last byte goes out: once a client has its answer, the call is listed.
            nonlocal recorded
            if recorded:
                return
            recorded = True
            query = scope["query_string"].decode("latin-1")
            self.fake._record(
                Call(
                    method=scope["method"],
                    path=scope["path"],
                    raw_query=query,
                    query=dict(parse_qsl(query, keep_blank_values=True)),
                    body=_decode(raw),
                    at=at,
                    done=time.monotonic(),
                    status=status,
                )
            )
            self.fake._count(-1)

        async def send_recorded(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif not message.get("more_body", False):
                record()
            await send(message)

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        self.fake._count(+1)
        try:
            await asyncio.sleep(self.fake.delays.get(scope["path"], 0.0))
            fail = self.fake.fail_status
            if fail is not None and scope["path"].startswith("/api/controller/"):
                start = {"type": "http.response.start", "status": fail, "headers": []}
                await send_recorded(start)
                await send_recorded({"type": "http.response.body", "body": b"injected failure"})
            else:
                await self.app(scope, replay, send_recorded)
        finally:
            record()  # also when the app failed or the client left before the answer


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # recorded as text, whatever a test sends
        return raw.decode("utf-8", "replace")
