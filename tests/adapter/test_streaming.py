"""``adapter/streaming.py``: the downstream half of a stream, through the real app on loopback.

No buffering (each upstream frame goes out before the next is read), keep-alive frames while
nothing else is sent, and a client that leaves: the producer is cancelled at once and the
upstream connection closed, so the FastChat worker frees its slot.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapter.tools.reference_worker import ReferenceWorkerConfig
from adapter.tools.reference_worker import create_app as reference_app
from tests.adapter.helpers import (
    MODEL,
    STREAM,
    UPSTREAM_STREAM,
    StartFake,
    assert_slot_freed,
    chat,
    eventually,
    serving,
    settings_for,
    split,
    timed_pieces,
    within,
)
from tests.support.servers import LoopbackServer


class Gate:
    """A worker whose ``/worker_generate_stream`` body goes out one message at a time, each
    only once the test has called ``open()``: a frame the adapter holds back can then never
    be followed by the next one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._turns = threading.Semaphore(0)

    def open(self) -> None:
        self._turns.release()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("path") != UPSTREAM_STREAM:
            await self.app(scope, receive, send)
            return

        async def gated(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                # Bounded, so a failing test cannot leave the worker's thread blocked for good.
                await asyncio.to_thread(self._turns.acquire, True, 10.0)
            await send(message)

        await self.app(scope, receive, gated)


async def test_each_upstream_frame_is_relayed_at_once(
    serve_app: Callable[..., LoopbackServer],
) -> None:
    gate = Gate(reference_app(ReferenceWorkerConfig(stream_interval=1)))
    worker = serve_app(gate)
    async with (
        serving(settings_for(worker.url)) as adapter,
        adapter.client.stream("POST", STREAM, json=chat(max_new_tokens=6)) as reply,
    ):
        raw = reply.aiter_raw()
        pending = b""

        async def next_piece() -> bytes:
            nonlocal pending
            while b"\0" not in pending:
                pending += await anext(raw)
            piece, pending = pending.split(b"\0", 1)
            return piece

        # One downstream frame per upstream chunk (6 tokens, then the finish chunk), each
        # while the worker still holds back the next: a buffered frame would never come.
        pieces = []
        for number in range(1, 8):
            gate.open()
            what = f"downstream frame {number} while the worker holds chunk {number + 1}"
            pieces.append(await within(5.0, next_piece(), what))
        rest = [data async for data in raw]
    assert pending == b"" and rest == []
    frames, keepalives = split(b"".join(piece + b"\0" for piece in pieces))
    assert keepalives == 0 and len(frames) == 7
    assert frames[-1]["finish_reason"] == "length"


async def test_concurrent_slow_streams_each_get_their_keepalives(fake_worker: StartFake) -> None:
    # One timer serves every open stream (streaming._KeepaliveClock): each still gets its own.
    fake = fake_worker(ReferenceWorkerConfig(first_token_delay=0.6))
    interval = 0.1
    async with serving(settings_for(fake.url, keepalive_interval=interval)) as adapter:
        both = await asyncio.gather(
            *(timed_pieces(adapter.client, chat(max_new_tokens=2)) for _ in range(2))
        )
    for pieces in both:
        first_frame = next(i for i, (_, piece) in enumerate(pieces) if piece)
        assert first_frame >= 3, pieces  # keep-alives (b"") before the first token
        frames = split(b"".join(piece + b"\0" for _, piece in pieces))[0]
        assert frames[-1]["finish_reason"] == "length"


async def test_keepalive_frames_while_the_first_token_is_slow(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(first_token_delay=0.6))
    interval = 0.1
    async with serving(settings_for(fake.url, keepalive_interval=interval)) as adapter:
        pieces = await timed_pieces(adapter.client, chat(max_new_tokens=2))
    first_frame = next(i for i, (_, piece) in enumerate(pieces) if piece)
    keepalives = [t for t, piece in pieces[:first_frame]]
    assert all(not piece for _, piece in pieces[:first_frame])
    # At most one per interval of silence: however late the first token came (a loaded
    # machine), no more keep-alives than intervals before it.
    first_frame_at = pieces[first_frame][0]
    assert 3 <= len(keepalives) <= first_frame_at / interval + 1, (keepalives, first_frame_at)
    assert all(piece for _, piece in pieces[first_frame:])  # none once tokens flow
    frames = split(b"".join(piece + b"\0" for _, piece in pieces))[0]
    assert frames[-1]["finish_reason"] == "length"


# --- disconnects: the worker's slot is freed at once --------------------------------------


async def test_client_leaving_mid_stream_closes_the_upstream(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(tokens_per_second=10))
    async with serving(settings_for(fake.url)) as adapter:
        async with adapter.client.stream("POST", STREAM, json=chat(max_new_tokens=200)) as reply:
            async for data in reply.aiter_raw():
                assert b"\0" in data
                break
        await assert_slot_freed(fake)
        await eventually(lambda: adapter.runtime.inflight.count == 0, what="drained")
        labels = {"route": "generate_stream", "model_name": MODEL, "outcome": "client_gone"}
        assert adapter.sample("fastchat_adapter_requests_total", **labels) == 1  # after drain


async def test_client_leaving_before_the_first_token_closes_the_upstream(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker(ReferenceWorkerConfig(first_token_delay=30))
    async with serving(settings_for(fake.url)) as adapter:
        async with adapter.client.stream("POST", STREAM, json=chat(max_new_tokens=2)):
            await eventually(lambda: bool(fake.bodies(UPSTREAM_STREAM)), what="generate")
        await assert_slot_freed(fake)
        await eventually(lambda: adapter.runtime.inflight.count == 0, what="drained")
