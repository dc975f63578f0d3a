"""The read deadlines (adapter/connections.py) on uvicorn's httptools protocol, in a module of
its own so that the adapter still imports where httptools is not installed (h11 then)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from adapter.connections import HEAD_TOO_LARGE, MAX_HEAD, Deadlines
from adapter.turns import FairShare

__all__ = ["HttpToolsDeadlines"]


class HttpToolsDeadlines(Deadlines, HttpToolsProtocol):
    """On uvicorn's httptools protocol, following its parser's callbacks. llhttp sets no limit
    on a request's head, so this protocol does (``MAX_HEAD``, h11's own limit): past it the
    connection gets a 431 and is closed, before the head is held in memory."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_deadlines()
        self._state = "idle"  # of the newest request: idle, head, body or complete
        self._head_bytes = 0
        self._held: bytearray | None = None  # read before the request's turn to start came

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch(0, "head")  # from a connection's first moment, as with h11

    def data_received(self, data: bytes) -> None:
        if self._held is not None:  # waiting for its turn to start: keep what comes
            self._held += data
            return
        # A generation request (a POST, between requests) starts when its turn comes
        # (adapter/turns.py); probes, metrics and the rest never wait.
        admit = FairShare.of(self.loop).admit
        if self._state == "idle" and data[:5] == b"POST " and not admit(self._start):
            self._held = bytearray(data)
            self.transport.pause_reading()
            self._unset_keepalive_if_required()
            return
        self._feed(data)

    def _start(self) -> None:
        held, self._held = self._held, None
        if held is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        self._feed(bytes(held))

    def _feed(self, data: bytes) -> None:
        super().data_received(data)
        if self._state == "head":  # a read that leaves the head unfinished counts whole
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._refuse(HEAD_TOO_LARGE)
                return
        if self._state == "body":
            self._watch(len(data), "body")
        elif self._state == "head" or (self._state == "idle" and self._phase == "head"):
            self._watch(len(data), "head")
        else:
            self._watch(len(data), None)

    def _refuse(self, answer: bytes) -> None:
        self._cancel()
        if not self._response_begun():
            self.transport.write(answer)
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._state = "head"

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._state, self._head_bytes = "body", 0
        cycle = self.cycle
        if cycle is not None and self.scope.get("http_version") == "1.0":
            cycle.send = _unchunked(cycle)  # type: ignore[method-assign,assignment]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._state = "complete"

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._state == "complete":  # idle between requests: uvicorn's keep-alive timeout
            self._state = "idle"
            self._watch(0, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # llhttp refuses Content-Length with Transfer-Encoding before the app sees it: answer
        # as the guard does under h11 (adapter/ops_api.py), not with uvicorn's generic text.
        # Called inside uvicorn's ``except HttpParserError``: the error says which it was.
        reason = str(sys.exc_info()[1] or "")
        if "Content-Length" in reason and "Transfer-Encoding" in reason and self.ambiguous:
            self._refuse(self.ambiguous(self.url.split(b"?", 1)[0].decode("latin-1")))
            return
        super().send_400_response(msg)

    def _request_begun(self) -> bool:
        return self._state != "idle"

    def _response_begun(self) -> bool:
        cycle = self.cycle
        return cycle is not None and cycle.response_started and not cycle.response_complete


def _unchunked(cycle: RequestResponseCycle) -> Callable[[Any], Awaitable[None]]:
    """The ``send`` of an HTTP/1.0 request's cycle: uvicorn's httptools cycle would chunk a
    body without Content-Length, which an HTTP/1.0 client cannot read (RFC 9112 §6.1 forbids
    it). The body is sent as it is instead, and ends with the connection (h11's answer)."""
    send = cycle.send

    async def send_unchunked(message: Any) -> None:
        if message["type"] == "http.response.start":
            names = {name.lower() for name, _ in message.get("headers", ())}
            if b"content-length" not in names and b"transfer-encoding" not in names:
                cycle.chunked_encoding = False  # no chunks…
                cycle.expected_content_length = sys.maxsize  # …and no length: until the close
        elif (
            message["type"] == "http.response.body"
            and not message.get("more_body", False)
            and cycle.expected_content_length == sys.maxsize
        ):
            cycle.expected_content_length = len(message.get("body", b""))  # the last piece
        await send(message)

    return send_unchunked
