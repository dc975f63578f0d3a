"""``adapter/ops_api.py``: the probes and the request guard (body limit, API key), on the real
app in-process (ASGI transport plus its own lifespan, so a test can drive its runtime directly,
e.g. ``begin_shutdown``) against real reference workers on loopback.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from adapter.app import create_app
from adapter.registry import ModelRegistry
from adapter.runtime import Runtime
from adapter.server import protocol_class
from adapter.tools.reference_worker import ReferenceWorkerConfig
from adapter.tools.reference_worker import create_app as reference_app
from tests.adapter.helpers import eventually, in_process, settings_for, status_is
from tests.support.servers import LoopbackServer

PROBES = ("/livez", "/readyz", "/metrics")


def runtime_of(app: FastAPI) -> Runtime:
    runtime: Runtime = app.state.runtime
    return runtime


async def status_of(client: httpx.AsyncClient, path: str) -> int:
    return (await client.get(path)).status_code


def dead_server() -> LoopbackServer:
    """A server whose port is known and closed; ``start()`` brings it up later."""
    server = LoopbackServer(reference_app(ReferenceWorkerConfig(model_names=("late",))))
    server.start()
    server.stop()
    return server


# --- probes --------------------------------------------------------------------------


async def test_readyz_follows_startup_and_shutdown() -> None:
    upstream = dead_server()
    app = create_app(settings_for(upstream.url, status_interval=0.05))
    try:
        async with in_process(app) as client:
            reply = await client.get("/readyz")
            assert reply.status_code == 503
            assert reply.json()["status"] == "unavailable"
            assert "no FastChat worker answers" in reply.json()["reason"]
            assert (await client.get("/livez")).json() == {"status": "ok"}

            upstream.start()  # the first upstream answers: ready after the next poll
            await eventually(lambda: status_is(client, "/readyz", 200), what="ready")
            assert (await client.get("/readyz")).json() == {"status": "ok"}

            await runtime_of(app).begin_shutdown()  # what SIGTERM does first
            reply = await client.get("/readyz")
            assert reply.status_code == 503
            assert reply.json()["reason"] == "shutting down"
            assert await status_of(client, "/livez") == 200
    finally:
        upstream.stop()


async def test_livez_never_looks_at_upstreams() -> None:
    app = create_app(settings_for(dead_server().url, status_interval=0.05))
    async with in_process(app) as client:
        for _ in range(3):
            assert (await client.get("/livez")).json() == {"status": "ok"}
        assert await status_of(client, "/readyz") == 503


async def test_readyz_waits_for_registration_with_the_dbgpt_controller(
    ref_worker: LoopbackServer,
) -> None:
    registry = ModelRegistry()
    from tests.support.fake_controller import controller_app

    controller = LoopbackServer(
        controller_app(registry, heartbeat_interval=5, heartbeat_timeout=15)
    )
    controller.start()
    controller.stop()
    settings = settings_for(
        ref_worker.url,
        controller_address=[controller.url],
        heartbeat_interval=0.1,
        status_interval=0.05,
    )
    app = create_app(settings)
    try:
        async with in_process(app) as client:
            await eventually(runtime_of(app).pool.any_alive, what="a live worker")
            reply = await client.get("/readyz")
            assert reply.status_code == 503
            assert "not registered" in reply.json()["reason"]

            controller.start()
            await eventually(lambda: status_is(client, "/readyz", 200), what="ready")
            assert [i.model_name for i in registry.instances()] == ["ref@llm"]
    finally:
        controller.stop()


# --- guard: body limit and API key ---------------------------------------------------


async def test_body_limit_by_content_length(ref_worker: LoopbackServer) -> None:
    app = create_app(settings_for(ref_worker.url, max_body_bytes=100, status_interval=0.05))
    async with in_process(app) as client:
        reply = await client.post("/api/worker/generate", content=b"x" * 101)
        assert reply.status_code == 413
        assert "exceeds the limit of 100 bytes" in reply.json()["detail"]

        reply = await client.post("/api/worker/generate_stream", content=b"x" * 101)
        assert reply.status_code == 413  # and a frame DB-GPT's stream reader can show
        assert reply.content.endswith(b"\0")
        frame = json.loads(reply.content[:-1])
        assert frame["error_code"] == 40302 and "exceeds the limit" in frame["text"]


async def test_body_limit_while_the_body_streams_in(ref_worker: LoopbackServer) -> None:
    config = settings_for(
        ref_worker.url, max_body_bytes=100, status_interval=0.05, controller_accept_workers=True
    )
    app = create_app(config)

    async def chunks(total: int) -> AsyncIterator[bytes]:
        body = json.dumps({"model_name": "m@llm", "host": "h" * total, "port": 1}).encode()
        for start in range(0, len(body), 16):
            yield body[start : start + 16]

    async with in_process(app) as client:
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


async def test_api_key_guards_only_the_worker_api(ref_worker: LoopbackServer) -> None:
    app = create_app(settings_for(ref_worker.url, api_key="s3cret", status_interval=0.05))
    good = {"authorization": "Bearer s3cret"}
    async with in_process(app) as client:
        await eventually(lambda: status_is(client, "/readyz", 200), what="ready")
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


# --- guard: Content-Length with Transfer-Encoding (issue 12, item 10) -------------------------


@pytest.mark.parametrize("parser", ["adapter's (httptools)", "h11"])
def test_content_length_with_transfer_encoding_is_400_and_closes(
    ref_worker: LoopbackServer, serve_app: Callable[..., LoopbackServer], parser: str
) -> None:
    # Under h11 the guard refuses it; httptools refuses it in its parser, and the adapter's
    # protocol then answers with the guard's words (adapter/connections.py).
    app = create_app(settings_for(ref_worker.url))
    runtime = app.state.runtime
    http = protocol_class(runtime.settings, runtime) if parser != "h11" else "h11"
    adapter = serve_app(app, http=http)
    smuggled = b"GET /api/worker/parameter/descriptions HTTP/1.1\r\nhost: a\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled
    request = (
        b"POST /api/worker/count_token HTTP/1.1\r\nhost: a\r\ncontent-type: application/json"
        b"\r\ncontent-length: %d\r\ntransfer-encoding: chunked\r\n\r\n" % len(body)
    ) + body
    with socket.create_connection(("127.0.0.1", adapter.port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):  # the server closes: EOF, not a timeout
            answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" in head.lower()
    assert b"Content-Length and Transfer-Encoding" in rest
    assert answer.count(b"HTTP/1.1") == 1  # the smuggled request was never answered
