"""A real uvicorn server on loopback, run in a background thread (as httpx's own tests do).

Streaming, disconnect and restart behaviour is tested against real sockets, not mocks. Any ASGI
app can be served; the server runs its own event loop in its own thread, so sync and async tests
alike can talk to it, and a blocking ``stop()`` never deadlocks the test's loop.

``stop()`` makes the server look like a dead process rather than a draining one: listeners close
and every open connection is dropped, even mid-response. ``restart()`` brings the same app back on
the same port, with a fresh event loop (a restarted worker starts with an empty queue).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp

__all__ = ["LoopbackServer"]


class _Server(uvicorn.Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Stop accepting first, then drop every connection instead of waiting for streams to end.
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.transport.abort()
        await super().shutdown(sockets)


class LoopbackServer:
    """Serve ``app`` on ``host``; ``port`` 0 picks a free port once, kept across restarts."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 10.0,
        http: type[asyncio.Protocol] | str = "h11",
    ) -> None:
        self.app = app
        self.http = http  # uvicorn's protocol: a name, or a class such as the adapter's own
        self.host = host
        self._port = port
        self.startup_timeout = startup_timeout
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the server has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port``, without a trailing slash."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Bind, serve from a new thread, and return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the server is already running")
        # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets whose proto
        # says TCP, and without it Nagle holds a response's body back until the client's
        # delayed ACK of its headers (40 ms on Linux) on every reused connection.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        # Connections the server closed linger in TIME_WAIT; without this a restart could not
        # bind the same port again.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._port))
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            loop="asyncio",
            http=self.http,
            ws="none",
            log_config=None,  # leave logging to pytest
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        server = _Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn:{self._port}"
        )
        thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                thread.join()
                sock.close()
                raise RuntimeError(f"the server on port {self._port} did not start")
            time.sleep(0.005)
        self._server, self._thread = server, thread

    def stop(self) -> None:
        """Close the listener, drop every connection, and wait for the thread to end."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join()
        self._server = self._thread = None

    def restart(self) -> None:
        """Stop, then serve the same app on the same port again."""
        self.stop()
        self.start()

    def __enter__(self) -> LoopbackServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
