"""A lean HTTP/1.1 client for the one hot upstream call: ``/worker_generate_stream``.

httpx hands a streamed body over one HTTP chunk at a time, through six layers of async
generators, and a FastChat worker writes one chunk per frame: that path cost about a quarter of
the adapter's CPU per relayed frame (py-spy, bench/relay.py). Here the response is read by an
``asyncio.Protocol``: each socket read is de-chunked and handed, in the event loop's own
callback, to the consumer (``consume``), which relays it downstream before returning. No task
wakes up per frame and no coroutine is resumed; a worker that is ahead of us costs one pass for
the many frames one read holds (and ``adapter/relay.py`` sends them in one write).

It speaks just what a worker's answer needs: one POST on a fresh connection
(``Connection: close``, so a cancelled stream closes the socket and the worker frees its slot at
once), a status line, headers, and a body that is chunked, sized or read to the end. Everything
else (status polls, templates, counts) stays on the pooled httpx client. Failures raise
``StreamFailure`` with the reason ``adapter/upstream.py`` reports (docs/protocol.md §9.4).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from typing import ClassVar, Final, cast
from urllib.parse import urlsplit

__all__ = ["StreamFailure", "UpstreamStream", "open_stream"]

MAX_HEAD: Final = 64 * 1024
TURN_SLICE: Final = 0.004
"""Seconds of relaying the open streams may take in one turn of the event loop (see
``FairShare``)."""

Consumer = Callable[[bytes], None]
"""Called with the de-chunked bytes of each socket read; a raise ends the stream with it."""


class StreamFailure(Exception):
    """``reason`` is one of ``unreachable``, ``idle_timeout``, ``broken_stream``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class FairShare:
    """Relaying never starves new requests. A turn of the event loop runs every callback that
    is ready, the read of every open stream included; under full load those reads (each may
    hold many frames) would make every turn long, and a new request, which needs a handful of
    turns (accept, read, prepare, connect, first frame), would wait that many long turns. So
    the streams of one turn share ``TURN_SLICE``: a stream read once it is spent stops reading
    until the next turn (its data waits in the socket), which starts with the callbacks that
    were waiting, new requests' included. With no new request, the streams still get all the
    time there is, a slice at a time. One per event loop."""

    _shares: ClassVar[dict[asyncio.AbstractEventLoop, FairShare]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._spent = 0.0
        self._turn_open = False
        self._waiting: list[asyncio.Transport] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> FairShare:
        share = cls._shares.get(loop)
        if share is None:
            share = cls._shares[loop] = cls(loop)
        return share

    def spend(self, seconds: float, transport: asyncio.Transport) -> None:
        """A stream read took ``seconds``; past the turn's slice its transport waits."""
        if not self._turn_open:  # the first read of this turn: the next one resets the slice
            self._turn_open = True
            self._loop.call_soon(self._next_turn)
        self._spent += seconds
        if self._spent > TURN_SLICE and not transport.is_closing():
            transport.pause_reading()
            self._waiting.append(transport)

    def _next_turn(self) -> None:
        self._spent, self._turn_open = 0.0, False
        waiting, self._waiting = self._waiting, []
        if not waiting:  # a quiet turn: forget this loop until its next stream read
            self._shares.pop(self._loop, None)
        for transport in waiting:
            if not transport.is_closing():
                transport.resume_reading()


class UpstreamStream(asyncio.Protocol):
    """One response: ``await head()`` (then ``status``), ``consume(callback)`` for the body,
    ``await finished()`` until it ends; ``close()`` at any time (never awaited)."""

    def __init__(self, request: bytes, idle_timeout: float) -> None:
        self._request = request
        self._idle = idle_timeout
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.status = 0
        self._head_done = False
        self._chunked = False
        self._left: int | None = None  # sized body: bytes still due; None: chunked or to EOF
        self._buffer = bytearray()  # head, then an incomplete chunk
        self._consumer: Consumer | None = None
        self._early: list[bytes] = []  # body read before a consumer was set
        self._ended = False  # the body is complete
        self._error: BaseException | None = None
        self._released = False  # the consumer has all it needs: the rest is dropped
        self._grace: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None
        # The idle timeout: one timer per stream that fires at most once per idle_timeout and
        # checks when data last came (a timeout context per read costs a timer every frame).
        self._last_data = self._loop.time()
        self._watchdog: asyncio.TimerHandle | None = None

    # --- what the caller uses -------------------------------------------------------------
    async def head(self) -> None:
        """Wait for the status line and headers."""
        await self._wait(lambda: self._head_done)

    def consume(self, consumer: Consumer) -> None:
        """Hand every body piece to ``consumer`` from now on (the pieces already read first)."""
        self._consumer = consumer
        early, self._early = self._early, []
        for piece in early:
            if not self._deliver(piece):
                return

    async def finished(self) -> None:
        """Wait until the body is complete; raise the failure (or the consumer's raise)."""
        await self._wait(lambda: self._ended)

    def release(self, grace: float) -> None:
        """The consumer has what it needs: what follows is read and dropped, failures are no
        longer failures, and the stream counts as finished when the body ends or, at the
        latest, after ``grace`` seconds (the connection is closed then)."""
        self._released = True
        self._consumer = self._drop
        self._early.clear()
        if not self._ended and self._error is None:
            self._grace = self._loop.call_later(grace, self._end)

    @property
    def released(self) -> bool:
        return self._released

    async def pieces(self) -> AsyncGenerator[bytes, None]:
        """The body, a piece per socket read, until it ends (for bodies that are not relayed:
        an error's text, tests)."""
        queue: list[bytes] = []

        def take(piece: bytes) -> None:
            queue.append(piece)
            self._wake()

        self.consume(take)
        while True:
            if queue:
                yield b"".join(queue)
                queue.clear()
                continue
            if self._ended or self._error is not None:
                break
            await self._wait(lambda: bool(queue) or self._ended)
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        for timer in (self._watchdog, self._grace):
            if timer is not None:
                timer.cancel()
        self._watchdog = self._grace = None
        if self._transport is not None:
            self._transport.close()  # not awaited: the transport closes in the background

    # --- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport.write(self._request)
        self._last_data = self._loop.time()
        self._watchdog = self._loop.call_later(self._idle, self._check_idle)

    def data_received(self, data: bytes) -> None:
        started = time.perf_counter()
        self._receive(data)
        if self._transport is not None:
            FairShare.of(self._loop).spend(time.perf_counter() - started, self._transport)

    def _receive(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        if self._error is not None or self._ended:
            return
        if not self._head_done:
            self._buffer += data
            try:
                if not self._parse_head():
                    return
            except StreamFailure as exc:
                self._fail(exc)
                return
            data = bytes(self._buffer)
            self._buffer.clear()
            self._wake()
            if not data:
                return
        try:
            piece = self._dechunk(data) if self._chunked else self._sized(data)
        except StreamFailure as exc:
            self._fail(exc)
            return
        if piece and not self._deliver(piece):
            return
        if self._ended:
            self._end()

    def eof_received(self) -> bool | None:
        self._end_of_input(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._end_of_input(exc)

    # --- internals ------------------------------------------------------------------------
    def _deliver(self, piece: bytes) -> bool:
        """Hand ``piece`` on; False if the consumer raised (the stream has failed with it)."""
        if self._consumer is None:
            self._early.append(piece)
            return True
        try:
            self._consumer(piece)
        except Exception as exc:  # handed to whoever awaits the stream (finished)
            self._fail(exc)
            return False
        return True

    def _end_of_input(self, exc: Exception | None) -> None:
        if self._ended or self._error is not None:
            return
        if exc is not None:
            self._fail(StreamFailure("broken_stream", str(exc) or type(exc).__name__))
        elif not self._head_done:
            self._fail(StreamFailure("broken_stream", "Server disconnected without a response"))
        elif self._chunked:
            self._fail(
                StreamFailure(
                    "broken_stream",
                    "peer closed connection without sending "
                    "complete message body (incomplete chunked read)",
                )
            )
        elif self._left:
            self._fail(
                StreamFailure(
                    "broken_stream", "peer closed connection without sending complete message body"
                )
            )
        else:  # read to the end: the end of input is the end of the body
            self._end()

    def _fail(self, error: BaseException) -> None:
        if self._released:
            self._end()
            return
        if self._error is None and not self._ended:
            self._error = error
        self._wake()
        self.close()

    def _end(self) -> None:
        self._ended = True
        self._wake()
        self.close()

    @staticmethod
    def _drop(piece: bytes) -> None:
        pass

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, ready: Callable[[], bool]) -> None:
        while not ready():
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._error is not None and not self._ended:
            raise self._error

    def _check_idle(self) -> None:
        self._watchdog = None
        if self._ended or self._error is not None:
            return
        waited = self._loop.time() - self._last_data
        if waited >= self._idle:
            self._fail(StreamFailure("idle_timeout", f"no data for {self._idle:g} s"))
        else:
            self._watchdog = self._loop.call_later(self._idle - waited, self._check_idle)

    def _parse_head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                raise StreamFailure("broken_stream", "response head too long")
            return False
        head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        del self._buffer[: end + 4]
        try:
            self.status = int(head[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise StreamFailure("broken_stream", f"bad status line: {head[0][:80]!r}") from None
        for line in head[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "transfer-encoding" and "chunked" in value:
                self._chunked = True
            elif name == "content-length" and value.isdigit():
                self._left = int(value)
        if self._chunked:
            self._left = None
        self._head_done = True
        return True

    def _sized(self, data: bytes) -> bytes:
        if self._left is None:  # read to the end of input
            return data
        data = data[: self._left]
        self._left -= len(data)
        if not self._left:
            self._ended = True
        return data

    def _dechunk(self, data: bytes) -> bytes:
        """The payload of every chunk completed by ``data``; an incomplete one waits."""
        # The common case, a read of whole chunks, slices ``data`` itself: no copy.
        buffer = bytes(self._buffer) + data if self._buffer else data
        payloads: list[bytes] = []
        position = 0
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                break
            try:
                size = int(buffer[position:line_end].split(b";", 1)[0], 16)
            except ValueError:
                raise StreamFailure("broken_stream", "malformed chunked body") from None
            if size == 0:
                self._ended = True
                position = len(buffer)  # trailers and the final CRLF are not needed
                break
            start = line_end + 2
            if len(buffer) < start + size + 2:
                break
            payloads.append(buffer[start : start + size])
            position = start + size + 2
        self._buffer = bytearray(buffer[position:]) if position < len(buffer) else bytearray()
        return b"".join(payloads)


async def open_stream(
    url: str, body: bytes, *, connect_timeout: float, idle_timeout: float
) -> UpstreamStream:
    """POST ``body`` (JSON) to ``url``; the response once its head is in. The wait for the head
    is bounded by ``idle_timeout`` (a queued or wedged worker), every later wait too."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise StreamFailure("unreachable", f"unsupported worker address: {url}")
    host, port = parts.hostname, parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = parts.netloc.rsplit("@", 1)[-1]
    request = (
        f"POST {target} HTTP/1.1\r\nHost: {authority}\r\nAccept: */*\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\nUser-Agent: fastchat-adapter\r\n\r\n".encode("latin-1")
        + body
    )
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            _, response = await loop.create_connection(
                lambda: UpstreamStream(request, idle_timeout), host, port
            )
    except TimeoutError:
        raise StreamFailure("unreachable", f"connect timeout ({connect_timeout:g} s)") from None
    except OSError as exc:
        raise StreamFailure("unreachable", str(exc) or type(exc).__name__) from exc
    try:
        await response.head()
    except BaseException:
        response.close()
        raise
    return response
