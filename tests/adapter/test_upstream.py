"""``adapter/upstream.py``: ``FastChatClient``'s failure labels, on hand-made bodies
(``httpx.MockTransport``): each failure of a stream is reported once, with the reason that names
what happened. Then, through the adapter: every call names its model, a refused connection, and
the idle timeout bounding ``count_token`` too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from adapter.errors import UpstreamError
from adapter.upstream import FastChatClient
from protocol.fastchat import GenerationParams
from tests.adapter.helpers import (
    MOCK_WORKER,
    StartFake,
    chat,
    mocked_worker,
    sent,
    serving,
    settings_for,
    stream,
    stream_ok,
    within,
)
from tests.support.fake_worker import Hang

WORKER = "http://worker"
PARAMS = GenerationParams(model="m", prompt="hi", max_new_tokens=4)
GOOD = b'{"text": "a", "error_code": 0}\0'


class Body(httpx.AsyncByteStream):
    """Writes ``parts`` in order; a float is a pause of that many seconds, an exception is
    raised where the transport would raise it."""

    def __init__(self, *parts: bytes | float | Exception) -> None:
        self.parts = parts
        self.closed = False
        self.pauses_done = 0  # pauses the reader waited out

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            if isinstance(part, float):
                await asyncio.sleep(part)
                self.pauses_done += 1
            elif isinstance(part, Exception):
                raise part
            else:
                yield part

    async def aclose(self) -> None:
        self.closed = True


def client_for(body: Body, idle_timeout: float = 5.0, status: int = 200) -> FastChatClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, stream=body)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    client = FastChatClient(http, idle_timeout=idle_timeout)
    client.lean_streams = False  # the httpx path; the lean reader: test_stream_reader.py
    return client


async def read(client: FastChatClient) -> tuple[list[dict[str, Any]], UpstreamError | None]:
    got: list[dict[str, Any]] = []
    try:
        async with client.generate_stream(WORKER, PARAMS) as chunks:
            await chunks.run(lambda batch: got.extend(batch) or False, drain_timeout=0)
    except UpstreamError as exc:
        return got, exc
    finally:
        await client._http.aclose()
    return got, None


async def test_clean_stream() -> None:
    body = Body(GOOD, b'{"text": "ab", "error_code": 0, "finish_reason": "stop"}\0')
    got, error = await read(client_for(body))
    assert [c["text"] for c in got] == ["a", "ab"] and error is None
    assert body.closed


async def test_body_ending_inside_a_frame_is_a_broken_stream() -> None:
    got, error = await read(client_for(Body(GOOD, b'{"text": "ab", "err')))
    assert len(got) == 1
    assert error is not None and error.reason == "broken_stream" and error.error_code == 50001
    assert "ended inside a frame (19 bytes without a NUL)" in str(error)


@pytest.mark.parametrize("ending", [b"", b'{"text": "b"}\0'], ids=["then_end", "then_more"])
async def test_a_bad_frame_is_malformed_whatever_follows(ending: bytes) -> None:
    got, error = await read(client_for(Body(GOOD + b"not json\0" + ending)))
    assert len(got) == 1
    assert error is not None and error.reason == "malformed"
    assert "frame at stream offset 31" in str(error)


async def test_a_bad_frame_is_reported_without_waiting_for_the_next_write() -> None:
    body = Body(GOOD + b"[1, 2]\0", 5.0, GOOD)
    _, error = await read(client_for(body, idle_timeout=10.0))
    assert error is not None and error.reason == "malformed" and "JSON list" in str(error)
    assert body.pauses_done == 0  # reported before the pause that precedes the next write
    assert body.closed


async def test_a_read_timeout_is_the_idle_timeout() -> None:
    # httpx's read timeout (set to the idle timeout) fires between reads; the loopback
    # tests in test_relay.py exercise the real timer.
    got, error = await read(client_for(Body(GOOD, httpx.ReadTimeout("")), idle_timeout=0.1))
    assert len(got) == 1
    assert error is not None and error.reason == "idle_timeout" and error.error_code == 50006
    assert str(error) == f"FastChat worker {WORKER}: idle_timeout: no frame for 0.1 s"


async def test_http_error_names_status_and_body() -> None:
    got, error = await read(client_for(Body(b'{"detail": "nope"}'), status=503))
    assert got == []
    assert error is not None and error.reason == "http_status"
    assert str(error) == f'FastChat worker {WORKER}: http_status: HTTP 503: {{"detail": "nope"}}'


@pytest.mark.parametrize(
    ("reply", "reason", "code"),
    [
        ({"count": 3, "error_code": 0}, None, 0),
        ({"count": "3"}, None, 0),  # lax int, as FastChat's own readers are
        ({"text": "boom", "error_code": 50001, "count": 0}, "in_band", 50001),
        ({"total": 3}, "malformed", 50001),
    ],
)
async def test_count_token_replies(reply: dict[str, Any], reason: str | None, code: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=reply)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = FastChatClient(http, idle_timeout=1.0)
        try:
            count: int | UpstreamError = await client.count_token(WORKER, "m", "hi")
        except UpstreamError as exc:
            count = exc
    if reason is None:
        assert count == 3
    else:
        assert isinstance(count, UpstreamError)
        assert (count.reason, count.error_code) == (reason, code)


@pytest.mark.parametrize(
    ("failure", "name"),
    [
        (httpx.ReadTimeout(""), "ReadTimeout"),
        (httpx.RemoteProtocolError("peer closed connection"), "RemoteProtocolError"),
    ],
)
async def test_an_error_body_that_breaks_is_still_an_http_status_error(
    failure: Exception, name: str
) -> None:
    # A 500 whose body then stalls or is cut: reading it for the message must not let the
    # raw httpx exception out (the relay would call it an adapter bug).
    got, error = await read(client_for(Body(b'{"detail": "half', failure), status=500))
    assert got == []
    assert error is not None and error.reason == "http_status"
    detail = f'HTTP 500: {{"detail": "half [body unreadable: {name}]'
    assert str(error) == f"FastChat worker {WORKER}: http_status: {detail}"


async def test_a_huge_error_body_is_not_read_whole() -> None:
    body = Body(b"x" * 400, b"y" * 400, 10.0, b"z" * 400)  # the pause: never reached
    _, error = await read(client_for(body, status=500))
    assert error is not None and str(error).endswith("HTTP 500: " + "x" * 400 + "y" * 100)
    assert body.pauses_done == 0  # stopped reading once it had enough


# --- through the adapter ---------------------------------------------------------------


async def test_every_call_names_the_model_of_a_multi_model_worker() -> None:
    async with mocked_worker(names=("a", "b")) as (client, mock):
        await stream_ok(client, {"model": "b", "messages": [{"role": "human", "content": "Hi"}]})
        for route in ("conv", "details", "count", "stream"):
            assert sent(mock, route)["model"] == "b", route


async def test_worker_refusing_the_connection_at_generate() -> None:
    async with mocked_worker() as (client, mock):
        mock["stream"].side_effect = httpx.ConnectError("connection refused")
        got = await stream_ok(client, {"model": "m", "prompt": "x", "chat_model": False})
    assert len(got) == 1 and got[0]["error_code"] == 50005
    assert got[0]["text"] == f"FastChat worker {MOCK_WORKER}: unreachable: connection refused"


async def test_a_worker_hanging_on_count_token_times_out_after_the_idle_timeout(
    fake_worker: StartFake,
) -> None:
    # A wedged (e.g. SIGSTOPped) worker hangs the first call of a request, count_token once the
    # template is cached: the idle timeout bounds that silence too, not a fixed 30 s (nor the
    # 20 s hang, which would then let the request succeed). Found in review.
    fake = fake_worker()
    settings = settings_for(fake.url, idle_timeout=0.5, always_count_tokens=True)
    async with serving(settings) as adapter:
        await stream(adapter.client, chat(max_new_tokens=2))  # template and details cached
        fake.fail_next(Hang(20.0, after_chunks=None), path="/count_token")
        status, frames = await within(
            15.0, stream(adapter.client, chat(max_new_tokens=2)), "a request hung on count_token"
        )
    assert status == 200 and len(frames) == 1
    assert frames[0]["error_code"] == 50006 and "idle_timeout" in frames[0]["text"]
