"""Fixtures that run the real FastChat 0.2.36 and DB-GPT 0.8.2 programs (see docs/peers.md).

Session fixtures (started once, in parallel, as soon as the session knows it needs them):
    peers            Peers: .fastchat / .dbgpt venvs (.python, .bin(name)), .models
                     (.tiny_llm, .embedding paths). Built and cached under .peers/ on first use.
    interop_run      RunDir: .path ($RUN), .log_tails(), .env()
    fastchat_stack   FastChatStack: .controller_url .worker_url .embed_worker_url .openai_url,
                     .model ("tiny-vicuna"), .embed_model ("all-MiniLM-L6-v2"), .pids, and the
                     Proc objects .controller .worker .embed_worker .openai
    dbgpt_cluster    DbgptCluster: .controller_url .api_url .config_path .home .pids,
                     .restart_controller() / .stop_controller() / .start_controller(),
                     .model_list(), .dbgpt(*args); Procs .controller .apiserver
    dbgpt075_cluster DbgptCluster of DB-GPT 0.7.5 (docs/peers.md §2.7): same TOML and commands, from
                     its own venv (peers.DBGPT_075), built and started only when a test asks
                     for it (test_dbgpt_075.py)
Function fixtures:
    fastchat_worker_factory   start(model_name, ...) -> FastChatWorker; stopped after the test
    dbgpt_cluster_factory     start(...) -> a fresh DbgptCluster; stopped after the test
    adapter_factory           start(workers=..., embedding_workers=..., controllers=...) ->
                              AdapterProc (the real `fastchat-adapter serve`); stopped after
    reference_worker_factory  start(model_name, script=..., eos_after=..., conv_template_file=...)
                              -> ReferenceWorkerProc (scripted answers); stopped after
    http                      httpx.Client (30 s timeout, no proxies from the environment)
Every test has a deadline (SIGALRM): `@pytest.mark.deadline(seconds)`, else DEFAULT_DEADLINE_S.

Every Proc has .url .port .pid .alive, .stop() (SIGTERM, 5 s, SIGKILL), .kill() (SIGKILL),
.start(same_port=True) and .restart(same_port=True). Every test under tests/interop is marked
`interop`; a failed one gets the last 100 lines of every peer log attached to its report.
Before each test, shared processes that an earlier test killed or stopped are started again on
their ports. Set FCA_KEEP_RUN=1 to keep $RUN after a passing session (it is kept after a failure).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.interop import peers as peer_cache
from tests.interop.procs import RunDir
from tests.interop.stacks import (
    DBGPT_HEARTBEAT_INTERVAL_S,
    DBGPT_HEARTBEAT_TIMEOUT_S,
    AdapterProc,
    DbgptCluster,
    FastChatStack,
    FastChatWorker,
    ReferenceWorkerProc,
    start_dbgpt_cluster,
    start_fastchat_stack,
)

HERE = Path(__file__).resolve().parent
SETUP_TIMEOUT_S = 1800.0  # a cold install is ~2 min; pip may be slow on a cold cache
STACK_TIMEOUT_S = 180.0
DEFAULT_DEADLINE_S = 300.0
# The console script of the project venv pytest runs in (absolute shebang).
ADAPTER_PROGRAM = Path(sys.executable).with_name("fastchat-adapter")

T = TypeVar("T")
_current_run: RunDir | None = None
_timings: dict[str, tuple[float, str]] = {}  # measurements, printed at the end of the session


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deadline(seconds): fail an interop test that runs longer (SIGALRM in the main thread)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.interop)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _current_run is not None and item.get_closest_marker("interop"):
        _current_run.failed = True
        report.sections.append(("peer process logs", _current_run.log_tails(100)))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _timings:
        terminalreporter.section("interop timings")
        for name, (value, unit) in _timings.items():
            terminalreporter.write_line(f"{name}: {value:.3f} {unit}".rstrip())


def pytest_keyboard_interrupt(excinfo: pytest.ExceptionInfo[BaseException]) -> None:
    if _current_run is not None:
        _current_run.failed = True  # keep $RUN: its logs and pids tell what was running


class _Launcher:
    """Starts installs and stacks in background threads, each at most once per session."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="peers")
        self._futures: dict[str, Future[Any]] = {}
        self._lock = threading.Lock()

    def _once(self, key: str, fn: Callable[[], T]) -> Future[T]:
        with self._lock:
            if key not in self._futures:
                self._futures[key] = self._pool.submit(fn)
            return self._futures[key]

    def fastchat_env(self) -> Future[peer_cache.PeerEnv]:
        return self._once("fastchat-env", lambda: peer_cache.ensure_env(peer_cache.FASTCHAT))

    def dbgpt_env(self, spec: peer_cache.EnvSpec = peer_cache.DBGPT) -> Future[peer_cache.PeerEnv]:
        return self._once(f"{spec.name}-env", lambda: peer_cache.ensure_env(spec))

    def models(self) -> Future[peer_cache.Models]:
        return self._once(
            "models",
            lambda: peer_cache.ensure_models(self.fastchat_env().result(SETUP_TIMEOUT_S)),
        )

    def peers(self) -> peer_cache.Peers:
        fc, db, models = self.fastchat_env(), self.dbgpt_env(), self.models()
        return peer_cache.Peers(
            fc.result(SETUP_TIMEOUT_S), db.result(SETUP_TIMEOUT_S), models.result(SETUP_TIMEOUT_S)
        )

    def fastchat_stack(self) -> Future[FastChatStack]:
        def start() -> FastChatStack:
            fc = self.fastchat_env().result(SETUP_TIMEOUT_S)
            return start_fastchat_stack(self.run, fc, self.models().result(SETUP_TIMEOUT_S))

        return self._once("fastchat-stack", start)

    def dbgpt_cluster(self, spec: peer_cache.EnvSpec = peer_cache.DBGPT) -> Future[DbgptCluster]:
        def start() -> DbgptCluster:
            env = self.dbgpt_env(spec).result(SETUP_TIMEOUT_S)
            return start_dbgpt_cluster(self.run, env, spec.name.replace(".", ""))

        return self._once(f"{spec.name}-cluster", start)

    def revive(self) -> None:
        """Restart processes of already started stacks that an earlier test left dead."""
        for key in ("fastchat-stack", "dbgpt-cluster", f"{peer_cache.DBGPT_075.name}-cluster"):
            future = self._futures.get(key)
            if future is not None and future.done() and future.exception() is None:
                future.result().revive()

    def close(self) -> None:
        self.run.stop_all()  # refuse new starts; stop what runs (unblocks waiting threads)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.run.stop_all()  # anything launched while we were stopping


@pytest.fixture(scope="session")
def interop_run() -> Iterator[RunDir]:
    global _current_run
    run = RunDir()
    _current_run = run
    yield run
    run.stop_all()
    _current_run = None
    run.cleanup(keep=run.failed or os.environ.get("FCA_KEEP_RUN") == "1")


@pytest.fixture(scope="session")
def _launcher(request: pytest.FixtureRequest, interop_run: RunDir) -> Iterator[_Launcher]:
    launcher = _Launcher(interop_run)
    needed = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    # Start every needed stack now, in parallel; the fixtures below only wait for them.
    if "fastchat_stack" in needed:
        launcher.fastchat_stack()
    if "dbgpt_cluster" in needed:
        launcher.dbgpt_cluster()
    if "dbgpt075_cluster" in needed:
        launcher.dbgpt_cluster(peer_cache.DBGPT_075)
    if "peers" in needed:
        launcher.models()
        launcher.dbgpt_env()
    yield launcher
    launcher.close()


@pytest.fixture(autouse=True)
def _deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test, wherever it blocks, once its deadline has passed. Session and module
    fixtures are set up before this one, so start-ups do not count against it."""
    marker = request.node.get_closest_marker("deadline")
    seconds = float(marker.args[0]) if marker else DEFAULT_DEADLINE_S
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"{request.node.nodeid} exceeded its deadline of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def _revive_shared_stacks(_launcher: _Launcher) -> None:
    """Tests may kill or stop shared processes (fault scenarios); the next test gets them back."""
    _launcher.revive()


@pytest.fixture(scope="session")
def peers(_launcher: _Launcher) -> peer_cache.Peers:
    return _launcher.peers()


@pytest.fixture(scope="session")
def fastchat_stack(_launcher: _Launcher) -> FastChatStack:
    return _launcher.fastchat_stack().result(SETUP_TIMEOUT_S + STACK_TIMEOUT_S)


@pytest.fixture(scope="session")
def dbgpt_cluster(_launcher: _Launcher) -> DbgptCluster:
    return _launcher.dbgpt_cluster().result(SETUP_TIMEOUT_S + STACK_TIMEOUT_S)


@pytest.fixture(scope="session")
def dbgpt075_cluster(_launcher: _Launcher) -> DbgptCluster:
    future = _launcher.dbgpt_cluster(peer_cache.DBGPT_075)
    return future.result(SETUP_TIMEOUT_S + STACK_TIMEOUT_S)


@pytest.fixture
def fastchat_worker_factory(
    request: pytest.FixtureRequest, interop_run: RunDir, peers: peer_cache.Peers
) -> Iterator[Callable[..., FastChatWorker]]:
    """Start a dedicated FastChat worker (own port and model name) for one test.

    start(model_name, *, register=True, embedding=False, port=None,
          limit_worker_concurrency=None, conv_template=None, seed=None, extra_args=())
    register=True registers it with fastchat_stack's controller; False passes --no-register.
    embedding=True serves the MiniLM model instead of tiny-vicuna.
    """
    started: list[FastChatWorker] = []

    def start(
        model_name: str,
        *,
        register: bool = True,
        embedding: bool = False,
        port: int | None = None,
        limit_worker_concurrency: int | None = None,
        conv_template: str | None = None,
        seed: int | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> FastChatWorker:
        controller_url = None
        if register:
            controller_url = request.getfixturevalue("fastchat_stack").controller_url
        worker = FastChatWorker(
            interop_run,
            _proc_name(f"worker-{len(started) + 1}-{model_name}", request),
            python=peers.fastchat.python,
            model_path=peers.models.embedding if embedding else peers.models.tiny_llm,
            model_name=model_name,
            controller_url=controller_url,
            port=port,
            limit_worker_concurrency=limit_worker_concurrency,
            conv_template=conv_template,
            seed=seed,
            extra_args=extra_args,
        )
        started.append(worker)
        return worker.start(same_port=port is not None)

    yield start
    for worker in reversed(started):
        worker.stop()
    if any(w.registered for w in started):
        # Drop the stopped workers from FastChat's controller now, not 90-180 s later.
        with httpx.Client(timeout=10, trust_env=False) as client:
            stack = request.getfixturevalue("fastchat_stack")
            client.post(stack.controller_url + "/refresh_all_workers")


@pytest.fixture
def dbgpt_cluster_factory(
    request: pytest.FixtureRequest, interop_run: RunDir, peers: peer_cache.Peers
) -> Iterator[Callable[..., DbgptCluster]]:
    """Start a fresh DB-GPT cluster for one test (a registry nobody else has touched).

    start(*, controller_addr=None, heartbeat_interval_secs=5, heartbeat_timeout_secs=15,
          registry=None)
    With controller_addr, only an apiserver is started, pointed at that address. `registry`:
    the controller's registry database table (HA; see stacks.dbgpt_toml).
    """
    started: list[DbgptCluster] = []

    def start(
        *,
        controller_addr: str | None = None,
        heartbeat_interval_secs: int = DBGPT_HEARTBEAT_INTERVAL_S,
        heartbeat_timeout_secs: int = DBGPT_HEARTBEAT_TIMEOUT_S,
        registry: Mapping[str, object] | None = None,
    ) -> DbgptCluster:
        cluster = start_dbgpt_cluster(
            interop_run,
            peers.dbgpt,
            _proc_name(f"dbgpt-{len(started) + 1}", request),
            controller_addr=controller_addr,
            heartbeat_interval_secs=heartbeat_interval_secs,
            heartbeat_timeout_secs=heartbeat_timeout_secs,
            registry=registry,
        )
        started.append(cluster)
        return cluster

    yield start
    for cluster in reversed(started):
        cluster.stop()


def start_adapter(
    run: RunDir,
    name: str,
    *,
    workers: tuple[str, ...] | list[str] = (),
    embedding_workers: tuple[str, ...] | list[str] = (),
    controllers: tuple[str, ...] | list[str] = (),
    wait_ready: bool = True,
    **options: Any,
) -> AdapterProc:
    """Create an AdapterProc and start it (or only launch it, with `wait_ready=False`)."""
    proc = AdapterProc(
        run,
        name,
        program=ADAPTER_PROGRAM,
        worker_addresses=workers,
        embedding_worker_addresses=embedding_workers,
        controller_addresses=controllers,
        **options,
    )
    return proc.start() if wait_ready else proc.launch()


@pytest.fixture
def adapter_factory(
    request: pytest.FixtureRequest, interop_run: RunDir
) -> Iterator[Callable[..., AdapterProc]]:
    """Start `fastchat-adapter serve` for one test; stopped (SIGTERM, by pid) afterwards.

    start(*, workers=(), embedding_workers=(), controllers=(), heartbeat_interval=1.0,
          status_interval=0.5, extra_args=(), wait_ready=True)
    No `controllers`: standalone mode (the adapter serves DB-GPT's controller API itself).
    """
    started: list[AdapterProc] = []

    def start(**options: Any) -> AdapterProc:
        # A start that fails stops its process itself (Proc.start).
        proc = start_adapter(
            interop_run, _proc_name(f"adapter-{len(started) + 1}", request), **options
        )
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def reference_worker_factory(
    request: pytest.FixtureRequest, interop_run: RunDir
) -> Iterator[Callable[..., ReferenceWorkerProc]]:
    """Start the project's reference worker (`fastchat-adapter reference-worker`) for one test.

    start(model_name, *, script=(), eos_after=None, conv_template_file=None)
    With a `script`, every reply is exactly those words in order (a scripted answer)."""
    started: list[ReferenceWorkerProc] = []

    def start(model_name: str, **options: Any) -> ReferenceWorkerProc:
        name = _proc_name(f"refworker-{len(started) + 1}-{model_name}", request)
        proc = ReferenceWorkerProc(
            interop_run, name, program=ADAPTER_PROGRAM, model_name=model_name, **options
        )
        started.append(proc)
        proc.start()
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


def _proc_name(prefix: str, request: pytest.FixtureRequest) -> str:
    """A file-name-safe process name that says which test started it."""
    test = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', prefix)}-{test}"[:100]


@pytest.fixture
def timing(request: pytest.FixtureRequest) -> Callable[..., None]:
    """timing(name, value, unit="s"): keep a measurement; all are printed at the end of the
    session (section "interop timings") and attached to the test's JUnit properties."""

    def record(name: str, value: float, unit: str = "s") -> None:
        _timings[name] = (value, unit)
        request.node.user_properties.append((name, round(value, 4)))

    return record


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        yield client
