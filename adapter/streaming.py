"""The downstream half of a stream: NUL frames out as they come, keep-alives, disconnects.

``FrameStreamResponse`` runs a *producer* (``relay.Relay.stream``) that calls ``emit(frame)``
for each frame, and owns the three things Starlette's ``StreamingResponse`` does not give:

- **No buffering.** Each ``emit`` is one ASGI body message, sent before the producer reads
  the next upstream frame (the server writes each message at once, chunk-encoded).
- **Keep-alive.** Whenever nothing has been sent for ``keepalive_interval`` seconds (a slow
  first token, a queued request), an empty frame (a bare NUL) goes out. DB-GPT's reader skips
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

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from adapter.tracking import Outcome
from protocol.framing import KEEPALIVE

log = logging.getLogger("fastchat_adapter.relay")

Emit = Callable[[bytes], Awaitable[None]]
Producer = Callable[[Emit], Awaitable[Outcome]]


class _Writer:
    """Serialises sends from the producer and the keep-alive task; remembers the last one."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self.last_sent = self._loop.time()

    async def emit(self, frame: bytes) -> None:
        async with self._lock:  # uncontended: no suspension, so no cost per frame
            await self._send({"type": "http.response.body", "body": frame, "more_body": True})
        self.last_sent = self._loop.time()

    async def keepalive(self, interval: float) -> None:
        while True:
            idle_for = self._loop.time() - self.last_sent
            if idle_for < interval:
                await asyncio.sleep(interval - idle_for)
            else:
                await self.emit(KEEPALIVE)


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
            writer = _Writer(send)
            work = asyncio.ensure_future(self._producer(writer.emit))
            gone = asyncio.ensure_future(wait_for_disconnect(receive))
            keepalive = asyncio.ensure_future(writer.keepalive(self._keepalive_interval))
            closing = asyncio.ensure_future(self._going_away.event.wait())
            tasks = (work, gone, keepalive, closing)
            try:
                await asyncio.wait((work, gone, closing), return_when=asyncio.FIRST_COMPLETED)
            finally:
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
                await writer.emit(self._going_away.farewell)
            else:  # the client left: nothing more to send
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._on_done(outcome)
