"""Fixtures shared by every test directory: real loopback servers and the fake FastChat worker.

The support modules are imported inside the fixtures, so a test that needs neither pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from tests.support.fake_worker import FakeWorker, StartFake
    from tests.support.servers import LoopbackServer


@pytest.fixture
def serve_app() -> Iterator[Callable[..., LoopbackServer]]:
    """``serve_app(app, **options)`` starts ``app`` on loopback; every server stops at teardown."""
    from tests.support.servers import LoopbackServer

    servers: list[LoopbackServer] = []

    def serve(app: ASGIApp, **options: Any) -> LoopbackServer:
        server = LoopbackServer(app, **options)
        server.start()
        servers.append(server)
        return server

    yield serve
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def fake_worker() -> Iterator[StartFake]:
    """``fake_worker(config=None, **options)`` starts a ``FakeWorker``; all stop at teardown."""
    from tests.support.fake_worker import FakeWorker

    workers: list[FakeWorker] = []

    def start(*args: Any, **options: Any) -> FakeWorker:
        worker = FakeWorker(*args, **options).start()
        workers.append(worker)
        return worker

    yield start
    for worker in reversed(workers):
        worker.stop()
