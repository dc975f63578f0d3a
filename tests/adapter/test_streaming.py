"""``adapter/streaming.py``: the downstream half of a stream, through the real app on loopback.

No buffering (each upstream frame goes out before the next is read), keep-alive frames while
nothing else is sent, and a client that leaves: the producer is cancelled at once and the
upstream connection closed, so the FastChat worker frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from adapter import streaming
from adapter.tools.reference_worker import ReferenceWorkerConfig
from adapter.tools.reference_worker import create_app as reference_app
from adapter.tracking import Outcome
from tests.adapter.helpers import (
    MODEL,
    STREAM,
    UPSTREAM_STREAM,
    StartFake,
    assert_slot_freed,
    chat,
    eventually,
    serving,
    settings_for,
    split,
    timed_pieces,
    within,
)
from tests.support.servers import LoopbackServer
from tests.support.worker_client import wait_for_queue_length


class Gate:
    """A worker whose ``/worker_generate_stream`` body goes out one message at a time, each
    only once the test has called ``open()``: a frame the adapter holds back can then never
    be followed by the next one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._turns = threading.Semaphore(0)

    def open(self) -> None:
        self._turns.release()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("path") != UPSTREAM_STREAM:
            await self.app(scope, receive, send)
            return

        async def gated(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                # Bounded, so a failing test cannot leave the worker's thread blocked for good.
                await asyncio.to_thread(self._turns.acquire, True, 10.0)
            await send(message)

        await self.app(scope, receive, gated)


async def test_each_upstream_frame_is_relayed_at_once(
    serve_app: Callable[..., LoopbackServer],
) -> None:
    gate = Gate(reference_app(ReferenceWorkerConfig(stream_interval=1)))
    worker = serve_app(gate)
    async with (
        serving(settings_for(worker.url)) as adapter,
        adapter.client.stream("POST", STREAM, json=chat(max_new_tokens=6)) as reply,
    ):
        raw = reply.aiter_raw()
        pending = b""

        async def next_piece() -> bytes:
            nonlocal pending
            while b"\0" not in pending:
                pending += await anext(raw)
            piece, pending = pending.split(b"\0", 1)
            return piece

        # One downstream frame per upstream chunk (6 tokens, then the finish chunk), each
        # while the worker still holds back the next: a buffered frame would never come.
        pieces = []
        for number in range(1, 8):
            gate.open()
            what = f"downstream frame {number} while the worker holds chunk {number + 1}"
            pieces.append(await within(5.0, next_piece(), what))
        rest = [data async for data in raw]
    assert pending == b"" and rest == []
    frames, keepalives = split(b"".join(piece + b"\0" for piece in pieces))
    assert keepalives == 0 and len(frames) == 7
    assert frames[-1]["finish_reason"] == "length"


async def test_concurrent_slow_streams_each_get_their_keepalives(fake_worker: StartFake) -> None:
    # One timer serves every open stream (streaming._KeepaliveClock): each still gets its own.
    fake = fake_worker(ReferenceWorkerConfig(first_token_delay=0.6))
    interval = 0.1
    async with serving(settings_for(fake.url, keepalive_interval=interval)) as adapter:
        both = await asyncio.gather(
            *(timed_pieces(adapter.client, chat(max_new_tokens=2)) for _ in range(2))
        )
    for pieces in both:
        first_frame = next(i for i, (_, piece) in enumerate(pieces) if piece)
        assert first_frame >= 3, pieces  # keep-alives (b"") before the first token
        frames = split(b"".join(piece + b"\0" for _, piece in pieces))[0]
        assert frames[-1]["finish_reason"] == "length"


async def test_keepalive_frames_while_the_first_token_is_slow(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(first_token_delay=0.6))
    interval = 0.1
    async with serving(settings_for(fake.url, keepalive_interval=interval)) as adapter:
        pieces = await timed_pieces(adapter.client, chat(max_new_tokens=2))
    first_frame = next(i for i, (_, piece) in enumerate(pieces) if piece)
    keepalives = [t for t, piece in pieces[:first_frame]]
    assert all(not piece for _, piece in pieces[:first_frame])
    # At most one per interval of silence: however late the first token came (a loaded
    # machine), no more keep-alives than intervals before it.
    first_frame_at = pieces[first_frame][0]
    assert 3 <= len(keepalives) <= first_frame_at / interval + 1, (keepalives, first_frame_at)
    assert all(piece for _, piece in pieces[first_frame:])  # none once tokens flow
    frames = split(b"".join(piece + b"\0" for _, piece in pieces))[0]
    assert frames[-1]["finish_reason"] == "length"


# --- disconnects: the worker's slot is freed at once --------------------------------------


async def test_client_leaving_mid_stream_closes_the_upstream(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(tokens_per_second=10))
    async with serving(settings_for(fake.url)) as adapter:
        async with adapter.client.stream("POST", STREAM, json=chat(max_new_tokens=200)) as reply:
            async for data in reply.aiter_raw():
                assert b"\0" in data
                break
        await assert_slot_freed(fake)
        await eventually(lambda: adapter.runtime.inflight.count == 0, what="drained")
        labels = {"route": "generate_stream", "model_name": MODEL, "outcome": "client_gone"}
        assert adapter.sample("fastchat_adapter_requests_total", **labels) == 1  # after drain


async def test_client_leaving_before_the_first_token_closes_the_upstream(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker(ReferenceWorkerConfig(first_token_delay=30))
    async with serving(settings_for(fake.url)) as adapter:
        async with adapter.client.stream("POST", STREAM, json=chat(max_new_tokens=2)):
            await eventually(lambda: bool(fake.bodies(UPSTREAM_STREAM)), what="generate")
        await assert_slot_freed(fake)
        await eventually(lambda: adapter.runtime.inflight.count == 0, what="drained")


# --- writing: chunks on the socket, HTTP/1.0, a client that does not read -------------------


async def _raw_exchange(
    adapter_server: LoopbackServer, request: bytes, *, before_reading: Callable[[], Any]
) -> tuple[bytes, bytes]:
    """Send ``request`` on a socket with a small receive buffer, await ``before_reading()``
    without reading a byte, then read to the end: (head, body as sent)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (adapter_server.host, adapter_server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(request)
        await before_reading()
        raw = await within(30.0, reader.read(), "the whole response")
        while data := await reader.read(1 << 16):
            raw += data
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def _post(body: bytes, version: str) -> bytes:
    return (
        f"POST {STREAM} HTTP/{version}\r\nHost: adapter\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def _dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out, rest = out + rest[:size], rest[size + 2 :]


@pytest.mark.parametrize("raw_send", [True, False], ids=["chunks_on_the_socket", "asgi_send"])
async def test_a_client_that_stops_reading_gets_the_newest_frame_not_a_queue(
    fake_worker: StartFake, raw_send: bool
) -> None:
    # 300 frames of cumulative text ending near 300 KB: about 45 MB if every frame were kept
    # for a client that reads nothing. The adapter reads the worker to the end regardless (its
    # slot is freed while the client still sleeps) and keeps only the newest frame for it,
    # whether it writes on the socket itself or through ASGI messages.
    config = ReferenceWorkerConfig(stream_interval=1, script=("w" * 999,), context_length=10_000)
    fake = fake_worker(config)
    body = json.dumps(chat(max_new_tokens=300)).encode()

    async def worker_done_while_client_sleeps() -> None:
        await eventually(lambda: bool(fake.bodies(UPSTREAM_STREAM)), what="the stream started")
        async with httpx.AsyncClient(base_url=fake.url) as worker:
            await wait_for_queue_length(worker, 0, timeout=20.0)

    async with serving(settings_for(fake.url), raw_send=raw_send) as adapter:
        head, body_sent = await _raw_exchange(
            adapter.server, _post(body, "1.1"), before_reading=worker_done_while_client_sleeps
        )
    assert b"transfer-encoding: chunked" in head.lower()
    frames, _ = split(_dechunk(body_sent))
    texts = [frame["text"] for frame in frames]
    assert frames[-1]["finish_reason"] == "length"
    assert len(texts[-1].split()) == 300  # the whole answer
    assert all(texts[-1].startswith(text) for text in texts)
    assert len(frames) < 100  # intermediate states dropped, not queued


async def test_an_http_1_0_client_gets_the_same_frames_unchunked(
    fake_worker: StartFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under uvicorn's h11 cycle an HTTP/1.1 stream is written on the socket as chunks; an
    # HTTP/1.0 one (no chunked encoding) goes through ASGI messages: the same frames.
    direct: list[bool] = []
    real = streaming._chunked_transport

    def recorded(send: Any) -> Any:
        transport = real(send)
        direct.append(transport is not None)
        return transport

    monkeypatch.setattr(streaming, "_chunked_transport", recorded)
    fake = fake_worker()
    body = json.dumps(chat(max_new_tokens=12)).encode()

    async def nothing() -> None:
        pass

    async with serving(settings_for(fake.url)) as adapter:
        head10, body10 = await _raw_exchange(
            adapter.server, _post(body, "1.0"), before_reading=nothing
        )
        head11, body11 = await _raw_exchange(
            adapter.server, _post(body, "1.1"), before_reading=nothing
        )
    assert direct == [False, True]
    assert head10.startswith(b"HTTP/1.1 200") and b"chunked" not in head10.lower()
    assert b"transfer-encoding: chunked" in head11.lower()
    assert body10 == _dechunk(body11)
    frames, _ = split(body10)
    assert len(frames) > 2 and frames[-1]["finish_reason"] == "length"


async def test_frames_superseded_while_kept_are_reported_never_sent() -> None:
    # An ASGI server without a socket to write on (this one's send only records): written
    # data waits for the flusher, and newer data written meanwhile supersedes it.
    sent: list[bytes] = []

    async def send(message: Message) -> None:
        sent.append(message.get("body", b""))

    writer = streaming.Downstream(send)
    assert writer.write(b"a\0", 1) == 0  # kept for the flusher: the client is now behind
    assert writer.lagging
    assert writer.write(b"b\0c\0", 2) == 1  # supersedes "a", sent never
    assert writer.write(b"d\0", 1) == 2
    await writer.flush()
    assert sent == [b"d\0"]
    assert writer.write(b"e\0", 1) == 0
    await writer.flush()
    assert sent == [b"d\0", b"e\0"]
    await writer.close()


# --- the response head: after the producer's first step, or with its first chunk -----------


class _Writes:
    """What uvicorn's protocol uses of a transport, in memory; each write kept apart."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, bytes]] = []
        self.closed = False

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 9) if name in ("sockname", "peername") else None

    def write(self, data: bytes) -> None:
        self.writes.append((time.monotonic(), data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _one_frame_stream(
    first_frame_after: float | None,
    *,
    last: bool = True,
    request_headers: bytes = b"",
    writes_at_first_step: list[int] | None = None,
) -> tuple[float, _Writes]:
    """A FrameStreamResponse writing one frame after ``first_frame_after`` s (None: without
    waiting at all; ``last``: the stream's last), then a keep-alive, served by uvicorn's
    httptools protocol on an in-memory transport: when the request was fed, and the transport
    with every write of the answer. ``writes_at_first_step`` gets how many writes the
    transport had when the producer started."""
    sock = _Writes()

    async def producer(writer: streaming.Downstream) -> Outcome:
        if writes_at_first_step is not None:
            writes_at_first_step.append(len(sock.writes))
        if first_frame_after is not None:
            await asyncio.sleep(first_frame_after)
        writer.write(b'{"a":1}\0', 1, last=last)
        writer.write(streaming.KEEPALIVE)  # dropped after the last frame
        return "ok"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await receive()
            respond = streaming.FrameStreamResponse(
                producer, keepalive_interval=60, on_done=lambda outcome: None
            )
            await respond(scope, receive, send)

    config = uvicorn.Config(streaming.expose_raw_send(app), log_config=None)
    config.load()
    protocol = HttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(cast(asyncio.Transport, sock))
    fed = time.monotonic()
    protocol.data_received(
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n" + request_headers + b"\r\n"
    )
    await eventually(lambda: bool(sock.writes) and sock.writes[-1][1].endswith(b"0\r\n\r\n"))
    await asyncio.sleep(0.05)  # anything written after the end would be here now
    closed_by_the_server = sock.closed
    protocol.connection_lost(None)
    sock.closed = closed_by_the_server
    return fed, sock


FRAME_CHUNK = b"8\r\n" + b'{"a":1}\0' + b"\r\n"


async def test_an_answer_made_without_waiting_is_one_write() -> None:
    _, sock = await _one_frame_stream(None)  # e.g. a request refused before any upstream call
    [(_, answer)] = sock.writes  # head, the frame's chunk, the body's end: one system call
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked" in head
    assert body == FRAME_CHUNK + b"0\r\n\r\n"
    assert not sock.closed  # kept alive


async def test_a_frame_not_the_last_goes_with_the_head_and_the_end_after() -> None:
    _, sock = await _one_frame_stream(None, last=False)
    (_, first), *rest = sock.writes
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert first.endswith(b"\r\n\r\n" + FRAME_CHUNK)
    assert b"".join(data for _, data in rest) == b"1\r\n\0\r\n0\r\n\r\n"  # keep-alive, end


@pytest.mark.parametrize("first_frame_after", [0.0, 0.3])
async def test_the_head_goes_out_once_the_producer_waits_after_its_first_step(
    first_frame_after: float,
) -> None:
    # The producer's first step (the upstream request) comes before the head's write, and the
    # head does not wait for the first frame: the client has it while the worker works.
    writes_at_first_step: list[int] = []
    fed, sock = await _one_frame_stream(
        first_frame_after, writes_at_first_step=writes_at_first_step
    )
    assert writes_at_first_step == [0]
    [(at, head), (_, rest)] = sock.writes
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert at - fed < 0.15  # not at the first frame
    assert rest == FRAME_CHUNK + b"0\r\n\r\n"


async def test_a_connection_not_kept_alive_closes_after_the_answer() -> None:
    _, sock = await _one_frame_stream(None, request_headers=b"connection: close\r\n")
    [(_, answer)] = sock.writes
    assert answer.endswith(b"connection: close\r\ntransfer-encoding: chunked\r\n\r\n"
                           + FRAME_CHUNK + b"0\r\n\r\n")  # fmt: skip
    assert sock.closed
