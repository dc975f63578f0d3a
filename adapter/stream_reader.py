"""A lean HTTP/1.1 client for the one hot upstream call: ``/worker_generate_stream``.

httpx hands a streamed body over one HTTP chunk at a time, through six layers of async
generators, and a FastChat worker writes one chunk per frame: that path cost about a quarter of
the adapter's CPU per relayed frame (py-spy, bench/relay.py). Here one socket read gives the
de-chunked bytes of every chunk it holds, so a worker that is ahead of us costs one pass for many
frames (and ``adapter/relay.py`` sends them in one write).

It speaks just what a worker's answer needs: one POST on a fresh connection
(``Connection: close``, so a cancelled stream closes the socket and the worker frees its slot at
once), a status line, headers, and a body that is chunked, sized or read to the end. Everything
else (status polls, templates, counts) stays on the pooled httpx client. Failures raise
``StreamFailure`` with the reason ``adapter/upstream.py`` reports (docs/protocol.md §9.4).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, Final
from urllib.parse import urlsplit

__all__ = ["StreamFailure", "open_stream"]

MAX_HEAD: Final = 64 * 1024
READ_SIZE: Final = 64 * 1024


class StreamFailure(Exception):
    """``reason`` is one of ``unreachable``, ``idle_timeout``, ``broken_stream``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class UpstreamStream:
    """An open response: ``status``, then ``pieces()`` until the body ends; ``close()``."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle_timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._idle = idle_timeout
        self.status = 0
        self._length: int | None = None  # Content-Length, when the body is not chunked
        self._chunked = False
        self._buffer = bytearray()
        # The idle timeout: one timer per stream that fires at most once per idle_timeout and
        # cancels a read that has waited that long (a timeout context per read costs a timer
        # each time, for every frame).
        self._loop = asyncio.get_running_loop()
        self._reading: asyncio.Task[Any] | None = None
        self._read_since = 0.0
        self._timed_out = False
        self._watchdog: asyncio.TimerHandle | None = None

    async def _read(self) -> bytes:
        self._reading = asyncio.current_task()
        self._read_since = self._loop.time()
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self._idle, self._check_idle)
        try:
            return await self._reader.read(READ_SIZE)
        except asyncio.CancelledError:
            if not self._timed_out:
                raise
            self._timed_out = False
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            raise StreamFailure("idle_timeout", f"no data for {self._idle:g} s") from None
        except OSError as exc:
            raise StreamFailure("broken_stream", str(exc) or type(exc).__name__) from exc
        finally:
            self._reading = None

    def _check_idle(self) -> None:
        self._watchdog = None
        if self._reading is None:
            return  # not reading: the next read re-arms the timer
        waited = self._loop.time() - self._read_since
        if waited >= self._idle:
            self._timed_out = True
            self._reading.cancel()
        else:
            self._watchdog = self._loop.call_later(self._idle - waited, self._check_idle)

    async def _head(self) -> None:
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > MAX_HEAD:
                raise StreamFailure("broken_stream", "response head too long")
            data = await self._read()
            if not data:
                raise StreamFailure("broken_stream", "Server disconnected without a response")
            self._buffer += data
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
                self._length = int(value)

    async def pieces(self) -> AsyncGenerator[bytes, None]:
        """The body, a piece per socket read (every complete chunk it held), until it ends."""
        if not self._chunked:
            async for piece in self._plain():
                yield piece
            return
        buffer = self._buffer
        while True:
            out = bytearray()
            while True:  # every complete chunk in the buffer
                line_end = buffer.find(b"\r\n")
                if line_end < 0:
                    break
                try:
                    size = int(bytes(buffer[:line_end]).split(b";", 1)[0], 16)
                except ValueError:
                    raise StreamFailure("broken_stream", "malformed chunked body") from None
                if size == 0:
                    if out:
                        yield bytes(out)
                    return
                if len(buffer) < line_end + 2 + size + 2:
                    break
                out += buffer[line_end + 2 : line_end + 2 + size]
                del buffer[: line_end + 4 + size]
            if out:
                yield bytes(out)
            data = await self._read()
            if not data:
                raise StreamFailure(
                    "broken_stream",
                    "peer closed connection without sending "
                    "complete message body (incomplete chunked read)",
                )
            buffer += data

    async def _plain(self) -> AsyncGenerator[bytes, None]:
        left = self._length
        if self._buffer:
            piece = bytes(self._buffer if left is None else self._buffer[:left])
            self._buffer.clear()
            if left is not None:
                left -= len(piece)
            yield piece
        while left is None or left > 0:
            data = await self._read()
            if not data:
                if left:
                    raise StreamFailure(
                        "broken_stream",
                        "peer closed connection without sending complete message body",
                    )
                return
            if left is not None:
                data = data[:left]
                left -= len(data)
            yield data

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._writer.close()  # not awaited: the transport closes in the background


async def open_stream(
    url: str, body: bytes, *, connect_timeout: float, idle_timeout: float
) -> UpstreamStream:
    """POST ``body`` (JSON) to ``url``; the response once its head is in. The wait for the head
    is bounded by ``idle_timeout`` (a queued or wedged worker), every later read too."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise StreamFailure("unreachable", f"unsupported worker address: {url}")
    host, port = parts.hostname, parts.port or 80
    try:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE)
    except TimeoutError:
        raise StreamFailure("unreachable", f"connect timeout ({connect_timeout:g} s)") from None
    except OSError as exc:
        raise StreamFailure("unreachable", str(exc) or type(exc).__name__) from exc
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = parts.netloc.rsplit("@", 1)[-1]
    writer.write(
        f"POST {target} HTTP/1.1\r\nHost: {authority}\r\nAccept: */*\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\nUser-Agent: fastchat-adapter\r\n\r\n".encode("latin-1")
        + body
    )
    response = UpstreamStream(reader, writer, idle_timeout)
    try:
        await response._head()
    except BaseException:
        response.close()
        raise
    return response
