"""The downstream half of a stream: NUL frames out as they come, keep-alives, disconnects.

``FrameStreamResponse`` runs a *producer* (``relay.Relay.stream``) that calls
``Downstream.write(frames)`` as frames come, and owns what Starlette's ``StreamingResponse``
does not give:

- **No buffering.** Each ``write`` goes out before it returns, as one chunk of the response
  (``Downstream``); only a client that is not reading gets its frames held, and then only the
  newest.
- **Keep-alive.** Whenever nothing has been sent for ``keepalive_interval`` seconds (a slow
  first token, a queued request), an empty frame (a bare NUL) goes out, within half an
  interval more: one timer serves every open stream (``_KeepaliveClock``). DB-GPT's reader skips
  empty pieces (docs/protocol.md §8.4); proxies and load balancers see a live connection.
- **Disconnects.** A task waits for ``http.disconnect`` from the start. The moment it comes,
  the producer is cancelled wherever it is (preparing, waiting for the first token, or between
  frames) and its ``async with`` blocks unwind, closing the upstream connection, which is how
  a FastChat worker frees its slot. Starlette's ``StreamingResponse`` would only notice on
  ASGI 2.4 servers when a write fails, and it cancels an async generator that is not
  guaranteed to be closed promptly.
- **Going away.** When the shutdown grace is about to run out (``GoingAway``, set by
  ``adapter/server.py``), the producer is cancelled the same way, the stream gets one last
  error frame saying the worker is going away, and the body ends cleanly: a DB-GPT client
  shows that message instead of an answer silently cut short.

The response is always HTTP 200 without a Content-Type, like FastChat's and DB-GPT's own
streams: every outcome, errors included, is a frame (DB-GPT never reads the status, §6.3).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, cast

import h11
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapter.tracking import Outcome
from protocol.framing import KEEPALIVE

log = logging.getLogger("fastchat_adapter.relay")

RAW_SEND: Final = "fastchat_adapter.raw_send"
"""Scope key of the server's own ``send`` (``expose_raw_send``): body frames skip the
middleware wrappers, which only look at ``http.response.start``."""


def expose_raw_send(app: ASGIApp) -> ASGIApp:
    """Wrap the whole application (outside Starlette's error middleware) so that a stream can
    write its frames with the server's ``send`` directly: four wrapper calls less per frame."""

    async def with_raw_send(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND] = send
        await app(scope, receive, send)

    return with_raw_send


def _chunked_transport(send: Send) -> asyncio.Transport | None:
    """The socket under uvicorn's response cycle (httptools or h11) when its body is
    chunk-encoded to an HTTP/1.1 client (no Content-Length): frames can then be written there as
    chunks directly, the bytes the cycle would write, without an ASGI message and the cycle's
    checks per frame (a sixth of the relay's CPU per frame, py-spy). Any other server or
    framing: None (frames go through ``send``). The attributes read are pinned by
    tests/adapter/test_server.py."""
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if not hasattr(transport, "is_closing"):
        return None  # (uvloop's transports are not asyncio.Transport subclasses)
    conn = getattr(cycle, "conn", None)
    if isinstance(conn, h11.Connection):  # uvicorn's h11 cycle
        if conn.our_state is not h11.SEND_BODY or conn.their_http_version != b"1.1":
            return None
    elif not (  # uvicorn's httptools cycle, its head written, chunks on
        getattr(cycle, "chunked_encoding", None) is True
        and getattr(cycle, "response_started", False)
        and not getattr(cycle, "response_complete", True)
        and getattr(cycle, "scope", {}).get("http_version") == "1.1"
    ):
        return None
    return cast(asyncio.Transport, transport)


class Downstream:
    """Where the frames of one response go, written at once (``write`` never waits).

    While the client keeps up, each ``write`` goes out before it returns: a chunk written on
    the socket (``_chunked_transport``), else an ASGI message sent by a flusher task. When the
    client falls behind (the server's write buffer is above its high-water mark, or data
    written before still waits for the flusher), the data is kept instead, and newer data
    *replaces* it: every frame carries the cumulative text and
    usage, so the newest is all the client needs, and a slow client costs one frame of memory,
    never a queue. ``lagging`` tells the producer so, which then sends only the newest frame of
    each upstream read. ``flush`` waits until everything kept has gone out."""

    def __init__(self, send: Send, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._send = send
        self._transport = _chunked_transport(send)
        self._cycle = getattr(send, "__self__", None)
        # Uvicorn's h11 and httptools cycles both keep a ``flow`` with ``write_paused`` (above
        # the high-water mark: the client is not reading fast enough); any other server: none.
        flow = getattr(self._cycle, "flow", None)
        self._flow = flow if hasattr(flow, "write_paused") else None
        self._loop = loop or asyncio.get_running_loop()
        self._head = b""  # the response head, held until the producer first waits (hold_head)
        self._body_ended = False  # the last chunk is out: nothing more is written
        self._kept: list[bytes] = []
        self._kept_frames = 0  # of output in _kept
        self._flusher: asyncio.Task[None] | None = None
        self.last_sent = self._loop.time()

    def _paused(self) -> bool:
        return self._flow is not None and bool(self._flow.write_paused)

    @property
    def lagging(self) -> bool:
        """The client is not taking what was written (what comes now is kept, not sent)."""
        return bool(self._kept) or self._paused()

    def write(self, data: bytes, frames: int = 0, *, last: bool = False) -> int:
        """Send ``data`` (``frames`` frames of output); returns how many frames written before
        and still kept it supersedes: they will never be sent. ``last``: nothing but the end
        of the body follows, which then goes out in the same write when the client keeps up
        (``finish``); anything written after that is dropped."""
        if self._body_ended:
            return 0
        self.last_sent = self._loop.time()
        flow = self._flow
        if not self._kept and self._transport is not None and not (flow and flow.write_paused):
            self._write_chunk(data, last)  # the client keeps up: the common case, at once
            return 0
        superseded = 0
        if self.lagging:
            superseded = self._kept_frames
            self._kept[:] = [data]  # the newest frame supersedes the ones kept (see above)
            self._kept_frames = frames
        else:  # no socket to write on: sent by the flusher, at once unless the client lags
            self._kept.append(data)
            self._kept_frames += frames
        if self._flusher is None or self._flusher.done():
            self._flusher = self._loop.create_task(self._flush())
        return superseded

    def keepalive(self, interval: float) -> None:
        """An empty frame, unless something was written in the last ``interval`` seconds or
        is still waiting for the client (which is then not idle)."""
        if not self._kept and self._loop.time() - self.last_sent >= interval:
            self.write(KEEPALIVE)

    async def flush(self) -> None:
        """Wait until everything written has been handed to the server."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    def hold_head(self, head: bytes) -> None:
        """Send the response ``head`` (its bytes, written by nobody yet) once the callbacks
        ready now have run, or with the first chunk if one is written before that (in one
        write). ``FrameStreamResponse`` calls it just after creating the producer's task, whose
        first step is one of those callbacks: the head goes out when the producer first waits,
        its upstream request already sent, so neither the head's write nor the client's wake-up
        is on the way to the worker; and an answer made without waiting (a request refused at
        once) is a single write."""
        if self._transport is None:  # chunks go through the server's send: the head first
            self._write_raw(head)
            return
        self._head = head
        self._loop.call_soon(self.release_head)

    def release_head(self) -> None:
        """The held head, now (before anything that the server itself writes)."""
        if head := self._take_head():
            self._write_raw(head)

    def _take_head(self) -> bytes:
        """The held head (b"" if none), no longer held."""
        head, self._head = self._head, b""
        return head

    def _write_raw(self, data: bytes) -> None:
        transport = getattr(self._cycle, "transport", None)
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _write_chunk(self, data: bytes, last: bool = False) -> None:
        transport = self._transport
        assert transport is not None
        if not transport.is_closing() and not getattr(self._cycle, "disconnected", False):
            chunk = b"%x\r\n%b\r\n" % (len(data), data)
            if last:  # the body's end with it: one write, one wake-up of the client less
                chunk += _LAST_CHUNK
                self._body_ended = True
            if self._head:
                chunk = self._take_head() + chunk
            transport.write(chunk)

    async def _flush(self) -> None:
        while self._kept:
            if self._paused() and self._flow is not None:
                await self._flow.drain()
                continue  # newer data may have replaced what was kept meanwhile
            data = b"".join(self._kept)
            self._kept.clear()
            self._kept_frames = 0
            if self._transport is not None:
                self._write_chunk(data)
            else:
                await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def finish(self, send: Send) -> None:
        """End the body: ``http.response.body`` with ``more_body`` false through ``send``, the
        middlewares see it as ever. When the last chunk took the body's end with it, the
        server's own end (the same bytes) is not written again."""
        end: Message = {"type": "http.response.body", "body": b"", "more_body": False}
        await self.flush()  # what a slow client has not taken yet, then the end
        self.release_head()
        if not self._body_ended:
            await send(end)
            return
        cycle = self._cycle  # (the body ends early only on the direct chunk path: uvicorn's)
        assert cycle is not None
        held = await _send_held(send, cycle, end)
        if held.data != _LAST_CHUNK:  # (only if a server wrote its end otherwise)
            self._write_raw(held.data)
        if held.closing:
            cycle.transport.close()

    async def close(self) -> None:
        self.release_head()  # (nothing is written to a client that has gone)
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)


class _KeepaliveClock:
    """One timer per event loop and interval for every open stream, instead of a sleeping
    task per stream: every half interval, each stream idle for ``interval`` or more gets an
    empty frame. So a silent stream sees one every 1 to 1.5 intervals."""

    _clocks: ClassVar[dict[tuple[asyncio.AbstractEventLoop, float], _KeepaliveClock]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self._loop = loop
        self._interval = interval
        self._streams: set[Downstream] = set()
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, interval: float, loop: asyncio.AbstractEventLoop) -> _KeepaliveClock:
        clock = cls._clocks.get((loop, interval))
        if clock is None:
            clock = cls._clocks[(loop, interval)] = cls(loop, interval)
        return clock

    def add(self, stream: Downstream) -> None:
        self._streams.add(stream)
        if self._timer is None:
            self._timer = self._loop.call_later(self._interval / 2, self._tick)

    def discard(self, stream: Downstream) -> None:
        self._streams.discard(stream)

    def _tick(self) -> None:
        if not self._streams:  # nothing open: forget this clock until the next stream
            self._timer = None
            self._clocks.pop((self._loop, self._interval), None)
            return
        for stream in self._streams:
            stream.keepalive(self._interval)
        self._timer = self._loop.call_later(self._interval / 2, self._tick)


async def wait_for_disconnect(receive: Receive) -> None:
    # The route has read the whole body already, so the next message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass
class GoingAway:
    """Cut once, when the shutdown grace is about to run out: every open stream then ends with
    ``farewell`` (one error frame) and ``on_cut`` is called once per stream so ended. Streams
    wait on a plain future each (``watch``), not on a task of their own."""

    farewell: bytes
    on_cut: Callable[[], None] = lambda: None
    is_cut: bool = False
    _watchers: set[asyncio.Future[None]] = field(default_factory=set)

    def cut(self) -> None:
        self.is_cut = True
        for watcher in self._watchers:
            if not watcher.done():
                watcher.set_result(None)
        self._watchers.clear()

    def watch(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future done when the cut comes (at once if it came already)."""
        watcher = loop.create_future()
        if self.is_cut:
            watcher.set_result(None)
        else:
            self._watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: asyncio.Future[None]) -> None:
        self._watchers.discard(watcher)


_LAST_CHUNK: Final = b"0\r\n\r\n"

Producer = Callable[[Downstream], Coroutine[Any, Any, Outcome]]


class _Held:
    """Stands in for uvicorn's transport while its cycle writes: keeps what it writes, and
    whether it asked for a close (a connection not kept alive, after its last response)."""

    def __init__(self, transport: Any) -> None:
        self.data = b""
        self.closing = False
        self._transport = transport

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closing or bool(self._transport.is_closing())

    def close(self) -> None:
        self.closing = True


async def _send_held(send: Send, cycle: Any, message: Message) -> _Held:
    """``await send(message)`` with uvicorn's ``cycle`` writing nowhere: what it would have
    written (and closed) is the caller's to write (and close)."""
    transport = cycle.transport
    held = _Held(transport)
    cycle.transport = held
    try:
        await send(message)  # (the cycle awaits nothing while its client is not behind)
    finally:
        cycle.transport = transport
    return held


async def _start_held(send: Send, raw_send: Send) -> bytes:
    """Send ``http.response.start`` (status 200) through ``send`` (the middlewares see it as
    ever). Under uvicorn's cycle the bytes of the head are returned instead of written, for
    ``Downstream.hold_head``; anywhere else, or when the client is already behind, the head
    is written as usual and b"" returned."""
    start: Message = {"type": "http.response.start", "status": 200, "headers": []}
    cycle = getattr(raw_send, "__self__", None)
    flow = getattr(cycle, "flow", None)
    if not hasattr(getattr(cycle, "transport", None), "is_closing") or getattr(
        flow, "write_paused", True
    ):
        await send(start)
        return b""
    return (await _send_held(send, cycle, start)).data


async def first_done(
    loop: asyncio.AbstractEventLoop, futures: Sequence[asyncio.Future[Any]]
) -> None:
    """Until one of ``futures`` is done: ``asyncio.wait(..., FIRST_COMPLETED)`` without its
    sets and its own loop lookup."""
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: asyncio.Future[Any]) -> None:
        if not waiter.done():
            waiter.set_result(None)

    for future in futures:
        future.add_done_callback(wake)
    try:
        await waiter
    finally:
        for future in futures:
            future.remove_done_callback(wake)


class FrameStreamResponse(Response):
    """Stream the frames ``producer`` emits; ``on_done(outcome)`` runs once at the end, with
    the producer's outcome, or ``"client_gone"`` if the client left first."""

    def __init__(
        self,
        producer: Producer,
        *,
        keepalive_interval: float,
        on_done: Callable[[Outcome], None],
        going_away: GoingAway | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = []
        self._producer = producer
        self._keepalive_interval = keepalive_interval
        self._on_done = on_done
        self._going_away = going_away or GoingAway(b"")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome: Outcome = "client_gone"
        writer: Downstream | None = None
        try:
            raw_send = scope.get(RAW_SEND, send)
            head = await _start_held(send, raw_send)
            # The loop, looked up once: on Python 3.11 every lookup is a getpid() system call.
            loop = asyncio.get_running_loop()
            writer = Downstream(raw_send, loop)
            work = loop.create_task(self._producer(writer))
            if head:  # after the producer's first step (see hold_head)
                writer.hold_head(head)
            gone = loop.create_task(wait_for_disconnect(receive))
            closing = self._going_away.watch(loop)
            tasks = (work, gone, closing)
            clock = _KeepaliveClock.of(self._keepalive_interval, loop)
            clock.add(writer)
            try:
                await first_done(loop, tasks)
            finally:
                clock.discard(writer)
                self._going_away.unwatch(closing)
                finished, cut = work.done(), closing.done() and not gone.done()
                for task in tasks:
                    task.cancel()
                # Let the producer unwind (closing the upstream) before the response ends.
                await asyncio.gather(*tasks, return_exceptions=True)
            if finished and not work.cancelled():
                outcome = "error"
                outcome = work.result()  # the producer handles its errors: a raise is a bug
            elif cut:
                outcome = "error"
                self._going_away.on_cut()
                writer.write(self._going_away.farewell, last=True)
            else:  # the client left: nothing more to send
                return
            await writer.finish(send)
        finally:
            if writer is not None:
                await writer.close()
            self._on_done(outcome)
