"""Read deadlines on every connection: uvicorn has a keep-alive timeout, but nothing bounds a
request that arrives slowly. Without them one byte a second holds a connection (and its fd)
forever, and a few hundred such clients exhaust the process.

``read_deadlines(...)`` makes uvicorn's protocol class (httptools, what the adapter runs, or
h11) with two deadlines, checked against the parser's own view of the request (httptools'
callbacks, h11's ``their_state``):

- **head**: from a connection's first moment (or the first byte of a request after a
  keep-alive pause) the request line and headers must be complete within ``head_timeout``;
- **body**: from the end of the head the body must be complete within ``body_timeout``,
  extended by one second for every ``body_min_rate`` bytes received (Apache's
  ``mod_reqtimeout`` rule), so a large upload on a slow link is fine and a trickle is not.

A connection that misses one gets a ``408 Request Timeout`` (unless it has sent nothing at all
or its response has begun), is closed, and is counted by ``on_timeout(phase)``. While the
response is being written (a stream) no deadline runs: the request is complete.

Under httptools (``adapter/httptools_deadlines.py``, imported only where httptools is
installed) the class also does what h11 does and llhttp does not: a head over ``MAX_HEAD``
bytes is refused (431) before it is held, a request with both Content-Length and
Transfer-Encoding gets the guard's own answer, and an HTTP/1.0 client gets its body unchunked.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Final

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["MAX_HEAD", "read_deadlines"]

log = logging.getLogger("fastchat_adapter.connections")

_TIMEOUT_TEXT: Final = b"request not received in time"
MAX_HEAD: Final = 16 * 1024
"""Bytes a request's head may have under httptools: h11's own limit (uvicorn's default)."""
_TOO_LARGE_TEXT: Final = b"request head too large"
HEAD_TOO_LARGE: Final = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_TOO_LARGE_TEXT), _TOO_LARGE_TEXT)
)
_REQUEST_TIMEOUT: Final = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_TIMEOUT_TEXT), _TIMEOUT_TEXT)
)


class Deadlines(ABC):
    """The deadline clock, for either parser: ``_watch(received, phase)`` after each event
    that can change the request's phase (``"head"``, ``"body"`` or None: complete, or idle
    between requests)."""

    head_timeout: ClassVar[float]
    body_timeout: ClassVar[float]
    body_min_rate: ClassVar[int]
    on_timeout: ClassVar[staticmethod[[str], None]]
    ambiguous: ClassVar[staticmethod[[str], bytes] | None]
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    client: tuple[str, int] | None

    def _init_deadlines(self) -> None:
        self._phase: str | None = None
        self._since = 0.0
        self._received = 0
        self._timer: asyncio.TimerHandle | None = None

    def _watch(self, received: int, phase: str | None) -> None:
        if self.transport.is_closing():
            phase = None
        if phase != self._phase:
            self._phase, self._since, self._received = phase, self.loop.time(), 0
        elif phase == "body":
            self._received += received
        else:
            return  # still the same head deadline
        self._cancel()
        if phase == "head":
            self._timer = self.loop.call_at(self._since + self.head_timeout, self._expired)
        elif phase == "body":
            earned = self._received / self.body_min_rate if self.body_min_rate else 0.0
            deadline = self._since + self.body_timeout + earned
            self._timer = self.loop.call_at(deadline, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        phase, self._timer = self._phase or "head", None
        client = "%s:%d" % self.client if self.client else "unknown"  # noqa: UP031
        log.warning("closing connection from %s: request %s not received in time", client, phase)
        self.on_timeout(phase)
        silent = phase == "head" and not self._request_begun()
        if not silent and not self._response_begun():
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()

    @abstractmethod
    def _request_begun(self) -> bool:
        """A byte of the request in progress has come."""

    @abstractmethod
    def _response_begun(self) -> bool:
        """A byte of a response is out (a 408 would corrupt it)."""


class _H11Deadlines(Deadlines, H11Protocol):
    """On uvicorn's h11 protocol, following h11's view of the request (``their_state``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_deadlines()

    # --- the hooks: after each thing that can change h11's view of the request -----------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch(0, self._h11_phase(started=True))

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch(len(data), self._h11_phase(started=True))

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Idle between requests: uvicorn's keep-alive timeout runs until the next byte comes.
        self._watch(0, self._h11_phase(started=bool(self.conn.trailing_data[0])))

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _h11_phase(self, *, started: bool) -> str | None:
        state = self.conn.their_state
        if state is h11.IDLE:
            return "head" if started else None
        return "body" if state is h11.SEND_BODY else None

    def _request_begun(self) -> bool:
        return bool(self.conn.trailing_data[0])

    def _response_begun(self) -> bool:
        return self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE)


def read_deadlines(
    *,
    head_timeout: float,
    body_timeout: float,
    body_min_rate: int,
    on_timeout: Callable[[str], None],
    parser: str = "h11",
    ambiguous_length: Callable[[str], bytes] | None = None,
) -> type[asyncio.Protocol]:
    """Uvicorn's protocol class for ``parser`` (``h11`` or ``httptools``) with these read
    deadlines (pass it as ``Config(http=)``). ``ambiguous_length(path)``: the whole answer to
    a request with both Content-Length and Transfer-Encoding, where the parser refuses it
    (httptools; under h11 the application sees it)."""
    attributes = {
        "head_timeout": head_timeout,
        "body_timeout": body_timeout,
        "body_min_rate": body_min_rate,
        "on_timeout": staticmethod(on_timeout),
        "ambiguous": staticmethod(ambiguous_length) if ambiguous_length else None,
    }
    base: type[asyncio.Protocol] = _H11Deadlines
    if parser == "httptools":  # imported only here: httptools is optional (h11 the fallback)
        from adapter.httptools_deadlines import HttpToolsDeadlines

        base = HttpToolsDeadlines
    return type("ReadDeadlineProtocol", (base,), attributes)
