"""A lean HTTP/1.1 client for the one hot upstream call: ``/worker_generate_stream``.

httpx hands a streamed body over one HTTP chunk at a time, through six layers of async
generators, and a FastChat worker writes one chunk per frame: that path cost about a quarter of
the adapter's CPU per relayed frame (py-spy, bench/relay.py). Here the response is read by an
``asyncio.Protocol``: each socket read is de-chunked and handed, in the event loop's own
callback, to the consumer (``consume``), which relays it downstream before returning. No task
wakes up per frame and no coroutine is resumed; a worker that is ahead of us costs one pass for
the many frames one read holds (and ``adapter/relay.py`` sends them in one write).

It speaks just what a worker's answer needs: one POST, a status line, headers, and a body that
is chunked, sized or read to the end. Everything else (status polls, templates, counts) stays on
the pooled httpx client. Failures raise ``StreamFailure`` with the reason ``adapter/upstream.py``
reports (docs/protocol.md §9.4).

Connections are kept alive (``StreamPool``): a socket opened, connected and closed per request
was a tenth of the adapter's CPU for a short answer (py-spy, bench/relay.py's fixed cost). Only
a connection whose answer ended cleanly, to its last byte, goes back; a stream that ends any
other way (a client gone, a failure, a drain cut short) closes its socket, which is how a
FastChat worker learns to free its slot at once. A pooled connection the worker closed at that
very moment (uvicorn drops idle ones after 5 s; ours expire at 2 s) fails before any byte of an
answer: that one request is sent again on a fresh connection.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncGenerator, Callable
from typing import Final, cast
from urllib.parse import urlsplit

from adapter.turns import FairShare

__all__ = ["StreamFailure", "StreamPool", "UpstreamStream", "open_stream"]

MAX_HEAD: Final = 64 * 1024
KEEP_IDLE: Final = 2.0
"""Seconds a pooled connection may stay idle: below uvicorn's 5 s keep-alive timeout (a FastChat
worker's), like the httpx pool's expiry (adapter/upstream.py)."""
RECEIVE_BUFFER: Final = 32 * 1024
"""The kernel's receive buffer of a stream connection (SO_RCVBUF). A worker far ahead of us
otherwise lets hundreds of KiB pile up, and one read's callback relays them all, milliseconds
in which nothing else runs (a new request's stages included, adapter/turns.py); at 32 KiB a read
is a few hundred frames and the worker waits for us instead (TCP flow control)."""
MAX_IDLE: Final = 128
"""Idle connections kept per worker address; more are closed."""

Consumer = Callable[[bytes], None]
"""Called with the de-chunked bytes of each socket read; a raise ends the stream with it."""


class StreamFailure(Exception):
    """``reason`` is one of ``unreachable``, ``idle_timeout``, ``broken_stream``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Connection(asyncio.Protocol):
    """One socket to a worker: hands what it reads to the response in progress (``current``),
    and goes back to its pool when that response ends cleanly (``UpstreamStream``)."""

    def __init__(self, pool: StreamPool | None, key: tuple[str, int]) -> None:
        self._loop = asyncio.get_running_loop()
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.current: UpstreamStream | None = None
        self.reused = False  # it served an answer before this one
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)

    def data_received(self, data: bytes) -> None:
        response = self.current
        if response is None:  # nobody asked: a worker talking out of turn is not reused
            self.close()
            return
        first, started = not response.relaying, time.perf_counter()
        response._receive(data)
        if self.transport is not None:
            spent = time.perf_counter() - started
            FairShare.of(self._loop).spend(spent, self.transport, first=first)

    def eof_received(self) -> bool | None:
        if self.current is not None:
            self.current._end_of_input(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pool is not None:
            self.pool.forget(self)
        response, self.current = self.current, None
        if response is not None:
            response._connection_lost(exc)

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.current = None
        if self.transport is not None:
            self.transport.close()  # not awaited: the transport closes in the background


class StreamPool:
    """Idle connections to workers, the most recently used first, per address. One per client;
    ``close()`` closes what is idle."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    def take(self, key: tuple[str, int], now: float) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.usable and now - connection.idle_since < KEEP_IDLE:
                connection.reused = True
                return connection
            connection.close()
        return None

    def give(self, connection: _Connection, now: float) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= MAX_IDLE or not connection.usable:
            connection.close()
            return
        connection.idle_since = now
        if connection.transport is not None:
            connection.transport.resume_reading()  # a worker's close must be seen while idle
        idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()


class UpstreamStream:
    """One response: ``await head()`` (then ``status``), ``consume(callback)`` for the body,
    ``await finished()`` until it ends; ``close()`` at any time (never awaited)."""

    def __init__(self, connection: _Connection, request: bytes, idle_timeout: float) -> None:
        self._connection = connection
        self._idle = idle_timeout
        self._loop = connection._loop
        self.status = 0
        self._head_done = False
        self._chunked = False
        self._left: int | None = None  # sized body: bytes still due; None: chunked or to EOF
        self._reusable = False  # the connection may serve another answer once this one ends
        self._buffer = bytearray()  # head, then an incomplete chunk
        self._consumer: Consumer | None = None
        self._early: list[bytes] = []  # body read before a consumer was set
        self._ended = False  # the body is complete
        self.answered = False  # a byte of the answer came (else a reused socket may be stale)
        self.relaying = False  # a piece of the body went to the consumer
        self._error: BaseException | None = None
        self._released = False  # the consumer has all it needs: the rest is dropped
        self._grace: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None
        # The idle timeout: one timer per stream that fires at most once per idle_timeout and
        # checks when data last came (a timeout context per read costs a timer every frame).
        self._last_data = self._loop.time()
        self._watchdog: asyncio.TimerHandle | None = self._loop.call_later(
            idle_timeout, self._check_idle
        )
        connection.current = self
        if connection.transport is not None:
            connection.transport.write(request)

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
            self._grace = self._loop.call_later(grace, self._cut)

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
        """Done with this response: its connection is closed unless the answer ended cleanly
        (it is back in the pool then, possibly serving someone else already)."""
        self._stop_timers()
        if self._connection.current is self:
            self._connection.close()

    # --- from the connection --------------------------------------------------------------
    def _receive(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        self.answered = True
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
                if self._ended:  # an empty sized body
                    self._complete()
                return
        try:
            piece = self._dechunk(data) if self._chunked else self._sized(data)
        except StreamFailure as exc:
            self._fail(exc)
            return
        if piece and not self._deliver(piece):
            return
        if self._ended:
            self._complete()

    def _connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        self._end_of_input(exc)

    # --- internals ------------------------------------------------------------------------
    def _stop_timers(self) -> None:
        for timer in (self._watchdog, self._grace):
            if timer is not None:
                timer.cancel()
        self._watchdog = self._grace = None

    def _deliver(self, piece: bytes) -> bool:
        """Hand ``piece`` on; False if the consumer raised (the stream has failed with it)."""
        if self._consumer is None:
            self._early.append(piece)
            return True
        self.relaying = True
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
            self._reusable = False
            self._complete()

    def _fail(self, error: BaseException) -> None:
        if self._released:
            self._cut()
            return
        if self._error is None and not self._ended:
            self._error = error
        self._wake()
        self.close()

    def _cut(self) -> None:
        """Finished, the body unread to its end: the connection cannot serve another answer."""
        self._reusable = False
        self._complete()

    def _complete(self) -> None:
        self._ended = True
        self._wake()
        connection = self._connection
        if self._reusable and connection.current is self and connection.pool is not None:
            self._stop_timers()
            connection.current = None
            connection.pool.give(connection, self._loop.time())
        else:
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
        keep_alive = head[0].startswith("HTTP/1.1 ")
        for line in head[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "transfer-encoding" and "chunked" in value:
                self._chunked = True
            elif name == "content-length" and value.isdigit():
                self._left = int(value)
            elif name == "connection" and "close" in value:
                keep_alive = False
        if self._chunked:
            self._left = None
        # Reused only when its end is known from the body itself: a body read to the end of
        # input ends with the connection.
        self._reusable = keep_alive and (self._chunked or self._left is not None)
        self._head_done = True
        if self._left == 0:
            self._ended = True
        return True

    def _sized(self, data: bytes) -> bytes:
        if self._left is None:  # read to the end of input
            return data
        if len(data) > self._left:  # bytes past the body: the connection is not in step
            self._reusable = False
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
                # Trailers and the final CRLF are not needed; anything but that CRLF, all of it
                # in this read, leaves the connection out of step: it is not reused.
                if buffer[line_end + 2 :] != b"\r\n":
                    self._reusable = False
                position = len(buffer)
                break
            start = line_end + 2
            if len(buffer) < start + size + 2:
                break
            payloads.append(buffer[start : start + size])
            position = start + size + 2
        self._buffer = bytearray(buffer[position:]) if position < len(buffer) else bytearray()
        return b"".join(payloads)


async def open_stream(
    url: str,
    body: bytes,
    *,
    connect_timeout: float,
    idle_timeout: float,
    pool: StreamPool | None = None,
) -> UpstreamStream:
    """POST ``body`` (JSON) to ``url``; the response once its head is in. The wait for the head
    is bounded by ``idle_timeout`` (a queued or wedged worker), every later wait too. With a
    ``pool`` an idle connection is reused and a clean end gives it back; without, every stream
    has a connection of its own, closed after it."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise StreamFailure("unreachable", f"unsupported worker address: {url}")
    host, port = parts.hostname, parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = parts.netloc.rsplit("@", 1)[-1]
    closing = "" if pool is not None else "Connection: close\r\n"
    request = (
        f"POST {target} HTTP/1.1\r\nHost: {authority}\r\nAccept: */*\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{closing}"
        f"User-Agent: fastchat-adapter\r\n\r\n".encode("latin-1")
        + body
    )
    loop = asyncio.get_running_loop()
    key = (host, port)
    while True:
        connection = pool.take(key, loop.time()) if pool is not None else None
        if connection is None:
            connection = await _connect(pool, key, connect_timeout)
        response = UpstreamStream(connection, request, idle_timeout)
        try:
            await response.head()
        except StreamFailure as exc:
            response.close()
            if connection.reused and not response.answered and exc.reason == "broken_stream":
                continue  # closed by the worker while it sat in the pool: a fresh one
            raise
        except BaseException:
            response.close()
            raise
        return response


async def _connect(
    pool: StreamPool | None, key: tuple[str, int], connect_timeout: float
) -> _Connection:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            _, connection = await loop.create_connection(lambda: _Connection(pool, key), *key)
    except TimeoutError:
        raise StreamFailure("unreachable", f"connect timeout ({connect_timeout:g} s)") from None
    except OSError as exc:
        raise StreamFailure("unreachable", str(exc) or type(exc).__name__) from exc
    return connection
