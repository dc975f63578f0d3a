"""Probes, metrics, logs and the request guard, on the real app against real loopback workers.

The adapter runs in-process (ASGI transport plus its own lifespan) so a test can drive its
runtime directly (``begin_shutdown``); the FastChat workers are real servers on loopback.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from adapter.app import create_app
from adapter.logs import setup_logging
from adapter.metrics import CONTENT_TYPE
from adapter.registry import ModelRegistry
from adapter.runtime import VERSION, Runtime
from adapter.settings import Settings
from adapter.tools.reference_worker import ReferenceWorkerConfig
from adapter.tools.reference_worker import create_app as reference_app
from tests.support.servers import LoopbackServer

PROBES = ("/livez", "/readyz", "/metrics")


@pytest.fixture(scope="module")
def worker() -> Iterator[LoopbackServer]:
    with LoopbackServer(reference_app(ReferenceWorkerConfig(model_names=("ref",)))) as server:
        yield server


def settings_for(*workers: str, **values: Any) -> Settings:
    values.setdefault("status_interval", 0.05)
    return Settings(worker_address=list(workers), **values)


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://adapter") as client:
            yield client


def runtime_of(app: FastAPI) -> Runtime:
    runtime: Runtime = app.state.runtime
    return runtime


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def status_of(client: httpx.AsyncClient, path: str) -> int:
    return (await client.get(path)).status_code


def dead_server() -> LoopbackServer:
    """A server whose port is known and closed; ``start()`` brings it up later."""
    server = LoopbackServer(reference_app(ReferenceWorkerConfig(model_names=("late",))))
    server.start()
    server.stop()
    return server


# --- probes ----------------------------------------------------------------------------------


async def test_readyz_follows_startup_and_shutdown() -> None:
    upstream = dead_server()
    app = create_app(settings_for(upstream.url))
    try:
        async with serving(app) as client:
            reply = await client.get("/readyz")
            assert reply.status_code == 503
            assert reply.json()["status"] == "unavailable"
            assert "no FastChat worker answers" in reply.json()["reason"]
            assert (await client.get("/livez")).json() == {"status": "ok"}

            upstream.start()  # the first upstream answers: ready after the next poll
            await eventually(lambda: _is(client, "/readyz", 200))
            assert (await client.get("/readyz")).json() == {"status": "ok"}

            await runtime_of(app).begin_shutdown()  # what SIGTERM does first
            reply = await client.get("/readyz")
            assert reply.status_code == 503
            assert reply.json()["reason"] == "shutting down"
            assert await status_of(client, "/livez") == 200
    finally:
        upstream.stop()


async def test_livez_never_looks_at_upstreams() -> None:
    app = create_app(settings_for(dead_server().url))
    async with serving(app) as client:
        for _ in range(3):
            assert (await client.get("/livez")).json() == {"status": "ok"}
        assert await status_of(client, "/readyz") == 503


async def test_readyz_waits_for_registration_with_the_dbgpt_controller(
    worker: LoopbackServer,
) -> None:
    registry = ModelRegistry()
    from tests.support.fake_controller import controller_app

    controller = LoopbackServer(
        controller_app(registry, heartbeat_interval=5, heartbeat_timeout=15)
    )
    controller.start()
    controller.stop()
    settings = settings_for(worker.url, controller_address=[controller.url], heartbeat_interval=0.1)
    app = create_app(settings)
    try:
        async with serving(app) as client:
            await eventually(lambda: _alive(app))
            reply = await client.get("/readyz")
            assert reply.status_code == 503
            assert "not registered" in reply.json()["reason"]

            controller.start()
            await eventually(lambda: _is(client, "/readyz", 200))
            assert [i.model_name for i in registry.instances()] == ["ref@llm"]
    finally:
        controller.stop()


async def _is(client: httpx.AsyncClient, path: str, status: int) -> bool:
    return await status_of(client, path) == status


async def _alive(app: FastAPI) -> bool:
    return runtime_of(app).pool.any_alive()


# --- metrics ---------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


async def test_metrics_names_and_values_after_status_polls(worker: LoopbackServer) -> None:
    app = create_app(settings_for(worker.url, heartbeat_interval=0.1))
    async with serving(app) as client:
        await eventually(lambda: _is(client, "/readyz", 200))
        reply = await client.get("/metrics")
        assert reply.status_code == 200
        assert reply.headers["content-type"] == CONTENT_TYPE
        text = reply.text

    families = {f.name for f in text_string_to_metric_families(text)}
    assert all(name.startswith("fastchat_adapter_") for name in families)
    expected = {
        "upstream_queue_length", "upstream_speed", "upstream_up", "requests_in_flight",
        "requests", "time_to_first_frame_seconds", "request_duration_seconds",
        "frames_relayed", "upstream_errors", "heartbeats", "registered_models", "build_info",
    }  # fmt: skip
    assert {"fastchat_adapter_" + name for name in expected} <= families
    assert value(text, "fastchat_adapter_build_info", version=VERSION) == 1
    assert value(text, "fastchat_adapter_upstream_up", worker=worker.url) == 1
    labels = {"worker": worker.url, "model": "ref"}
    assert value(text, "fastchat_adapter_upstream_queue_length", **labels) == 0
    assert value(text, "fastchat_adapter_upstream_speed", **labels) == 1
    own_controller = settings_for(worker.url).effective_controllers[0]
    assert value(text, "fastchat_adapter_registered_models", controller=own_controller) == 1


async def test_request_metrics_after_worker_api_traffic(
    worker: LoopbackServer, json_log: io.StringIO
) -> None:
    app = create_app(settings_for(worker.url))
    request = {
        "model": "ref",
        "messages": [{"role": "human", "content": "Hello", "round_index": 0}],
        "echo": False,
        "max_new_tokens": 12,
    }
    async with serving(app) as client:
        await eventually(lambda: _is(client, "/readyz", 200))
        stream = await client.post("/api/worker/generate_stream", json=request)
        frames = [f for f in stream.content.split(b"\0") if f]
        assert frames and json.loads(frames[-1])["finish_reason"] == "length"
        assert (await client.post("/api/worker/generate", json=request)).status_code == 200
        unknown = await client.post("/api/worker/generate", json={**request, "model": "nope"})
        assert json.loads(unknown.content)["error_code"] != 0
        text = (await client.get("/metrics")).text

    def count(name: str, **labels: str) -> float | None:
        return value(text, "fastchat_adapter_" + name, **labels)

    assert count("requests_total", route="generate_stream", model="ref", outcome="ok") == 1
    assert count("requests_total", route="generate", model="ref", outcome="ok") == 1
    assert count("requests_total", route="generate", model="unknown", outcome="rejected") == 1
    assert count("requests_in_flight", route="generate_stream", model="ref") == 0
    assert count("frames_relayed_total", model="ref") == len(frames)  # streams only
    first_frames = count("time_to_first_frame_seconds_count", model="ref")
    assert first_frames is not None and first_frames >= 1
    assert count("request_duration_seconds_count", route="generate_stream", model="ref") == 1
    durations = count("request_duration_seconds_sum", route="generate_stream", model="ref")
    assert durations is not None and durations > 0

    access = [line for line in log_lines(json_log) if line["logger"] == "fastchat_adapter.access"]
    assert [(a["path"], a["model"]) for a in access if a["path"].startswith("/api/worker")] == [
        ("/api/worker/generate_stream", "ref"),
        ("/api/worker/generate", "ref"),
        ("/api/worker/generate", "nope"),
    ]
    assert not any("Hello" in json.dumps(line) for line in log_lines(json_log))  # no bodies


async def test_queue_length_metric_follows_the_worker() -> None:
    slow = ReferenceWorkerConfig(model_names=("slow",), tokens_per_second=20)
    with LoopbackServer(reference_app(slow)) as upstream:
        app = create_app(settings_for(upstream.url))
        labels = {"worker": upstream.url, "model": "slow"}
        async with serving(app) as client, httpx.AsyncClient() as direct:
            body = {"model": "slow", "prompt": "hi", "max_new_tokens": 40, "echo": False}
            url = upstream.url + "/worker_generate_stream"
            async with direct.stream("POST", url, json=body):  # held open, not read

                async def busy() -> bool:
                    text = (await client.get("/metrics")).text
                    return value(text, "fastchat_adapter_upstream_queue_length", **labels) == 1

                await eventually(busy)

            async def idle() -> bool:
                text = (await client.get("/metrics")).text
                return value(text, "fastchat_adapter_upstream_queue_length", **labels) == 0

            await eventually(idle)
            upstream.stop()

            async def down() -> bool:
                text = (await client.get("/metrics")).text
                return value(text, "fastchat_adapter_upstream_up", worker=upstream.url) == 0

            await eventually(down)


# --- logs ------------------------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
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


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_json_log_lines_parse_and_probes_stay_out_of_the_access_log(
    worker: LoopbackServer, json_log: io.StringIO
) -> None:
    app = create_app(settings_for(worker.url))
    async with serving(app) as client:
        await eventually(lambda: _is(client, "/readyz", 200))
        for path in PROBES:
            assert (await client.get(path)).status_code == 200
        reply = await client.get("/api/controller/models", headers={"x-request-id": "req-42"})
        assert reply.headers["x-request-id"] == "req-42"
        traced = {"db-gpt-trace-span-id": "trace1:span1"}
        await client.get("/api/controller/models", headers=traced)
        generated = (await client.get("/api/controller/models")).headers["x-request-id"]

    lines = log_lines(json_log)  # every line is one JSON object
    assert lines, "nothing was logged"
    for line in lines:
        assert {"ts", "level", "logger", "message", "request_id", "model"} <= set(line)
    access = [line for line in lines if line["logger"] == "fastchat_adapter.access"]
    assert [line["path"] for line in access] == ["/api/controller/models"] * 3
    assert [line["request_id"] for line in access] == ["req-42", "trace1:span1", generated]
    first = access[0]
    assert first["method"] == "GET" and first["status"] == 200
    assert isinstance(first["duration_ms"], float)
    assert first["message"].startswith("GET /api/controller/models 200 ")
    assert any(line["logger"] == "fastchat_adapter.pool" for line in lines)


def test_uvicorn_logs_go_through_our_handler(json_log: io.StringIO) -> None:
    stray = logging.StreamHandler(io.StringIO())
    logging.getLogger("uvicorn.error").addHandler(stray)  # as uvicorn's own log config does
    setup_logging("json", "info", json_log)
    assert stray not in logging.getLogger("uvicorn.error").handlers
    logging.getLogger("uvicorn.error").info("Uvicorn running", extra={"color_message": "ansi"})
    [line] = log_lines(json_log)
    assert line["logger"] == "uvicorn.error" and line["message"] == "Uvicorn running"
    assert "color_message" not in line
    logging.getLogger("httpx").info("HTTP Request: POST ...")  # status polls: too chatty
    assert len(log_lines(json_log)) == 1


def test_text_log_format_is_one_plain_line(json_log: io.StringIO) -> None:
    stream = io.StringIO()
    setup_logging("text", "info", stream)  # replaces the JSON handler of the fixture
    logging.getLogger("fastchat_adapter.test").info("hello %s", "there", extra={"k": 1})
    line = stream.getvalue()
    assert line.count("\n") == 1
    assert "INFO fastchat_adapter.test hello there k=1" in line
    assert json_log.getvalue() == ""


# --- guard: body limit and API key --------------------------------------------------------------


async def test_body_limit_by_content_length(worker: LoopbackServer) -> None:
    app = create_app(settings_for(worker.url, max_body_bytes=100))
    async with serving(app) as client:
        reply = await client.post("/api/worker/generate", content=b"x" * 101)
        assert reply.status_code == 413
        assert "exceeds the limit of 100 bytes" in reply.json()["detail"]

        reply = await client.post("/api/worker/generate_stream", content=b"x" * 101)
        assert reply.status_code == 413  # and a frame DB-GPT's stream reader can show
        assert reply.content.endswith(b"\0")
        frame = json.loads(reply.content[:-1])
        assert frame["error_code"] == 40302 and "exceeds the limit" in frame["text"]


async def test_body_limit_while_the_body_streams_in(worker: LoopbackServer) -> None:
    app = create_app(settings_for(worker.url, max_body_bytes=100))

    async def chunks(total: int) -> AsyncIterator[bytes]:
        body = json.dumps({"model_name": "m@llm", "host": "h" * total, "port": 1}).encode()
        for start in range(0, len(body), 16):
            yield body[start : start + 16]

    async with serving(app) as client:
        # No Content-Length: only counting the bytes as they arrive can catch it.
        reply = await client.post("/api/controller/models", content=chunks(200))
        assert reply.status_code == 413
        assert "exceeds the limit" in reply.json()["detail"]
        json_type = {"content-type": "application/json"}
        reply = await client.post("/api/controller/models", content=chunks(10), headers=json_type)
        assert reply.status_code == 200, reply.text  # a body under the limit goes through


async def test_body_limit_on_a_bare_asgi_app() -> None:
    from adapter.ops_api import GuardMiddleware

    async def echo(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * 40

    guarded = GuardMiddleware(echo, max_body_bytes=100, api_key=None)
    transport = httpx.ASGITransport(app=guarded)
    async with httpx.AsyncClient(transport=transport, base_url="http://guarded") as client:
        assert (await client.post("/anything", content=b"z" * 100)).content == b"z" * 100
        assert (await client.post("/anything", content=chunks())).status_code == 413


async def test_api_key_guards_only_the_worker_api(worker: LoopbackServer) -> None:
    app = create_app(settings_for(worker.url, api_key="s3cret"))
    good = {"authorization": "Bearer s3cret"}
    async with serving(app) as client:
        await eventually(lambda: _is(client, "/readyz", 200))
        body = {"model": "ref", "prompt": "hello"}
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "s3cret"}):
            reply = await client.post("/api/worker/count_token", json=body, headers=headers)
            assert reply.status_code == 401
            assert reply.headers["www-authenticate"] == "Bearer"
            assert "API key" in reply.json()["detail"]
        reply = await client.post("/api/worker/generate_stream", json=body)
        assert reply.status_code == 401
        assert json.loads(reply.content.rstrip(b"\0"))["error_code"] == 40101

        reply = await client.post("/api/worker/count_token", json=body, headers=good)
        assert reply.status_code == 200
        assert isinstance(reply.json(), int)
        for path in (*PROBES, "/api/controller/models"):
            assert await status_of(client, path) == 200
