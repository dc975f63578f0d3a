"""``adapter/server.py``: the SIGTERM order, against loopback fakes. First the in-process half
(``Runtime.begin_shutdown``, what SIGTERM does first), then the real CLI under a signal.

The order under test (adapter/server.py, adapter/registration.py): not ready, stop heartbeats,
hard-delete everywhere while streams still run, drain, exit 0; nothing registers again
afterwards. A second signal skips the drain but not the deregistration under way.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, cast

import httpx
import pytest
import uvicorn

from adapter import __version__
from adapter.app import create_app
from adapter.cli import ExitCode
from adapter.runtime import Runtime
from adapter.tools.reference_worker import ReferenceWorkerConfig
from tests.adapter.helpers import (
    DELETE,
    HEARTBEAT,
    REGISTER,
    controller_calls,
    eventually,
    free_port,
    hard_delete_query,
    in_process,
    settings_for,
    until_listed,
)
from tests.support.fake_controller import Call, FakeController
from tests.support.fake_worker import FakeWorker


async def test_deregistered_while_a_stream_is_still_open(tiny: FakeWorker) -> None:
    """Runtime.begin_shutdown is SIGTERM's first half: the hard delete must not wait for
    streams (uvicorn drains them only afterwards), and the stream still ends normally."""
    slow = ReferenceWorkerConfig(model_names=("slow",), tokens_per_second=20)
    with FakeWorker(slow) as worker, FakeController() as fake:
        config = settings_for(
            brisk=True, worker_address=[worker.url], controller_address=[fake.url]
        )
        app = create_app(config)
        runtime: Runtime = app.state.runtime
        request = {"model": "slow", "messages": [{"role": "human", "content": "hi"}]}
        request |= {"max_new_tokens": 30, "echo": False}
        async with in_process(app) as client:
            await until_listed(fake, {"slow@llm": True})
            stream = asyncio.create_task(client.post("/api/worker/generate_stream", json=request))
            await eventually(lambda: runtime.inflight.count > 0, what="a stream in flight")
            await runtime.begin_shutdown()
            [delete] = controller_calls(fake, DELETE)
            assert delete.query["remove_from_registry"] == "true"
            assert not stream.done()  # deregistered while the stream runs
            reply = await stream
            frames = [json.loads(f) for f in reply.content.split(b"\0") if f]
            assert frames[-1]["finish_reason"] in ("stop", "length")
            await asyncio.sleep(0.6)  # three heartbeat intervals
            assert [c for c in fake.calls if c.at > delete.at] == []


# --- the real CLI, SIGTERM with a stream in flight -------------------------------------

CLI = Path(sys.executable).with_name("fastchat-adapter")


@contextmanager
def _adapter_cli(
    tmp_path: Path, port: int, worker: str, controller: str | None, *extra: str
) -> Iterator[subprocess.Popen[bytes]]:
    """The real ``fastchat-adapter serve`` with fast heartbeats (standalone without a
    controller), then ``extra`` flags; output in adapter.log; killed at exit if a test left it
    running."""
    command = [
        str(CLI), "serve", "--port", str(port), "--worker-address", worker,
        "--heartbeat-interval", "0.2", "--status-interval", "0.2", "--shutdown-grace", "10",
        *(["--controller-address", controller] if controller else []), *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTCHAT_ADAPTER_")}
    with (tmp_path / "adapter.log").open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_cli_sigterm_deregisters_while_a_stream_runs_then_exits_zero(tmp_path: Path) -> None:
    slow = ReferenceWorkerConfig(model_names=("tiny",), tokens_per_second=15)
    with FakeWorker(slow) as worker, FakeController() as fake:
        port = free_port()
        with _adapter_cli(tmp_path, port, worker.url, fake.url) as proc:
            _wait_sync(lambda: controller_calls(fake, REGISTER, "tiny@llm"), 15)
            _wait_sync(lambda: controller_calls(fake, HEARTBEAT, "tiny@llm"), 5)
            frames, ended = _stream_across_sigterm(port, proc)
            assert proc.wait(timeout=20) == 0
        output = (tmp_path / "adapter.log").read_text(errors="replace")
        [delete] = controller_calls(fake, DELETE)
        assert delete.raw_query == hard_delete_query("tiny@llm", port), output
        assert [c for c in fake.calls if c.at > delete.at] == [], output  # nothing after
        assert fake.listing() == []
        if frames is not None:  # the worker API is there: the delete came mid-stream
            assert ended is not None and delete.done < ended, output
            assert frames[-1].get("finish_reason") in ("stop", "length"), frames[-1]


def _stream_across_sigterm(
    port: int, proc: subprocess.Popen[bytes]
) -> tuple[list[dict[str, object]] | None, float | None]:
    """Open a stream, SIGTERM the adapter after its first frame, read the stream to its end.
    Returns the frames and when the stream ended, or (None, None) without a worker API."""
    request = {
        "model": "tiny",
        "messages": [{"role": "human", "content": "hello"}],
        "max_new_tokens": 30,
        "echo": False,
    }
    url = f"http://127.0.0.1:{port}/api/worker/generate_stream"
    with (
        httpx.Client(trust_env=False, timeout=30) as client,
        client.stream("POST", url, json=request) as reply,
    ):
        if reply.status_code == 404:  # no worker API in this build: order without a stream
            proc.send_signal(signal.SIGTERM)
            return None, None
        buffer, frames, signalled = b"", [], False
        for data in reply.iter_raw():
            buffer += data
            *pieces, buffer = buffer.split(b"\0")
            frames += [json.loads(p) for p in pieces if p]
            if frames and not signalled:
                proc.send_signal(signal.SIGTERM)
                signalled = True
        return frames, time.monotonic()


def _wait_sync(found: object, timeout: float) -> list[Call]:
    deadline = time.monotonic() + timeout
    while not (result := found()):  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return list(result)


def test_cli_second_sigterm_still_deregisters_before_exiting(tmp_path: Path) -> None:
    # The second signal skips the drain, but not the deregistration already under way (it is
    # bounded): a stale healthy entry would break every chat of DB-GPT's RemoteLLMClient.
    # Slow heartbeats keep a call in flight, so the DELETE waits for it when SIGTERM comes.
    with (
        FakeWorker(ReferenceWorkerConfig(model_names=("tiny",))) as worker,
        FakeController() as fake,
    ):
        with _adapter_cli(tmp_path, free_port(), worker.url, fake.url) as proc:
            _wait_sync(lambda: controller_calls(fake, REGISTER, "tiny@llm"), 15)
            fake.delays["/api/controller/heartbeat"] = 1.0
            _wait_sync(lambda: [True] if fake.in_flight else [], 5)  # a slow heartbeat is out
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
        output = (tmp_path / "adapter.log").read_text(errors="replace")
        assert controller_calls(fake, DELETE), output
        _wait_sync(lambda: [True] if fake.listing() == [] else [], 5)


# --- the uvicorn internals AdapterServer relies on ------------------------------------------
# AdapterServer overrides uvicorn.Server's signal handling. If a uvicorn release renames or
# stops reading these, SIGTERM would no longer deregister first: fail here, loudly, instead.


def _source(function: object) -> str:
    return inspect.getsource(function)  # type: ignore[arg-type]


def test_uvicorn_installs_handle_exit_as_its_signal_handler() -> None:
    parameters = list(inspect.signature(uvicorn.Server.handle_exit).parameters)
    assert parameters == ["self", "sig", "frame"]
    assert "self.handle_exit" in _source(uvicorn.Server.capture_signals)


def test_uvicorn_main_loop_polls_should_exit_and_shutdown_reads_force_exit() -> None:
    assert "should_exit" in _source(uvicorn.Server.on_tick)
    assert "force_exit" in _source(uvicorn.Server.shutdown)
    assert "sockets" in inspect.signature(uvicorn.Server.serve).parameters
    config = inspect.signature(uvicorn.Config).parameters
    assert "timeout_graceful_shutdown" in config


# --- the start: bind first, then say what this process is ----------------------------------


def test_cli_port_in_use_exits_3_before_registering(tmp_path: Path) -> None:
    with (
        socket.socket() as taken,
        FakeWorker(ReferenceWorkerConfig(model_names=("tiny",))) as worker,
        FakeController() as fake,
    ):
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with _adapter_cli(tmp_path, port, worker.url, fake.url) as proc:
            assert proc.wait(timeout=20) == ExitCode.CANNOT_START == 3
        assert fake.calls == []  # nothing registered, so nothing to take back
    output = (tmp_path / "adapter.log").read_text(errors="replace")
    assert f"cannot listen on 127.0.0.1:{port}" in output, output
    assert "Traceback" not in output


_WITHOUT_HTTPTOOLS = (
    "import sys; sys.modules['httptools'] = None; "  # any import of it raises ImportError
    "from adapter.cli import main; sys.argv[0] = 'fastchat-adapter'; sys.exit(main())"
)


def test_cli_serves_on_h11_where_httptools_is_not_installed(tmp_path: Path) -> None:
    # httptools is a dependency, but an optional one for the code: h11 is the fallback.
    with FakeWorker(ReferenceWorkerConfig(model_names=("tiny",))) as worker:
        port = free_port()
        command = [sys.executable, "-c", _WITHOUT_HTTPTOOLS, "serve", "--port", str(port),
                   "--worker-address", worker.url]  # fmt: skip
        with (tmp_path / "adapter.log").open("wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while not _answers(f"http://127.0.0.1:{port}/readyz"):
                output = (tmp_path / "adapter.log").read_text(errors="replace")
                assert proc.poll() is None and time.monotonic() < deadline, output
                time.sleep(0.05)
            request = {"model": "tiny", "messages": [{"role": "human", "content": "hi"}]}
            url = f"http://127.0.0.1:{port}/api/worker/generate_stream"
            reply = httpx.post(url, json=request | {"max_new_tokens": 5}, timeout=30)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == ExitCode.OK
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    frames = [json.loads(f) for f in reply.content.split(b"\0") if f]
    assert reply.status_code == 200 and reply.headers["transfer-encoding"] == "chunked"
    assert frames[-1]["finish_reason"] in ("stop", "length"), frames
    assert "Traceback" not in (tmp_path / "adapter.log").read_text(errors="replace")


def _startup_line(tmp_path: Path, port: int, proc: subprocess.Popen[bytes]) -> str:
    """The adapter's first log line, once it serves; then SIGTERM and a clean exit."""
    url = f"http://127.0.0.1:{port}/readyz"
    deadline = time.monotonic() + 20
    while not _answers(url):
        assert proc.poll() is None and time.monotonic() < deadline, "the adapter did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == ExitCode.OK
    return (tmp_path / "adapter.log").read_text().splitlines()[0]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.ConnectError:  # bound, not accepting yet
        return False


def test_cli_startup_line_says_what_this_process_is(tmp_path: Path) -> None:
    with (
        FakeWorker(ReferenceWorkerConfig(model_names=("tiny",))) as worker,
        FakeController() as fake,
    ):
        port = free_port()
        with _adapter_cli(tmp_path, port, worker.url, fake.url) as proc:
            line = _startup_line(tmp_path, port, proc)
    assert " INFO fastchat_adapter.server " in line
    assert line.split(" fastchat_adapter.server ", 1)[1] == (
        f"fastchat-adapter {__version__} | mode registered, fan-out | "
        f"advertised http://127.0.0.1:{port} | listening 127.0.0.1:{port} | "
        f"workers llm {worker.url} | controllers {fake.url}"
    )


def test_cli_startup_line_as_json_fields(tmp_path: Path) -> None:
    with FakeWorker(ReferenceWorkerConfig(model_names=("tiny",))) as worker:
        port = free_port()
        extra = ("--log-format", "json", "--register-host", "adapter.local")
        with _adapter_cli(tmp_path, port, worker.url, None, *extra) as proc:
            line = json.loads(_startup_line(tmp_path, port, proc))
    assert (line["logger"], line["level"]) == ("fastchat_adapter.server", "info")
    assert line["mode"] == "standalone" and line["version"] == __version__
    assert line["advertised_url"] == f"http://adapter.local:{port}"
    assert line["listen"] == f"127.0.0.1:{port}"
    assert line["workers"] == [f"llm {worker.url}"]
    assert line["controllers"] == ["self (standalone)"]


# --- issue 12, items 5, 9 and 11: the grace running out, /readyz while draining -----------


def _read_stream(port: int, results: list[tuple[bytes, str]], started: threading.Event) -> None:
    """One long stream; appends (raw body, how it ended) to ``results``."""
    body = {"model": "tiny", "prompt": "hello", "max_new_tokens": 200, "echo": False}
    url = f"http://127.0.0.1:{port}/api/worker/generate_stream"
    raw, how = b"", "complete"
    try:
        with (
            httpx.Client(trust_env=False, timeout=30) as client,
            client.stream("POST", url, json=body) as reply,
        ):
            for data in reply.iter_raw():
                raw += data
                started.set()
    except httpx.HTTPError as exc:
        how = f"broken: {exc!r}"
    results.append((raw, how))


def _probe_until_exit(port: int, proc: subprocess.Popen[bytes]) -> set[str]:
    """Every distinct answer of /readyz from now until the process exits."""
    seen: set[str] = set()
    with httpx.Client(trust_env=False, timeout=5) as client:
        while proc.poll() is None:
            try:
                seen.add(str(client.get(f"http://127.0.0.1:{port}/readyz").status_code))
            except httpx.ConnectError:
                seen.add("refused")
            except httpx.HTTPError as exc:
                seen.add(type(exc).__name__)
            time.sleep(0.05)
    return seen


def test_cli_streams_cut_by_the_grace_get_an_error_frame_and_readyz_is_never_200(
    tmp_path: Path,
) -> None:
    slow = ReferenceWorkerConfig(model_names=("tiny",), tokens_per_second=5)  # 40 s streams
    with FakeWorker(slow) as worker, FakeController() as fake:
        port = free_port()
        grace = ("--shutdown-grace", "2", "--header-timeout", "1")
        with _adapter_cli(tmp_path, port, worker.url, fake.url, *grace) as proc:
            _wait_sync(lambda: controller_calls(fake, REGISTER, "tiny@llm"), 15)
            # Item 9 through the real CLI: a head that never completes is answered 408.
            assert _partial_head(port).startswith(b"HTTP/1.1 408")
            results: list[tuple[bytes, str]] = []
            started = [threading.Event() for _ in range(5)]
            readers = [
                threading.Thread(target=_read_stream, args=(port, results, event))
                for event in started
            ]
            for reader in readers:
                reader.start()
            for event in started:
                assert event.wait(15)
            proc.send_signal(signal.SIGTERM)
            readyz = _probe_until_exit(port, proc)
            for reader in readers:
                reader.join(30)
            assert proc.wait(timeout=20) == 0
        output = (tmp_path / "adapter.log").read_text(errors="replace")
    assert "200" not in readyz and readyz <= {"503", "refused"}, readyz
    assert len(results) == 5
    for raw, how in results:
        assert how == "complete", (how, output)
        assert raw.endswith(b"\0"), raw[-200:]
        last = json.loads([p for p in raw.split(b"\0") if p][-1])
        assert last["error_code"] == 50005 and "going away" in last["text"], last
    assert "Cancel" not in output  # uvicorn had nothing left to cancel when the grace ended


def _partial_head(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nhost: a\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


# --- accepting: a burst of connections in one turn of the event loop, under uvloop -----------


class _Accepted(asyncio.Protocol):
    """Keeps when each connection was accepted (``connection_made``)."""

    at: ClassVar[list[float]] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _Accepted.at.append(time.monotonic())


def test_a_burst_of_connections_is_accepted_in_one_turn_under_uvloop() -> None:
    # uvloop's libuv accepts one connection per listening handle per turn of the event loop;
    # a turn of a loaded adapter is milliseconds long, so a burst of new requests queued for a
    # turn each. AdapterServer.startup listens with ACCEPTS_PER_TURN handles.
    uvloop = pytest.importorskip("uvloop")
    from adapter.server import ACCEPTS_PER_TURN, AdapterServer, bind_socket

    turn = 0.03  # every turn of the loop runs this long (a loaded adapter's are ~10 ms)
    burst = ACCEPTS_PER_TURN
    _Accepted.at = []
    config = uvicorn.Config(cast(Any, None), http=_Accepted, lifespan="off", log_config=None)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]

    async def main() -> None:
        server = AdapterServer(config, cast(Runtime, None))
        config.load()
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        loop = asyncio.get_running_loop()
        clients: list[socket.socket] = []

        def busy() -> None:
            if not clients:  # the burst: all in the accept queue before the loop next polls
                clients.extend(socket.create_connection(("127.0.0.1", port)) for _ in range(burst))
            time.sleep(turn)
            loop.call_soon(busy)

        loop.call_soon(busy)
        deadline = time.monotonic() + 3
        while len(_Accepted.at) < burst and time.monotonic() < deadline:
            await asyncio.sleep(0)
        for client in clients:
            client.close()
        await server.shutdown(sockets=[sock])

    uvloop.run(main())
    assert len(_Accepted.at) == burst
    assert max(_Accepted.at) - min(_Accepted.at) < turn / 2  # one turn, not one turn each
    with pytest.raises(ConnectionRefusedError):  # every copy closed with its server
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
