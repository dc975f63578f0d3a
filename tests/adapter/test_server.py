"""Deregistration at shutdown, and the standalone controller, against loopback fakes.

The SIGTERM order under test (adapter/server.py, adapter/registration.py): not ready, stop
heartbeats, hard-delete everywhere while streams still run, drain, exit 0; nothing registers
again afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from adapter.app import create_app
from adapter.registration import SERVICE_KEY
from adapter.runtime import Runtime
from adapter.tools.reference_worker import ReferenceWorkerConfig
from tests.adapter._registration import (
    DELETE,
    HEARTBEAT,
    REGISTER,
    calls,
    eventually,
    free_port,
    running,
    serving,
    settings,
    until_listed,
)
from tests.support.fake_controller import Call, FakeController
from tests.support.fake_worker import FakeWorker


@pytest.fixture
def tiny() -> Iterator[FakeWorker]:
    with FakeWorker(ReferenceWorkerConfig(model_names=("tiny",))) as fake:
        yield fake


def hard_delete_query(key: str, port: int) -> str:
    name = key.replace("@", "%40")
    return f"model_name={name}&host=127.0.0.1&port={port}&remove_from_registry=true"


async def test_shutdown_hard_deletes_everything_everywhere_and_nothing_returns(
    tiny: FakeWorker,
) -> None:
    with (
        FakeWorker(ReferenceWorkerConfig(model_names=("emb",))) as embedder,
        FakeController() as one,
        FakeController() as two,
    ):
        config = settings(
            worker_address=[tiny.url],
            embedding_worker_address=[embedder.url],
            controller_address=[one.url, two.url],
            register_service=True,
        )
        keys = ["tiny@llm", "emb@text2vec", SERVICE_KEY]
        async with running(config) as runtime:
            for fake in (one, two):
                await _wait(fake, HEARTBEAT, "tiny@llm", 2)
            await runtime.begin_shutdown()
            assert not runtime.ready
            for fake in (one, two):
                deletes = calls(fake, DELETE)
                assert sorted(c.raw_query for c in deletes) == sorted(
                    hard_delete_query(key, config.port) for key in keys
                )
                assert await asyncio.to_thread(fake.listing) == []
            last = max(c.at for fake in (one, two) for c in fake.calls)
            tiny.stop()  # a pool event after shutdown must not send anything either
            await asyncio.sleep(1.0)  # five heartbeat intervals
        for fake in (one, two):
            assert [c for c in fake.calls if c.at > last] == []
            assert fake.listing() == []


async def test_a_call_in_flight_at_shutdown_lands_before_the_delete(tiny: FakeWorker) -> None:
    with FakeController() as fake:
        config = settings(worker_address=[tiny.url], controller_address=[fake.url])
        async with running(config) as runtime:
            await until_listed(fake, {"tiny@llm": True})
            fake.delays["/api/controller/heartbeat"] = 0.5  # the next heartbeat is slow
            await eventually(lambda: fake.in_flight > 0, what="a heartbeat in flight")
            await runtime.begin_shutdown()
            [delete] = calls(fake, DELETE)
            slow = calls(fake, HEARTBEAT)[-1]
            assert slow.done <= delete.at  # applied first, so the delete wins
            assert await asyncio.to_thread(fake.listing) == []


async def test_shutdown_is_bounded_when_a_controller_hangs(tiny: FakeWorker) -> None:
    with FakeController() as stuck, FakeController() as fine:
        config = settings(worker_address=[tiny.url], controller_address=[stuck.url, fine.url])
        async with running(config) as runtime:
            for fake in (stuck, fine):
                await until_listed(fake, {"tiny@llm": True})
            stuck.delays["/api/controller/models"] = 30
            started = time.monotonic()
            await runtime.begin_shutdown()
            assert time.monotonic() - started < 2.5  # one short timeout, calls concurrent
            assert await asyncio.to_thread(fine.listing) == []
        stuck.delays.clear()


async def test_deregistered_while_a_stream_is_still_open(tiny: FakeWorker) -> None:
    """Runtime.begin_shutdown is SIGTERM's first half: the hard delete must not wait for
    streams (uvicorn drains them only afterwards), and the stream still ends normally."""
    slow = ReferenceWorkerConfig(model_names=("slow",), tokens_per_second=20)
    with FakeWorker(slow) as worker, FakeController() as fake:
        config = settings(worker_address=[worker.url], controller_address=[fake.url])
        app = create_app(config)
        runtime: Runtime = app.state.runtime
        request = {"model": "slow", "messages": [{"role": "human", "content": "hi"}]}
        request |= {"max_new_tokens": 30, "echo": False}
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://adapter"
            ) as client,
        ):
            await until_listed(fake, {"slow@llm": True})
            stream = asyncio.create_task(client.post("/api/worker/generate_stream", json=request))
            await eventually(lambda: runtime.inflight.count > 0, what="a stream in flight")
            await runtime.begin_shutdown()
            [delete] = calls(fake, DELETE)
            assert delete.query["remove_from_registry"] == "true"
            assert not stream.done()  # deregistered while the stream runs
            reply = await stream
            frames = [json.loads(f) for f in reply.content.split(b"\0") if f]
            assert frames[-1]["finish_reason"] in ("stop", "length")
            await asyncio.sleep(0.6)  # three heartbeat intervals
            assert [c for c in fake.calls if c.at > delete.at] == []


async def test_lifespan_end_without_a_signal_still_deregisters(tiny: FakeWorker) -> None:
    with FakeController() as fake:
        config = settings(worker_address=[tiny.url], controller_address=[fake.url])
        async with running(config):  # leaving calls Runtime.stop() only
            await until_listed(fake, {"tiny@llm": True})
        assert fake.listing() == []
        [delete] = calls(fake, DELETE)
        assert delete.query["remove_from_registry"] == "true"


# --- standalone: the adapter is the controller --------------------------------------------


async def test_standalone_serves_the_controller_api_with_its_own_models(tiny: FakeWorker) -> None:
    config = settings(worker_address=[tiny.url], heartbeat_interval=30)
    assert config.standalone
    app = create_app(config)
    runtime: Runtime = app.state.runtime
    async with (
        serving(app, config.port) as server,
        httpx.AsyncClient(base_url=server.url, trust_env=False) as client,
    ):
        assert (await client.get("/api/health")).json() == {"status": "ok"}
        [own] = (await client.get("/api/controller/models", params={"healthy_only": "1"})).json()
        assert (own["model_name"], own["host"], own["port"]) == (
            "tiny@llm",
            "127.0.0.1",
            config.port,
        )
        assert (await client.get("/readyz")).status_code == 200  # registered at once
        # Any DB-GPT worker may register here too, as with a real controller.
        other = {"model_name": "other@llm", "host": "10.0.0.9", "port": 1}
        assert (await client.post("/api/controller/heartbeat", json=other)).json() is True
        listed = (await client.get("/api/controller/models")).json()
        assert [i["model_name"] for i in listed] == ["tiny@llm", "other@llm"]
        assert runtime.ready
        tiny.stop()
        await eventually(lambda: not runtime.pool.any_alive(), timeout=2)
        [own] = (await client.get("/api/controller/models?model_name=tiny%40llm")).json()
        assert own["healthy"] is False  # soft delete into our own registry


async def test_no_controller_api_when_a_controller_is_given(tiny: FakeWorker) -> None:
    with FakeController() as fake:
        app = create_app(settings(worker_address=[tiny.url], controller_address=[fake.url]))
        routes = {getattr(route, "path", "") for route in app.routes}
        assert "/api/controller/models" not in routes and "/api/health" not in routes


# --- the real CLI, SIGTERM with a stream in flight -----------------------------------------

CLI = Path(sys.executable).with_name("fastchat-adapter")


@contextmanager
def _adapter_cli(
    tmp_path: Path, port: int, worker: str, controller: str
) -> Iterator[subprocess.Popen[bytes]]:
    """The real ``fastchat-adapter serve`` with fast heartbeats; output in adapter.log; killed
    at exit if a test left it running."""
    command = [
        str(CLI), "serve", "--port", str(port), "--worker-address", worker,
        "--controller-address", controller, "--heartbeat-interval", "0.2",
        "--status-interval", "0.2", "--shutdown-grace", "10",
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
        started = time.monotonic()
        with _adapter_cli(tmp_path, port, worker.url, fake.url) as proc:
            registered = _wait_sync(lambda: calls(fake, REGISTER, "tiny@llm"), 15)[0]
            print(f"\nCLI spawn -> registered: {1000 * (registered.at - started):.0f} ms")
            _wait_sync(lambda: calls(fake, HEARTBEAT, "tiny@llm"), 5)
            frames, ended = _stream_across_sigterm(port, proc)
            assert proc.wait(timeout=20) == 0
        output = (tmp_path / "adapter.log").read_text(errors="replace")
        [delete] = calls(fake, DELETE)
        assert delete.raw_query == hard_delete_query("tiny@llm", port), output
        assert [c for c in fake.calls if c.at > delete.at] == [], output  # nothing after
        assert fake.listing() == []
        if frames is not None:  # the worker API is there: the delete came mid-stream
            assert ended is not None and delete.done < ended, output
            print(f"hard DELETE {1000 * (ended - delete.done):.0f} ms before the stream ended")
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


async def _wait(fake: FakeController, kind: tuple[str, str], key: str, count: int) -> None:
    await eventually(lambda: len(calls(fake, kind, key)) >= count, what=f"{count} x {kind}")


def test_cli_second_sigterm_still_deregisters_before_exiting(tmp_path: Path) -> None:
    # The second signal skips the drain, but not the deregistration already under way (it is
    # bounded): a stale healthy entry would break every chat of DB-GPT's RemoteLLMClient.
    # Slow heartbeats keep a call in flight, so the DELETE waits for it when SIGTERM comes.
    with (
        FakeWorker(ReferenceWorkerConfig(model_names=("tiny",))) as worker,
        FakeController() as fake,
    ):
        with _adapter_cli(tmp_path, free_port(), worker.url, fake.url) as proc:
            _wait_sync(lambda: calls(fake, REGISTER, "tiny@llm"), 15)
            fake.delays["/api/controller/heartbeat"] = 1.0
            _wait_sync(lambda: [True] if fake.in_flight else [], 5)  # a slow heartbeat is out
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
        output = (tmp_path / "adapter.log").read_text(errors="replace")
        assert calls(fake, DELETE), output
        _wait_sync(lambda: [True] if fake.listing() == [] else [], 5)
