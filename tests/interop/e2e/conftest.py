"""End-to-end: DB-GPT's app (webserver + web UI, knowledge base, Chat-DB) on FastChat workers
through the adapter. Everything here is marked `e2e` (and `interop`, as everything under
tests/interop: it runs the real programs); `pytest -m e2e` runs only this.

Session fixtures:
    app_stack   AppStack (app_stack.py): the interop FastChat stack, a reference worker with
                scripted replies, a recording proxy in front of each worker, the adapter
                (standalone), DB-GPT's webserver from its own venv (peers.DBGPT_APP, ~1.4 GB,
                built on first use). `.url` is the web UI.
    app_http    httpx.Client for the app's API
    artefacts   folder kept after the run (`run/e2e-artefacts/`): screenshots, page sources
Function fixtures:
    browser     selenium WebDriver on Debian's headless chromium (scripts/install_browser.sh)
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.interop import peers as peer_cache
from tests.interop.e2e.app_stack import AppStack, start_app_stack
from tests.interop.e2e.browser import Browser, open_browser
from tests.interop.procs import RUNS_DIR, RunDir

HERE = Path(__file__).resolve().parent
SETUP_TIMEOUT_S = 1800.0
CALL_FAILED = pytest.StashKey[bool]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


@pytest.fixture(scope="session")
def app_stack(_launcher: object, interop_run: RunDir) -> Iterator[AppStack]:
    launcher = _launcher
    app_env = launcher.dbgpt_env(peer_cache.DBGPT_APP)  # type: ignore[attr-defined]
    fastchat = launcher.fastchat_stack().result(SETUP_TIMEOUT_S)  # type: ignore[attr-defined]
    stack = start_app_stack(interop_run, fastchat, app_env.result(SETUP_TIMEOUT_S))
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def app_http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60.0, trust_env=False) as client:
        yield client


@pytest.fixture(scope="session")
def artefacts() -> Path:
    folder = RUNS_DIR / "e2e-artefacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser(artefacts: Path, request: pytest.FixtureRequest) -> Iterator[Browser]:
    with open_browser(artefacts, request.node.name) as browser:
        yield browser
        if request.node.stash.get(CALL_FAILED, False):
            browser.keep_page("failure")  # what the page showed when the test failed
