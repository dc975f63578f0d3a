"""``/api/worker/generate_stream`` end to end: the adapter and a fake FastChat worker, both real
uvicorn servers on loopback. Exact bytes, frame timing, keep-alives, every failure mode,
disconnects, and what each request costs upstream."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest

from adapter.tools.reference_worker import ReferenceWorkerConfig
from adapter.tools.scripted_model import SERVER_ERROR_MSG
from tests.adapter.helpers import (
    MODEL,
    STREAM,
    UPSTREAM_STREAM,
    calls,
    chat,
    eventually,
    serving,
    settings,
    split,
    stream,
    timed_pieces,
    vicuna_prompt,
)
from tests.support.fake_worker import (
    Abort,
    CloseMidStream,
    ErrorChunk,
    FakeWorker,
    Hang,
    HttpError,
    MalformedFrame,
    NewlineFraming,
    NoFinalChunk,
)
from tests.support.worker_client import connect, wait_for_queue_length

StartFake = Callable[..., FakeWorker]


def compact(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\0"


def output(text: str, finish: str | None = None, usage: Any = None) -> dict[str, Any]:
    """A legacy-form ModelOutput, keys in DB-GPT's order (PROTOCOLS.md §7.3)."""
    return {
        "text": text,
        "error_code": 0,
        "model_context": None,
        "finish_reason": finish,
        "usage": usage,
        "metrics": None,
    }


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def assert_slot_freed(fake: FakeWorker) -> None:
    """The worker saw the adapter leave, and its queue is empty again."""
    await fake.wait_for_disconnects(1)
    async with connect(fake.url) as worker:
        await wait_for_queue_length(worker, 0)


def only_error(frames: list[dict[str, Any]], code: int, *words: str) -> dict[str, Any]:
    """The last frame is the one error frame, naming every word; no other frame has an error."""
    assert [f["error_code"] for f in frames[:-1]] == [0] * (len(frames) - 1)
    last = frames[-1]
    assert last["error_code"] == code, last
    for word in words:
        assert word in last["text"], (word, last["text"])
    return last


# --- the happy path ----------------------------------------------------------------------


async def test_exact_downstream_bytes(fake_worker: StartFake) -> None:
    fake = fake_worker()
    async with serving(settings(fake.url)) as adapter:
        reply = await adapter.client.post(STREAM, json=chat(max_new_tokens=3))
    raw = reply.content
    assert reply.status_code == 200
    assert "content-type" not in reply.headers  # like FastChat's and DB-GPT's own streams
    prompt = vicuna_prompt("Hi")
    words = fake.model.reply(prompt, 3)
    tokens = fake.model.count_tokens(prompt)
    # FastChat sends token 0, token 2 (the last), then the finish chunk repeating the text,
    # whose usage is dropped so DB-GPT does not send the finish event twice (§8.4).
    assert raw == b"".join(
        [
            compact(output(words[0], usage=usage(tokens, 0))),
            compact(output(" ".join(words), usage=usage(tokens, 2))),
            compact(output(" ".join(words), finish="length")),
        ]
    )


async def test_each_upstream_frame_is_relayed_at_once(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(tokens_per_second=20, stream_interval=1))
    async with serving(settings(fake.url)) as adapter:
        await stream(adapter.client, chat(max_new_tokens=1))  # warm the template cache
        pieces = await timed_pieces(adapter.client, chat(max_new_tokens=6))
    # One downstream frame per upstream chunk: 6 tokens, then the finish chunk.
    assert len(pieces) == 7 and all(piece for _, piece in pieces)
    times = [t for t, _ in pieces]
    # Tokens come 50 ms apart upstream; buffered frames would arrive together at the end.
    gaps = [later - earlier for earlier, later in itertools.pairwise(times[:5])]
    assert all(gap > 0.02 for gap in gaps), gaps
    assert times[-1] - times[0] > 0.15


async def test_keepalive_frames_while_the_first_token_is_slow(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(first_token_delay=0.6))
    async with serving(settings(fake.url, keepalive_interval=0.1)) as adapter:
        pieces = await timed_pieces(adapter.client, chat(max_new_tokens=2))
    first_frame = next(i for i, (_, piece) in enumerate(pieces) if piece)
    keepalives = [t for t, piece in pieces[:first_frame]]
    assert all(not piece for _, piece in pieces[:first_frame])
    assert 3 <= len(keepalives) <= 7, keepalives
    assert all(piece for _, piece in pieces[first_frame:])  # none once tokens flow
    frames = split(b"".join(piece + b"\0" for _, piece in pieces))[0]
    assert frames[-1]["finish_reason"] == "length"


async def test_steady_state_costs_one_count_token_and_one_generate(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    async with serving(settings(fake.url)) as adapter:
        await stream(adapter.client, chat(max_new_tokens=2))
        first = calls(fake.requests)
        await stream(adapter.client, chat("Again", max_new_tokens=2))
        await stream(adapter.client, chat("More", max_new_tokens=2))
        later = calls(fake.requests)[len(first) :]
    assert sorted(first) == sorted(
        ["/worker_get_conv_template", "/model_details", "/count_token", UPSTREAM_STREAM]
    )
    assert later == ["/count_token", UPSTREAM_STREAM] * 2
    assert fake.disconnects == 0  # every exchange read to its end


async def test_metrics_and_inflight_accounting(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(first_token_delay=0.3))
    async with serving(settings(fake.url)) as adapter:
        task = asyncio.create_task(stream(adapter.client, chat(max_new_tokens=3)))
        await eventually(lambda: adapter.runtime.inflight.count == 1, what="in flight")
        labels = {"route": "generate_stream", "model": MODEL}
        assert adapter.sample("fastchat_adapter_requests_in_flight", **labels) == 1
        await task
        await eventually(lambda: adapter.runtime.inflight.count == 0, what="drained")
        assert adapter.sample("fastchat_adapter_requests_in_flight", **labels) == 0
        assert adapter.sample("fastchat_adapter_requests_total", **labels, outcome="ok") == 1
        assert adapter.sample("fastchat_adapter_frames_relayed_total", model=MODEL) == 3
        ttff = adapter.sample("fastchat_adapter_time_to_first_frame_seconds_sum", model=MODEL)
        assert 0.3 <= ttff < 5


# --- refused before generating -------------------------------------------------------------


async def test_unknown_model_is_an_in_band_error_naming_the_served_models(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    async with serving(settings(fake.url)) as adapter:
        status, frames = await stream(adapter.client, {**chat(), "model": "gpt-4"})
        labels = {"route": "generate_stream", "model": "unknown", "outcome": "rejected"}
        await eventually(
            lambda: adapter.sample("fastchat_adapter_requests_total", **labels) == 1,
            what="the request counted",
        )
    assert status == 200
    assert len(frames) == 1
    only_error(frames, 40301, "'gpt-4'", MODEL)
    assert calls(fake.requests) == []


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"messages": [{"role": "human", "content": "Hi"}]}, "model", 40001),
        ({"model": MODEL}, "messages", 40001),
        ({"model": MODEL, "prompt": "Hi", "max_new_tokens": 0}, "max_new_tokens", 40302),
        (
            {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
            "messages.0.role",
            40001,
        ),
    ],
)
async def test_invalid_body_is_422_with_one_error_frame_naming_the_field(
    fake_worker: StartFake, body: dict[str, Any], field: str, code: int
) -> None:
    fake = fake_worker()
    async with serving(settings(fake.url)) as adapter:
        reply = await adapter.client.post(STREAM, json=body)
    assert reply.status_code == 422
    frames, keepalives = split(reply.content)
    assert keepalives == 0 and len(frames) == 1
    only_error(frames, code, f"invalid request: {field}:")
    assert calls(fake.requests) == []


async def test_body_that_is_not_json_is_422(fake_worker: StartFake) -> None:
    fake = fake_worker()
    async with serving(settings(fake.url)) as adapter:
        reply = await adapter.client.post(STREAM, content=b"{nope")
    assert reply.status_code == 422
    only_error(split(reply.content)[0], 40001, "not JSON")


async def test_context_overflow_is_one_40303_frame_and_no_generate(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker(ReferenceWorkerConfig(context_length=64))
    async with serving(settings(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat("word " * 80))
    assert status == 200 and len(frames) == 1
    only_error(frames, 40303, "maximum context length is 64 tokens")
    assert fake.bodies(UPSTREAM_STREAM) == []
    assert calls(fake.requests)[-1] == "/count_token"


# --- upstream failures: one in-band error frame naming the worker and the cause -------------


async def test_worker_unreachable(fake_worker: StartFake) -> None:
    fake = fake_worker()
    async with serving(settings(fake.url)) as adapter:
        await stream(adapter.client, chat(max_new_tokens=1))
        fake.stop()
        status, frames = await stream(adapter.client, chat(max_new_tokens=1))
        assert status == 200 and len(frames) == 1
        only_error(frames, 50005, fake.url, "unreachable")
        # Marked down at once: the next request is refused without trying the worker.
        status, frames = await stream(adapter.client, chat(max_new_tokens=1))
        only_error(frames, 50005, "no live FastChat worker serves model", MODEL)
        labels = {"worker": fake.url, "model": MODEL, "reason": "unreachable"}
        assert adapter.sample("fastchat_adapter_upstream_errors_total", **labels) == 1


async def test_worker_http_error(fake_worker: StartFake) -> None:
    fake = fake_worker()
    fake.fail_next(HttpError())
    async with serving(settings(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=2))
    assert status == 200 and len(frames) == 1
    only_error(frames, 50001, fake.url, "http_status", "HTTP 500", "injected failure")


async def test_connection_dropped_mid_stream(fake_worker: StartFake) -> None:
    fake = fake_worker()
    fake.fail_next(CloseMidStream(after_chunks=1))
    async with serving(settings(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=6))
    assert status == 200 and len(frames) == 2
    assert frames[0]["text"] and frames[0]["error_code"] == 0
    only_error(frames, 50001, fake.url, "broken_stream")


async def test_malformed_frame(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(tokens_per_second=10))
    fake.fail_next(MalformedFrame(after_chunks=1))
    async with serving(settings(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=20))
    assert status == 200 and len(frames) == 2
    only_error(frames, 50001, fake.url, "malformed", "not UTF-8 JSON")
    await assert_slot_freed(fake)  # the rest of the stream was not waited for


async def test_stream_without_nul_framing(fake_worker: StartFake) -> None:
    fake = fake_worker()
    fake.fail_next(NewlineFraming())
    async with serving(settings(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=2))
    assert status == 200 and len(frames) == 1
    only_error(frames, 50001, fake.url, "broken_stream", "ended inside a frame")


@pytest.mark.parametrize("after_chunks", [1, None], ids=["mid_stream", "before_headers"])
async def test_idle_timeout(fake_worker: StartFake, after_chunks: int | None) -> None:
    fake = fake_worker()
    fake.fail_next(Hang(5.0, after_chunks=after_chunks))
    async with serving(settings(fake.url, idle_timeout=0.3)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=6))
    assert status == 200 and len(frames) == (after_chunks or 0) + 1
    only_error(frames, 50006, fake.url, "idle_timeout", "no frame for 0.3 s")
    await assert_slot_freed(fake)


async def test_in_band_error_chunk_is_forwarded_and_ends_the_stream(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    fake.fail_next(ErrorChunk(after_chunks=1, message="CUDA out of memory", error_code=50002))
    async with serving(settings(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=6))
        labels = {"worker": fake.url, "model": MODEL, "reason": "in_band"}
        assert adapter.sample("fastchat_adapter_upstream_errors_total", **labels) == 1
    assert status == 200 and len(frames) == 2
    error = only_error(frames, 50002)
    assert error == {
        **output(f"{SERVER_ERROR_MSG}\n\n(CUDA out of memory)"),
        "error_code": 50002,
    }


async def test_stream_without_finish_reason_gets_a_closing_frame(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    fake.fail_next(NoFinalChunk())
    async with serving(settings(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=3))
    words = " ".join(fake.model.reply(vicuna_prompt("Hi"), 3))
    assert status == 200 and [f["text"] for f in frames] == [words.split()[0], words, words]
    assert frames[-1] == output(words, finish="stop")


async def test_vllm_worker_shapes_are_normalised(fake_worker: StartFake) -> None:
    # vLLM: one chunk per token, the final payload twice (finish null, then set), exact usage,
    # cumulative_logprob; "abort" is not a finish reason DB-GPT survives (§1.11, §10 item 15).
    fake = fake_worker(flavor="vllm")
    fake.fail_next(Abort(after_chunks=2))
    async with serving(settings(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=6))
    assert status == 200
    assert [f["finish_reason"] for f in frames] == [None, None, None, "stop"]
    assert frames[-1]["usage"] is None  # same text as the frame before: no second finish event
    assert frames[-2]["usage"]["completion_tokens"] == 3
    assert all(set(f) == set(output("")) for f in frames)  # no cumulative_logprob


# --- disconnects: the worker's slot is freed at once -----------------------------------------


async def test_client_leaving_mid_stream_closes_the_upstream(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(tokens_per_second=10))
    async with serving(settings(fake.url)) as adapter:
        async with adapter.client.stream("POST", STREAM, json=chat(max_new_tokens=200)) as reply:
            async for data in reply.aiter_raw():
                assert b"\0" in data
                break
        await assert_slot_freed(fake)
        await eventually(lambda: adapter.runtime.inflight.count == 0, what="drained")
        labels = {"route": "generate_stream", "model": MODEL, "outcome": "client_gone"}
        assert adapter.sample("fastchat_adapter_requests_total", **labels) == 1  # after drain


async def test_client_leaving_before_the_first_token_closes_the_upstream(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker(ReferenceWorkerConfig(first_token_delay=30))
    async with serving(settings(fake.url)) as adapter:
        async with adapter.client.stream("POST", STREAM, json=chat(max_new_tokens=2)):
            await eventually(lambda: bool(fake.bodies(UPSTREAM_STREAM)), what="generate")
        await assert_slot_freed(fake)
        await eventually(lambda: adapter.runtime.inflight.count == 0, what="drained")
