"""adapter/stream_reader.py against a loopback server that writes scripted bytes: framing of the
body (chunked, sized, to the end), the request it sends, and each failure's reason."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import cast

import pytest

from adapter import stream_reader
from adapter.errors import UpstreamError
from adapter.stream_reader import StreamFailure, StreamPool, open_stream
from adapter.turns import ADMIT_PER_TURN, TURN_SLICE, FairShare
from adapter.upstream import FastChatClient, make_http_client
from protocol.fastchat import GenerationParams

HEAD_CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"

Script = Sequence[bytes | float]  # bytes to write, or a pause (s); the socket closes at the end


@asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server answering every connection with ``script``; yields its URL and the requests."""
    received: list[bytes] = []
    answering: list[asyncio.Task[None]] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        received.append(head + await reader.readexactly(length))
        for step in script:
            if isinstance(step, float):
                await asyncio.sleep(step)
            else:
                writer.write(step)
                await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answering.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await answer(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(track, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.close()
        await asyncio.wait_for(asyncio.gather(*answering, return_exceptions=True), 5)


async def body_of(script: Script, idle: float = 5.0) -> list[bytes]:
    async with scripted(script) as (url, _):
        response = await open_stream(url + "/s", b"{}", connect_timeout=5, idle_timeout=idle)
        try:
            return [piece async for piece in response.pieces()]
        finally:
            response.close()


async def test_a_read_holding_several_chunks_is_one_piece() -> None:
    pieces = await body_of(
        [HEAD_CHUNKED + b"3\r\nab\0\r\n3\r\ncd\0\r\n", 0.05, b"2\r\ne\0\r\n0\r\n\r\n"]
    )
    assert pieces == [b"ab\0cd\0", b"e\0"]


async def test_a_chunk_split_across_reads_waits_for_its_end() -> None:
    pieces = await body_of([HEAD_CHUNKED + b"6\r\nabc", 0.05, b"de\0\r\n0\r\n\r\n"])
    assert b"".join(pieces) == b"abcde\0"


async def test_sized_and_read_to_the_end_bodies() -> None:
    sized = await body_of([b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nab", 0.05, b"\0extra"])
    assert b"".join(sized) == b"ab\0"
    to_end = await body_of([b"HTTP/1.1 200 OK\r\n\r\nab\0", 0.05, b"cd\0"])
    assert b"".join(to_end) == b"ab\0cd\0"


async def test_the_request_is_one_post_on_a_closing_connection() -> None:
    async with scripted([HEAD_CHUNKED + b"0\r\n\r\n"]) as (url, received):
        body = json.dumps({"prompt": "h\u00e9"}).encode()
        response = await open_stream(
            url + "/worker_generate_stream", body, connect_timeout=5, idle_timeout=5
        )
        assert [p async for p in response.pieces()] == []
        response.close()
    head, _, sent = received[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /worker_generate_stream HTTP/1.1"
    assert {
        "Connection: close",
        f"Content-Length: {len(body)}",
        "Content-Type: application/json",
    } <= set(lines)
    assert sent == body


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ([HEAD_CHUNKED + b"5\r\nab"], "broken_stream"),  # closed inside a chunk
        ([HEAD_CHUNKED + b"zz\r\n"], "broken_stream"),  # not a chunk size
        ([b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nab"], "broken_stream"),
        ([HEAD_CHUNKED + b"3\r\nab\0\r\n", 2.0], "idle_timeout"),
        ([], "broken_stream"),  # closed before any response
    ],
    ids=["cut_chunk", "bad_size", "short_sized", "idle", "no_response"],
)
async def test_failures_name_their_reason(script: Script, reason: str) -> None:
    with pytest.raises(StreamFailure) as failure:
        await body_of(script, idle=0.3)
    assert failure.value.reason == reason


async def test_a_closed_port_is_unreachable() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(StreamFailure) as failure:
        await open_stream(f"http://127.0.0.1:{port}/s", b"{}", connect_timeout=2, idle_timeout=2)
    assert failure.value.reason == "unreachable"


async def test_the_client_reports_a_status_with_the_start_of_the_body() -> None:
    script = [b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy"]
    async with scripted(script) as (url, _), make_http_client(2.0) as http:
        client = FastChatClient(http, idle_timeout=2.0)
        params = GenerationParams(model="m", prompt="hi", max_new_tokens=4)
        with pytest.raises(UpstreamError) as failure:
            async with client.generate_stream(url, params):
                pass
    assert failure.value.reason == "http_status" and "HTTP 503: busy" in str(failure.value)


# --- keep-alive: the pool of stream connections --------------------------------------------

OK_CHUNKED = HEAD_CHUNKED + b"3\r\nab\0\r\n0\r\n\r\n"


@asynccontextmanager
async def keeping(answers: Sequence[bytes | None]) -> AsyncIterator[tuple[str, list[int]]]:
    """A keep-alive server: the n-th request (on whatever connection) gets ``answers[n]``, or
    its connection closed unanswered for None. Yields its URL and, per request, the number of
    the connection it came on."""
    seen: list[int] = []
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                answer = answers[len(seen)]
                seen.append(number)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()


async def stream_once(url: str, pool: StreamPool) -> bytes:
    response = await open_stream(url + "/s", b"{}", connect_timeout=5, idle_timeout=5, pool=pool)
    try:
        return b"".join([piece async for piece in response.pieces()])
    finally:
        response.close()


async def test_a_cleanly_ended_stream_leaves_its_connection_for_the_next() -> None:
    pool = StreamPool()
    sized = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nab\0"
    async with keeping([OK_CHUNKED, sized, OK_CHUNKED]) as (url, seen):
        assert [await stream_once(url, pool) for _ in range(3)] == [b"ab\0"] * 3
    pool.close()
    assert seen == [1, 1, 1]


async def test_the_pooled_request_does_not_ask_to_close() -> None:
    received: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(OK_CHUNKED)
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = StreamPool()
    assert await stream_once(url, pool) == b"ab\0"
    pool.close()
    server.close()
    assert b"connection:" not in received[0].lower()


@pytest.mark.parametrize(
    "first",
    [
        HEAD_CHUNKED.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n") + b"0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nab\0",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nab\0",  # a byte past the body
        OK_CHUNKED + b"X",  # a byte past the last chunk
        HEAD_CHUNKED + b"0\r\nx-trailer: 1\r\n\r\n",  # trailers are not read: not in step
    ],
    ids=["connection_close", "http_1_0", "past_sized", "past_chunked", "trailers"],
)
async def test_a_connection_not_known_to_be_in_step_is_not_reused(first: bytes) -> None:
    pool = StreamPool()
    async with keeping([first, OK_CHUNKED]) as (url, seen):
        await stream_once(url, pool)
        assert await stream_once(url, pool) == b"ab\0"
    pool.close()
    assert seen == [1, 2]


async def test_a_stream_closed_before_its_end_closes_its_connection() -> None:
    pool = StreamPool()
    unfinished = HEAD_CHUNKED + b"3\r\nab\0\r\n"  # the worker is still generating
    async with keeping([unfinished, OK_CHUNKED]) as (url, seen):
        response = await open_stream(
            url + "/s", b"{}", connect_timeout=5, idle_timeout=5, pool=pool
        )
        response.close()  # a client gone: the worker must see the connection close
        assert await stream_once(url, pool) == b"ab\0"
    pool.close()
    assert seen == [1, 2]


async def test_a_pooled_connection_closed_by_the_worker_is_retried_on_a_fresh_one() -> None:
    pool = StreamPool()
    # The second request finds its pooled connection closed, unanswered (uvicorn's keep-alive
    # timeout firing just then): it is sent again on a new connection, once.
    async with keeping([OK_CHUNKED, None, OK_CHUNKED]) as (url, seen):
        assert await stream_once(url, pool) == b"ab\0"
        assert await stream_once(url, pool) == b"ab\0"
    pool.close()
    assert seen == [1, 1, 2]


async def test_a_fresh_connection_closed_unanswered_is_a_failure_not_a_retry() -> None:
    pool = StreamPool()
    async with keeping([None, OK_CHUNKED]) as (url, seen):
        with pytest.raises(StreamFailure) as failure:
            await stream_once(url, pool)
    pool.close()
    assert failure.value.reason == "broken_stream" and seen == [1]


async def test_a_connection_idle_too_long_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_reader, "KEEP_IDLE", 0.05)
    pool = StreamPool()
    async with keeping([OK_CHUNKED, OK_CHUNKED]) as (url, seen):
        await stream_once(url, pool)
        await asyncio.sleep(0.1)
        await stream_once(url, pool)
    pool.close()
    assert seen == [1, 2]


# --- FairShare: the streams of one loop turn share a slice ---------------------------------


class _Transport:
    def __init__(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def test_stream_reads_past_the_turns_slice_wait_for_a_later_turn() -> None:
    loop = _Turns()
    share = FairShare(cast(asyncio.AbstractEventLoop, loop))
    first, second, third = _Transport(), _Transport(), _Transport()
    share.spend(TURN_SLICE / 2, first)  # within the slice: keeps reading
    share.spend(TURN_SLICE, second)  # spends it: waits
    share.spend(TURN_SLICE / 2, third)  # nothing left this turn: waits too
    starting = _Transport()
    share.spend(TURN_SLICE, starting, first=True)  # before its first frame: never held back
    assert (first.reading, second.reading, third.reading) == (True, False, False)
    assert starting.reading
    loop.turn()  # those that waited resume in order, as many as their reads fit in a slice
    assert second.reading and not third.reading
    loop.turn()
    assert third.reading
    share.spend(TURN_SLICE / 2, first)
    assert first.reading


class _Turns:
    """A loop whose turns the test runs: ``call_soon`` queues for the next ``turn()``."""

    def __init__(self) -> None:
        self.ready: list[Callable[[], None]] = []

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.ready.append(callback)

    def turn(self) -> None:
        ready, self.ready = self.ready, []
        for callback in ready:
            callback()


def test_new_requests_start_a_few_a_turn_in_arrival_order() -> None:
    loop = _Turns()
    share = FairShare(cast(asyncio.AbstractEventLoop, loop))
    started: list[int] = []
    for _ in range(ADMIT_PER_TURN):  # nothing waiting: at once
        assert share.admit(lambda: None)
    for number in range(2 * ADMIT_PER_TURN):  # this turn's starts are taken: they wait
        assert not share.admit(lambda number=number: started.append(number))
    loop.turn()
    assert started == list(range(ADMIT_PER_TURN))
    assert not share.admit(lambda: started.append(-1))  # behind those still waiting
    loop.turn()
    assert started == list(range(2 * ADMIT_PER_TURN))
    loop.turn()
    assert started[-1] == -1
    loop.turn()
    assert share.admit(lambda: None)  # a quiet turn went by: at once again


def test_under_streams_that_use_their_whole_slice_the_waiting_requests_all_start() -> None:
    loop = _Turns()
    share = FairShare(cast(asyncio.AbstractEventLoop, loop))
    started: list[int] = []
    for _ in range(ADMIT_PER_TURN):
        share.admit(lambda: None)
    for number in range(5 * ADMIT_PER_TURN):
        share.admit(lambda number=number: started.append(number))
    share.spend(TURN_SLICE * 2, cast(asyncio.Transport, _Transport()))  # a saturated turn
    loop.turn()
    assert started == list(range(5 * ADMIT_PER_TURN))  # ordering would only delay them


async def test_a_stream_connection_reads_in_small_pieces() -> None:
    # A worker far ahead of us must not hand one read's callback hundreds of KiB of frames.
    async with keeping([OK_CHUNKED]) as (url, _):
        pool = StreamPool()
        response = await open_stream(
            url + "/s", b"{}", connect_timeout=5, idle_timeout=5, pool=pool
        )
        transport = response._connection.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        response.close()
        pool.close()
    assert size <= 2 * stream_reader.RECEIVE_BUFFER  # Linux reports twice what was set
