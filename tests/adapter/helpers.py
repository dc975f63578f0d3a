"""What the adapter tests share: settings, the adapter served three ways, request bodies, reading
frames and metrics, waiting, and the DB-GPT controller's calls.

The adapter is served

- ``serving(config)``: on a real uvicorn in its own thread (``LoopbackServer``), so streaming,
  chunk timing and disconnects go through real sockets. Its runtime lives in that thread's
  loop: tests only *read* it (metrics, pool state), never call its coroutines;
- ``in_process(app)``: in the test's loop (ASGI transport plus the app's lifespan), so a test
  can drive the runtime directly (``begin_shutdown``);
- ``running(config)``: a bare runtime in the test's loop, no HTTP at all (registration).
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import httpx
import respx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from adapter import __version__ as VERSION
from adapter.app import create_app, front
from adapter.cli import build_parser, settings_from_args
from adapter.runtime import Runtime
from adapter.server import protocol_class
from adapter.settings import Settings
from tests.support.fake_controller import Call, FakeController
from tests.support.fake_worker import FakeWorker, StartFake
from tests.support.servers import LoopbackServer
from tests.support.worker_client import connect, wait_for_queue_length

__all__ = [
    "DELETE",
    "HEARTBEAT",
    "MOCK_WORKER",
    "MODEL",
    "REGISTER",
    "STREAM",
    "UPSTREAM_STREAM",
    "VERSION",
    "ZERO_SHOT",
    "Adapter",
    "StartFake",
    "assert_slot_freed",
    "chat",
    "controller_calls",
    "eventually",
    "free_port",
    "hard_delete_query",
    "in_process",
    "instance_body",
    "log_lines",
    "metric_value",
    "mocked_worker",
    "only_error",
    "parse_serve",
    "running",
    "sample",
    "sent",
    "serving",
    "settings_for",
    "split",
    "status_is",
    "stream",
    "stream_ok",
    "timed_pieces",
    "until_listed",
    "upstream_paths",
    "vicuna_prompt",
    "wait_calls",
    "within",
]

T = TypeVar("T")

MODEL: Final = "reference-model"
STREAM: Final = "/api/worker/generate_stream"
UPSTREAM_STREAM: Final = "/worker_generate_stream"
# The reference worker's template is vicuna_v1.1 (docs/protocol.md §1.9, §4.4).
VICUNA_SYSTEM: Final = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)

MOCK_WORKER: Final = "http://fastchat-worker:21002"
# FastChat's zero_shot template (sep_style 1, stop_str "###"), §1.9 and §4.4.
ZERO_SHOT: Final[dict[str, Any]] = {
    "name": "zero_shot",
    "system_template": "{system_message}",
    "system_message": "A chat between a curious human and an artificial intelligence assistant.",
    "roles": ["Human", "Assistant"],
    "messages": [],
    "offset": 0,
    "sep_style": 1,
    "sep": "\n### ",
    "sep2": None,
    "stop_str": "###",
    "stop_token_ids": None,
}
MOCK_CHUNKS: Final = [
    {"text": "Hel", "error_code": 0, "usage": None, "finish_reason": None, "logprobs": None},
    {"text": "Hello", "error_code": 0, "finish_reason": "stop", "logprobs": None},
]
MOCK_STREAM_BODY: Final = b"".join(json.dumps(chunk).encode() + b"\0" for chunk in MOCK_CHUNKS)


def vicuna_prompt(user: str) -> str:
    return f"{VICUNA_SYSTEM} USER: {user} ASSISTANT:"


def chat(content: str = "Hi", **extra: Any) -> dict[str, Any]:
    """A generate body as DB-GPT's apiserver sends it for one user message (§8.2)."""
    messages = [{"role": "human", "content": content, "round_index": 0}]
    return {"model": MODEL, "messages": messages, "echo": False, **extra}


# --- settings ------------------------------------------------------------------------------

QUIET: Final = {"status_interval": 60.0, "heartbeat_interval": 60.0, "keepalive_interval": 60.0}
BRISK: Final = {"status_interval": 0.1, "heartbeat_interval": 0.2}


def settings_for(*workers: str, brisk: bool = False, **values: Any) -> Settings:
    """Settings for the FastChat workers at ``workers`` (URLs), failing fast (1 s connect,
    10 s idle). Nothing happens in the background (status polls, heartbeats and keep-alives
    every 60 s) unless a test sets it; ``brisk=True`` polls every 0.1 s and heartbeats every
    0.2 s, for the registration tests. Explicit ``values`` win over both."""
    base: dict[str, Any] = {
        "worker_address": list(workers),
        **(BRISK if brisk else QUIET),
        "connect_timeout": 1.0,
        "idle_timeout": 10.0,
    }
    if brisk:
        base["keepalive_interval"] = QUIET["keepalive_interval"]
    return Settings(**(base | values))


def parse_serve(*argv: str) -> Settings:
    """The settings ``fastchat-adapter serve *argv`` would run with."""
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the adapter, served ----------------------------------------------------------------------


@dataclass
class Adapter:
    server: LoopbackServer
    client: httpx.AsyncClient
    runtime: Runtime

    def sample(self, name: str, **labels: str) -> float:
        return sample(self.runtime, name, **labels)


@asynccontextmanager
async def serving(
    target: Settings | FastAPI, *, port: int = 0, raw_send: bool = True
) -> AsyncIterator[Adapter]:
    """The adapter (``target``: its settings, or an app already made) on a loopback server of
    its own (on ``port``; 0: any free one), and a client for it. As ``adapter/server.py`` runs
    it (``app.front``: frames written on the socket), or with ``raw_send=False`` as any
    other ASGI server would (frames sent as ASGI messages)."""
    app = create_app(target) if isinstance(target, Settings) else target
    runtime = app.state.runtime
    if raw_send:  # the server's own protocol, read deadlines included
        http = protocol_class(runtime.settings, runtime)
        server = LoopbackServer(front(app), port=port, http=http)
    else:
        server = LoopbackServer(app, port=port)
    await asyncio.to_thread(server.start)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            yield Adapter(server, client, app.state.runtime)
    finally:
        await asyncio.to_thread(server.stop)


@asynccontextmanager
async def in_process(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` with its lifespan running in the test's loop, and a client calling it directly."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://adapter") as client:
            yield client


@asynccontextmanager
async def running(config: Settings) -> AsyncIterator[Runtime]:
    """A runtime started in the test's loop (no HTTP server: registration needs none)."""
    runtime = Runtime.create(config)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@asynccontextmanager
async def mocked_worker(
    conv: dict[str, Any] | None = None,
    *,
    names: tuple[str, ...] = ("m",),
    context_length: int = 64,
    count: int = 20,
    **values: Any,
) -> AsyncIterator[tuple[httpx.AsyncClient, respx.MockRouter]]:
    """The adapter (``in_process``) in front of a respx worker at ``MOCK_WORKER`` serving
    ``names`` with template ``conv`` (``ZERO_SHOT`` by default); its routes are named after
    FastChat's paths: status, conv, details, count, stream, generate."""
    with respx.mock(base_url=MOCK_WORKER, assert_all_called=False) as mock:
        status = {"model_names": list(names), "speed": 1, "queue_length": 0}
        mock.post("/worker_get_status", name="status").respond(json=status)
        template = {"conv": ZERO_SHOT if conv is None else conv}
        mock.post("/worker_get_conv_template", name="conv").respond(json=template)
        details = {"context_length": context_length}
        mock.post("/model_details", name="details").respond(json=details)
        counted = {"count": count, "error_code": 0}
        mock.post("/count_token", name="count").respond(json=counted)
        mock.post("/worker_generate_stream", name="stream").respond(content=MOCK_STREAM_BODY)
        mock.post("/worker_generate", name="generate").respond(json=MOCK_CHUNKS[-1])
        app = create_app(settings_for(MOCK_WORKER, **values))
        # respx sees httpx only: streams take httpx's path instead of the lean reader.
        app.state.runtime.client.lean_streams = False
        async with in_process(app) as client:
            yield client, mock


def sent(mock: respx.MockRouter, route: str) -> Any:
    """The JSON body of the last call to the respx worker's ``route``."""
    return json.loads(mock[route].calls.last.request.content)


# --- frames ---------------------------------------------------------------------------------


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


async def stream_ok(client: httpx.AsyncClient, body: Any) -> list[dict[str, Any]]:
    """The frames of a generate_stream answered with HTTP 200."""
    status, frames = await stream(client, body)
    assert status == 200
    return frames


def only_error(frames: list[dict[str, Any]], code: int, *words: str) -> dict[str, Any]:
    """The last frame is the one error frame, naming every word; no other frame has an error."""
    assert [f["error_code"] for f in frames[:-1]] == [0] * (len(frames) - 1)
    last = frames[-1]
    assert last["error_code"] == code, last
    for word in words:
        assert word in last["text"], (word, last["text"])
    return last


async def assert_slot_freed(fake: FakeWorker) -> None:
    """The worker saw the adapter leave, and its queue is empty again."""
    await fake.wait_for_disconnects(1)
    async with connect(fake.url) as worker:
        await wait_for_queue_length(worker, 0)


def upstream_paths(requests: list[Any]) -> list[str]:
    """The paths of a fake worker's recorded requests, status polls left out."""
    return [r.path for r in requests if r.path != "/worker_get_status"]


async def status_is(client: httpx.AsyncClient, path: str, status: int) -> bool:
    """Whether ``GET path`` answers ``status`` (an async predicate for ``eventually``)."""
    return (await client.get(path)).status_code == status


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """The JSON log lines written to ``stream`` (the ``json_log`` fixture)."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- metrics --------------------------------------------------------------------------------


def sample(runtime: Runtime, name: str, **labels: str) -> float:
    """A sample of the runtime's own metrics registry; 0 if it was never recorded."""
    value = runtime.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The sample ``name{labels}`` (exactly those labels) of a ``/metrics`` page, or None."""
    wanted = frozenset(labels.items())
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and frozenset(s.labels.items()) == wanted:
                return float(s.value)
    return None


# --- waiting --------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = "condition"
) -> float:
    """Wait until ``check()`` (a plain or an async predicate) holds; return the monotonic time
    it was first seen to. ``timeout`` is a hang guard, not a claim. A plain check runs in the
    loop: keep it cheap and non-blocking (see ``until_listed`` for the controller)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


async def within(seconds: float, awaitable: Awaitable[T], what: str) -> T:
    """Await ``awaitable``, failing with a message if it still runs after ``seconds``: a hang
    guard, not a measurement."""
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise AssertionError(f"{what}: still running after {seconds} s") from None


# --- a DB-GPT controller's view ----------------------------------------------------------------

REGISTER: Final = ("POST", "/api/controller/models")
HEARTBEAT: Final = ("POST", "/api/controller/heartbeat")
DELETE: Final = ("DELETE", "/api/controller/models")


def instance_body(key: str, port: int, host: str = "127.0.0.1") -> dict[str, Any]:
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


def hard_delete_query(key: str, port: int) -> str:
    name = key.replace("@", "%40")
    return f"model_name={name}&host=127.0.0.1&port={port}&remove_from_registry=true"


def controller_calls(
    fake: FakeController, kind: tuple[str, str], key: str | None = None
) -> list[Call]:
    return fake.calls_to(*kind, model_name=key)


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


async def wait_calls(
    fake: FakeController, kind: tuple[str, str], key: str, count: int, timeout: float = 5.0
) -> list[Call]:
    """Wait until the controller got at least ``count`` calls of ``kind`` for ``key``."""
    await eventually(
        lambda: len(controller_calls(fake, kind, key)) >= count,
        timeout,
        f"{count} x {kind} {key}",
    )
    return controller_calls(fake, kind, key)
