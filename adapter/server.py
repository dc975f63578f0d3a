"""Run the adapter under uvicorn with DB-GPT-safe shutdown ordering.

Before anything else the port is bound (``bind_socket``): a port in use is a one-line error and
exit status 3 before any controller hears of us, instead of registering, deregistering and then
failing. The startup line (``adapter/startup.py``) follows.

On SIGTERM/SIGINT, in this order:
1. report not-ready (``/readyz`` 503), stop heartbeats, deregister everywhere
   (``Runtime.begin_shutdown``): while streams are still running, so DB-GPT stops routing here;
2. tell uvicorn to exit: it stops accepting, lets in-flight streams finish for up to
   ``shutdown_grace`` seconds, then runs the lifespan shutdown (background tasks, HTTP pool);
3. exit 0. A second signal forces exit without draining the streams; only the deregistration
   already under way (bounded by its short per-call timeouts) is let finish first.
Uvicorn runs lifespan shutdown only after streams drain, so step 1 cannot live there.

``AdapterServer`` relies on three uvicorn internals, pinned by ``tests/adapter/test_server.py``
(which fails if they change): ``Server.handle_exit(sig, frame)`` is the handler uvicorn installs
for SIGINT/SIGTERM; its main loop polls ``should_exit``; its shutdown skips the drain when
``force_exit`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
from types import FrameType
from typing import Final

import uvicorn

from adapter.app import create_app, front
from adapter.cli import ExitCode
from adapter.connections import read_deadlines
from adapter.logs import setup_logging
from adapter.ops_api import ambiguous_length_answer
from adapter.runtime import Runtime
from adapter.settings import Settings
from adapter.startup import startup_facts, startup_line

log = logging.getLogger("fastchat_adapter.server")

CUT_MARGIN = 1.0
"""Seconds before the shutdown grace ends at which still-open streams get their error frame."""

ACCEPTS_PER_TURN: Final = 4
"""Connections accepted per turn of the event loop under uvloop, at most (see ``startup``)."""


class AdapterServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]
        if self._shutdown is not None and not self._shutdown.done():
            # A second signal skipped the drain, not the deregistration under way: it is
            # bounded, and a stale healthy entry would break DB-GPT's chats (§10 item 18).
            await self._shutdown

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Uvicorn's startup, listening with ``ACCEPTS_PER_TURN`` handles per socket under uvloop.

        uvloop's libuv accepts one connection per listening handle per turn of the event loop
        (libuv 1.45: "don't accept() connections in a loop"); asyncio's loop takes up to the
        backlog. Under full load a turn lasts about 10 ms, so a burst of 64 new requests waited
        up to 0.6 s just to be accepted: the full-rate c=64 TTFT p99 of bench/relay.py (traced
        per request: 60-200 ms between the client's connect and our ``connection_made``). Each
        extra handle listens on a copy of the socket (``os.dup``: the same accept queue) and
        accepts one more per turn: c=64 TTFT p99 150-163 -> 92-109 ms. A lone connection
        wakes every handle and all but one ``accept`` fail with EAGAIN: about 10 µs of CPU per
        connection with four handles, 25 µs with eight (which bought no more)."""
        if sockets and type(asyncio.get_running_loop()).__module__.startswith("uvloop"):
            copies = [_copy(sock) for sock in sockets for _ in range(ACCEPTS_PER_TURN - 1)]
            sockets = [*sockets, *copies]  # (each owned, then closed, by its uvloop server)
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Deliberately not recording the signal: uvicorn would re-raise it after serving and
        # the process would die by SIGTERM instead of exiting 0 after a clean shutdown.
        if self._shutdown is not None or self._loop is None:
            self.should_exit = True
            self.force_exit = self._shutdown is not None
            return
        log.info("received %s: deregistering, then draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_shutdown)

    def _start_shutdown(self) -> None:
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._shutdown_sequence())

    async def _shutdown_sequence(self) -> None:
        await self.runtime.begin_shutdown()
        # Uvicorn cancels what is still running when the grace ends: end those streams with an
        # error frame a little before, while they can still be written to.
        grace = self.config.timeout_graceful_shutdown or 0
        cut_at = max(0.0, grace - min(CUT_MARGIN, grace / 2))
        asyncio.get_running_loop().call_later(cut_at, self.runtime.going_away.cut)
        self.should_exit = True


def build_server(settings: Settings) -> AdapterServer:
    app = create_app(settings)
    runtime: Runtime = app.state.runtime
    config = uvicorn.Config(
        front(app),
        host=settings.host,
        port=settings.port,
        http=protocol_class(settings, runtime),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace),
        lifespan="on",
    )
    return AdapterServer(config, runtime)


def protocol_class(settings: Settings, runtime: Runtime) -> type[asyncio.Protocol]:
    """Uvicorn's httptools protocol with read deadlines (adapter/connections.py): its parser is
    C, a fifth of the adapter's CPU per short request less than h11's (bench/relay.py, fixed
    cost). h11's protocol, the same deadlines, where httptools is not installed."""
    timed_out = runtime.metrics.connections_timed_out
    return read_deadlines(
        head_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        body_min_rate=settings.body_min_rate,
        on_timeout=lambda phase: timed_out.labels(phase).inc(),
        parser="httptools" if _httptools_installed() else "h11",
        ambiguous_length=ambiguous_length_answer,
    )


def _httptools_installed() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


def _copy(sock: socket.socket) -> socket.socket:
    return socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, bound now (uvicorn would bind only after the lifespan startup,
    which registers with the controllers). ``OSError`` if it is in use or not allowed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings) -> int:
    setup_logging(settings.log_format, settings.log_level)
    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        return ExitCode.CANNOT_START
    facts = {**startup_facts(settings), "_in_message": True}
    log.info("%s", startup_line(settings), extra=facts)
    server = build_server(settings)
    with sock:
        # ``run`` picks the event loop: uvloop when installed (a dependency on Linux).
        server.run(sockets=[sock])
    # uvicorn returns without serving when the lifespan startup failed (it logged why).
    return ExitCode.OK if server.started else ExitCode.CANNOT_START
