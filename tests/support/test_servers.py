"""Self-tests of the loopback server: start, stop, restart on the same port, dropped streams."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from adapter.tools.reference_worker import ReferenceWorkerConfig, create_app
from tests.support.servers import LoopbackServer
from tests.support.worker_client import connect, queue_length, wait_for_queue_length


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    """The smallest ASGI app: any server must be able to serve a bare callable."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


def test_serves_any_asgi_app_on_a_free_loopback_port() -> None:
    server = LoopbackServer(hello)
    with pytest.raises(RuntimeError):
        _ = server.url
    with server:
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert httpx.get(server.url).text == "hello"
    assert not server.running


def test_restart_comes_back_on_the_same_port() -> None:
    with LoopbackServer(hello) as server:
        url = server.url
        server.stop()
        with pytest.raises(httpx.ConnectError):
            httpx.get(url)
        server.start()
        assert server.url == url
        assert httpx.get(url).text == "hello"
        server.restart()
        assert server.url == url
        assert httpx.get(url).text == "hello"


def test_stop_is_idempotent_and_start_twice_is_refused() -> None:
    server = LoopbackServer(hello)
    server.stop()
    with server, pytest.raises(RuntimeError):
        server.start()
    server.stop()


async def test_stop_drops_an_open_stream_like_a_dead_process(
    serve_app: Callable[..., LoopbackServer],
) -> None:
    server = serve_app(create_app(ReferenceWorkerConfig(tokens_per_second=5)))
    body = {"prompt": "hi", "max_new_tokens": 100}
    async with (
        connect(server.url) as client,
        client.stream("POST", "/worker_generate_stream", json=body) as response,
    ):
        chunks = response.aiter_bytes()
        await anext(chunks)
        await asyncio.to_thread(server.stop)
        with pytest.raises(httpx.RemoteProtocolError):
            async for _ in chunks:
                pass


async def test_a_restarted_worker_starts_with_an_empty_queue(
    serve_app: Callable[..., LoopbackServer],
) -> None:
    server = serve_app(create_app(ReferenceWorkerConfig(first_token_delay=30)))
    body = {"prompt": "hi", "max_new_tokens": 1}
    async with connect(server.url) as client:
        async with client.stream("POST", "/worker_generate_stream", json=body):
            await wait_for_queue_length(client, 1)
            await asyncio.to_thread(server.restart)
        assert await queue_length(client) == 0
