"""The downstream half of a stream: NUL frames out as they come, keep-alives, disconnects.

``FrameStreamResponse`` runs a *producer* (``relay.Relay.stream``) that calls ``emit(frame)``
for each frame, and owns the three things Starlette's ``StreamingResponse`` does not give:

- **No buffering.** Each ``emit`` is one ASGI body message, sent before the producer reads
  the next upstream frame (the server writes each message at once, chunk-encoded).
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

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


def _paused_probe(send: Send) -> Callable[[], bool]:
    """Whether the server's transport is above its high-water mark (the client is not reading
    fast enough). Uvicorn's h11 and httptools cycles both keep a ``flow`` with ``write_paused``;
    any other server: never."""
    flow = getattr(getattr(send, "__self__", None), "flow", None)
    if flow is None or not hasattr(flow, "write_paused"):
        return lambda: False
    return lambda: bool(flow.write_paused)


class Downstream:
    """Serialises sends from the producer and the keep-alive task; remembers the last one.

    ``lagging`` says the last frame had to wait for the client to drain what was sent before:
    the producer may then send only the newest of the frames waiting upstream (frames carry
    cumulative text, so nothing is lost but intermediate states)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._paused = _paused_probe(send)
        self._lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self.last_sent = self._loop.time()
        self.lagging = False
        self._keepalive: asyncio.Future[None] | None = None

    async def emit(self, frame: bytes) -> None:
        self.lagging = self._paused()
        async with self._lock:  # uncontended: no suspension, so no cost per frame
            await self._send({"type": "http.response.body", "body": frame, "more_body": True})
        self.last_sent = self._loop.time()

    def keepalive(self, interval: float) -> None:
        """Send a keep-alive soon, unless a send is under way (the client is not idle then)."""
        if not self._lock.locked() and (self._keepalive is None or self._keepalive.done()):
            self._keepalive = asyncio.ensure_future(self._keepalive_if_idle(interval))

    async def _keepalive_if_idle(self, interval: float) -> None:
        # Checked again when the task runs: a frame may have gone out in between.
        if not self._lock.locked() and self._loop.time() - self.last_sent >= interval:
            await self.emit(KEEPALIVE)

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            await asyncio.gather(self._keepalive, return_exceptions=True)


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
    def of(cls, interval: float) -> _KeepaliveClock:
        loop = asyncio.get_running_loop()
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
        now = self._loop.time()
        for stream in self._streams:
            if now - stream.last_sent >= self._interval:
                stream.keepalive(self._interval)
        self._timer = self._loop.call_later(self._interval / 2, self._tick)


async def wait_for_disconnect(receive: Receive) -> None:
    # The route has read the whole body already, so the next message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass
class GoingAway:
    """Set once, when the shutdown grace is about to run out: every open stream then ends with
    ``farewell`` (one error frame) and ``on_cut`` is called once per stream so ended."""

    farewell: bytes
    on_cut: Callable[[], None] = lambda: None
    event: asyncio.Event = field(default_factory=asyncio.Event)


Emit = Callable[[bytes], Awaitable[None]]
Producer = Callable[[Downstream], Awaitable[Outcome]]


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
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            writer = Downstream(scope.get(RAW_SEND, send))
            work = asyncio.ensure_future(self._producer(writer))
            gone = asyncio.ensure_future(wait_for_disconnect(receive))
            closing = asyncio.ensure_future(self._going_away.event.wait())
            tasks = (work, gone, closing)
            clock = _KeepaliveClock.of(self._keepalive_interval)
            clock.add(writer)
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                clock.discard(writer)
                finished, cut = work.done(), closing.done() and not gone.done()
                for task in tasks:
                    task.cancel()
                # Let the producer unwind (closing the upstream) before the response ends.
                await asyncio.gather(*tasks, writer.close(), return_exceptions=True)
            if finished and not work.cancelled():
                outcome = "error"
                outcome = work.result()  # the producer handles its errors: a raise is a bug
            elif cut:
                outcome = "error"
                self._going_away.on_cut()
                await writer.emit(self._going_away.farewell)
            else:  # the client left: nothing more to send
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._on_done(outcome)
