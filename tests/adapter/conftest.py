"""Fixtures shared by several adapter test files (helpers without fixtures: ``helpers.py``)."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator

import pytest

from adapter.logs import setup_logging
from adapter.settings import ENV_PREFIX
from adapter.tools.reference_worker import ReferenceWorkerConfig
from adapter.tools.reference_worker import create_app as reference_app
from tests.support.fake_controller import FakeController
from tests.support.fake_worker import FakeWorker
from tests.support.servers import LoopbackServer


@pytest.fixture(scope="module")
def ref_worker() -> Iterator[LoopbackServer]:
    """One reference worker serving the model ``ref``, shared by a module's tests."""
    with LoopbackServer(reference_app(ReferenceWorkerConfig(model_names=("ref",)))) as server:
        yield server


@pytest.fixture
def tiny() -> Iterator[FakeWorker]:
    """A fake worker serving the model ``tiny``."""
    with FakeWorker(ReferenceWorkerConfig(model_names=("tiny",))) as fake:
        yield fake


@pytest.fixture
def controller() -> Iterator[FakeController]:
    """A fake DB-GPT controller on loopback."""
    with FakeController() as fake:
        yield fake


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The process's logging set up as ``--log-format json``, into a string; restored after."""
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    stream = io.StringIO()
    setup_logging("json", "info", stream)
    yield stream
    for handler in [h for h in root.handlers if h not in saved_handlers]:
        root.removeHandler(handler)
    root.setLevel(saved_level)
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own FASTCHAT_ADAPTER_* variables must not leak into settings tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
