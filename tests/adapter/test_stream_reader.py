"""adapter/stream_reader.py against a loopback server that writes scripted bytes: framing of the
body (chunked, sized, to the end), the request it sends, and each failure's reason."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest

from adapter.errors import UpstreamError
from adapter.stream_reader import TURN_SLICE, FairShare, StreamFailure, open_stream
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


async def test_stream_reads_past_the_turns_slice_wait_for_the_next_turn() -> None:
    share = FairShare.of(asyncio.get_running_loop())
    first, second, third = _Transport(), _Transport(), _Transport()
    share.spend(TURN_SLICE / 2, first)  # within the slice: keeps reading
    share.spend(TURN_SLICE, second)  # spends it: waits
    share.spend(0.0, third)  # nothing left this turn: waits too
    assert (first.reading, second.reading, third.reading) == (True, False, False)
    turn = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(turn.set_result, None)  # queued after the share's
    await turn
    assert second.reading and third.reading  # the next turn gives them a new slice
    share = FairShare.of(asyncio.get_running_loop())
    share.spend(TURN_SLICE / 2, first)
    assert first.reading
