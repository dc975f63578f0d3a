"""Read deadlines (adapter/connections.py) over real sockets: slow heads and bodies are closed
and counted; complete requests, keep-alive pauses and long streams are left alone."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import Iterator
from typing import cast

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from adapter.connections import MAX_HEAD, read_deadlines
from adapter.turns import ADMIT_PER_TURN
from tests.support.servers import LoopbackServer

HEAD = b"POST /echo HTTP/1.1\r\nhost: a\r\n"


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """``/echo`` answers the body it read; ``/slow`` streams five pieces over 1.5 s."""
    if scope["type"] != "http":
        return
    body = b""
    while (message := await receive())["type"] == "http.request":
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if scope["path"] == "/slow":
        for _ in range(5):
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            await asyncio.sleep(0.3)
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(params=["httptools", "h11"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[LoopbackServer, list[str]]]:
    timed_out: list[str] = []
    protocol = read_deadlines(
        head_timeout=0.5,
        body_timeout=0.5,
        body_min_rate=1000,
        on_timeout=timed_out.append,
        parser=request.param,
    )
    with LoopbackServer(app, http=protocol) as running:
        yield running, timed_out


def trickle(port: int, first: bytes, drip: bytes = b"x") -> bytes:
    """Send ``first``, then one byte of ``drip`` every 0.1 s until the server answers or closes
    (at most 20 s, a hang guard); return everything it sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        if first:
            sock.sendall(first)
        deadline = time.monotonic() + 20
        while not select.select([sock], [], [], 0.1)[0]:
            assert time.monotonic() < deadline, "the server never closed the connection"
            if drip:
                try:
                    sock.sendall(drip)
                except OSError:
                    break
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


Case = tuple[bytes, bytes, str, bool]
SLOW: dict[str, Case] = {
    "silent": (b"", b"", "head", False),  # connects, sends nothing
    "head-1-byte-at-a-time": (b"POST /echo HTTP/1.1\r\nx-h: ", b"a", "head", True),
    "declared-body-1-byte-at-a-time": (
        HEAD + b"content-length: 100000\r\n\r\n",
        b"a",
        "body",
        True,
    ),
    "stalled-huge-chunk": (
        HEAD + b"transfer-encoding: chunked\r\n\r\nffffff\r\nab",
        b"",
        "body",
        True,
    ),
}


@pytest.mark.parametrize(("first", "drip", "phase", "answered"), SLOW.values(), ids=list(SLOW))
def test_slow_requests_are_closed_and_counted(
    server: tuple[LoopbackServer, list[str]], first: bytes, drip: bytes, phase: str, answered: bool
) -> None:
    running, timed_out = server
    answer = trickle(running.port, first, drip)
    if answered:
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
        assert b"connection: close" in answer
    else:
        assert answer == b""
    assert timed_out == [phase]


def test_complete_requests_keep_alive_pauses_and_long_streams_are_untouched(
    server: tuple[LoopbackServer, list[str]],
) -> None:
    running, timed_out = server
    with httpx.Client(base_url=running.url, trust_env=False, timeout=10) as client:
        assert client.post("/echo", content=b"a" * 200_000).content == b"a" * 200_000
        time.sleep(0.8)  # a keep-alive pause longer than the head deadline
        assert client.post("/echo", content=b"b").content == b"b"
        assert client.post("/slow", content=b"c").content == b"xxxxxc"  # 1.5 s > both deadlines
    assert timed_out == []


def test_many_slow_connections_are_all_closed(
    server: tuple[LoopbackServer, list[str]],
) -> None:
    running, timed_out = server
    socks = [socket.create_connection(("127.0.0.1", running.port), timeout=20) for _ in range(50)]
    try:
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\n")  # never finished
        for sock in socks:
            assert sock.recv(65536).startswith(b"HTTP/1.1 408")
    finally:
        for sock in socks:
            sock.close()
    assert timed_out == ["head"] * 50


def test_a_head_past_the_limit_is_refused_before_it_is_held(
    server: tuple[LoopbackServer, list[str]],
) -> None:
    running, timed_out = server
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(HEAD + b"x-big: " + b"a" * (MAX_HEAD + 1024) + b"\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    # httptools: ours (llhttp has no limit); h11: its own 400 at the same size.
    httptools = issubclass(cast(type, running.http), HttpToolsProtocol)
    expected = b"HTTP/1.1 431 " if httptools else b"HTTP/1.1 400 "
    assert answer.startswith(expected), answer[:80]
    assert b"connection: close" in answer.lower()
    assert timed_out == []


def test_a_head_at_the_limit_is_served(server: tuple[LoopbackServer, list[str]]) -> None:
    running, _ = server
    with httpx.Client(base_url=running.url, trust_env=False, timeout=10) as client:
        big = "a" * (MAX_HEAD - 1024)
        assert client.post("/echo", content=b"ok", headers={"x-big": big}).content == b"ok"


def test_a_burst_of_posts_waiting_their_turn_loses_nothing(
    server: tuple[LoopbackServer, list[str]],
) -> None:
    # Under httptools, generation requests (POSTs) start one per event-loop turn
    # (adapter/turns.py): the others' bytes are held, the rest of a body arriving meanwhile too.
    running, timed_out = server
    socks = [socket.create_connection(("127.0.0.1", running.port), timeout=10) for _ in range(40)]
    try:
        for sock in socks:
            sock.sendall(HEAD + b"content-length: 6\r\n\r\nab")
        for number, sock in enumerate(socks):
            sock.sendall(b"%04d" % number)
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as probe:
            probe.sendall(b"GET /echo HTTP/1.1\r\nhost: a\r\n\r\n")
            assert probe.recv(65536).startswith(b"HTTP/1.1 200 ")
        for number, sock in enumerate(socks):
            answer = b""
            while not answer.endswith(b"0\r\n\r\n"):
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ") and b"ab%04d" % number in answer
    finally:
        for sock in socks:
            sock.close()
    assert timed_out == []


class _Socket:
    """What uvicorn's protocol uses of a transport, in memory."""

    def __init__(self) -> None:
        self.sent = b""
        self.reading = True
        self.closed = False

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 9) if name in ("sockname", "peername") else None

    def write(self, data: bytes) -> None:
        self.sent += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


async def test_a_post_waiting_its_turn_keeps_what_arrives_meanwhile() -> None:
    protocol_class = read_deadlines(
        head_timeout=5, body_timeout=5, body_min_rate=1000, on_timeout=print, parser="httptools"
    )
    config = uvicorn.Config(app, log_config=None)
    config.load()
    state = ServerState()
    socks = [_Socket() for _ in range(ADMIT_PER_TURN + 1)]
    protocols = []
    for sock in socks:
        protocol = protocol_class(config=config, server_state=state, app_state={})  # type: ignore[call-arg]
        protocol.connection_made(cast(asyncio.Transport, sock))
        protocols.append(protocol)
    # All in one turn: the first ADMIT_PER_TURN start, the last waits (its socket not read),
    # keeping its bytes and what arrives meanwhile.
    for protocol in protocols:
        protocol.data_received(HEAD + b"content-length: 6\r\n\r\nab")
    *started, last = socks
    assert all(sock.reading for sock in started) and not last.reading
    protocols[-1].data_received(b"cdef")
    for protocol in protocols[:-1]:
        protocol.data_received(b"wxyz")
    for _ in range(50):
        await asyncio.sleep(0)
        if all(sock.sent.endswith(b"0\r\n\r\n") for sock in socks):
            break
    assert all(b"\r\nabwxyz\r\n" in sock.sent for sock in started)
    assert last.reading and b"\r\nabcdef\r\n" in last.sent
    for protocol in protocols:
        protocol.connection_lost(None)
