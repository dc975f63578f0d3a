"""Self-tests of the fake FastChat worker: it is the reference worker, plus records and faults."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from adapter.tools.reference_worker import ReferenceWorkerConfig
from adapter.tools.scripted_model import SERVER_ERROR_MSG
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
    StartFake,
    slow_first_token,
)
from tests.support.worker_client import connect, split_frames, stream_raw, wait_for_queue_length

BODY = {"model": "m", "prompt": "USER: hi ASSISTANT:", "max_new_tokens": 6, "echo": False}
STREAM = "/worker_generate_stream"


def expected_texts(fake: FakeWorker, count: int) -> list[str]:
    words = fake.model.reply(str(BODY["prompt"]), count)
    return [" ".join(words[: i + 1]) for i in range(count)]


async def test_streams_like_the_reference_worker_and_records_requests(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    async with connect(fake.url) as client:
        _, raw = await stream_raw(client, BODY)
        await client.post("/worker_get_status", json={"model": "m"})
        await client.post("/count_token", content=b"not json")
    texts = expected_texts(fake, 6)
    frames = split_frames(raw)
    assert [f["text"] for f in frames] == [texts[0], texts[2], texts[4], texts[5], texts[5]]
    assert [(r.path, r.body) for r in fake.requests] == [
        (STREAM, BODY),
        ("/worker_get_status", {"model": "m"}),
        ("/count_token", None),
    ]
    assert fake.requests[-1].raw == b"not json"
    assert fake.bodies() == [BODY]
    assert fake.disconnects == 0


async def test_a_client_leaving_mid_stream_is_observed(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(tokens_per_second=5))
    async with connect(fake.url) as client:
        body = {**BODY, "max_new_tokens": 100}
        async with client.stream("POST", STREAM, json=body) as response:
            await anext(response.aiter_bytes())
        await fake.wait_for_disconnects(1)
        assert fake.disconnected.is_set()
        await wait_for_queue_length(client, 0)


async def test_http_error_replaces_the_next_reply_only(fake_worker: StartFake) -> None:
    fake = fake_worker()
    fake.fail_next(HttpError(), times=2)
    fake.fail_next(HttpError(503, b"busy", "text/plain; charset=utf-8"), path="/worker_get_status")
    async with connect(fake.url) as client:
        for _ in range(2):
            response, raw = await stream_raw(client, BODY)
            assert (response.status_code, json.loads(raw)) == (500, {"detail": "injected failure"})
        response, raw = await stream_raw(client, BODY)
        assert response.status_code == 200
        status = await client.post("/worker_get_status")
        assert (status.status_code, status.text) == (503, "busy")
        assert (await client.post("/worker_get_status")).status_code == 200
    assert len(fake.bodies()) == 3


async def test_close_mid_stream_drops_the_connection_after_n_chunks(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    fake.fail_next(CloseMidStream(after_chunks=2))
    received = b""
    async with connect(fake.url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", STREAM, json=BODY) as response:
                async for piece in response.aiter_bytes():
                    received += piece
        await wait_for_queue_length(client, 0)
    assert len(split_frames(received)) == 2


async def test_malformed_frame_is_slipped_into_the_stream(fake_worker: StartFake) -> None:
    fake = fake_worker()
    fake.fail_next(MalformedFrame(after_chunks=1))
    async with connect(fake.url) as client:
        _, raw = await stream_raw(client, BODY)
    pieces = raw.split(b"\0")
    assert pieces[1] == MalformedFrame().payload
    good = [json.loads(p) for i, p in enumerate(pieces[:-1]) if i != 1]
    assert [f["finish_reason"] for f in good] == [None, None, None, None, "length"]


async def test_newline_framing_replaces_every_nul(fake_worker: StartFake) -> None:
    fake = fake_worker()
    fake.fail_next(NewlineFraming())
    async with connect(fake.url) as client:
        _, raw = await stream_raw(client, BODY)
    assert b"\0" not in raw
    lines = [json.loads(line) for line in raw.splitlines()]
    assert lines[-1]["finish_reason"] == "length"


async def test_hang_mid_stream_trips_a_read_timeout(fake_worker: StartFake) -> None:
    fake = fake_worker()
    fake.fail_next(Hang(30, after_chunks=1))
    async with connect(fake.url, timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            async with client.stream("POST", STREAM, json=BODY) as response:
                async for _ in response.aiter_bytes():
                    pass
        await fake.wait_for_disconnects(1)  # the hang ends when the client leaves
        await wait_for_queue_length(client, 0)


async def test_hang_before_the_headers(fake_worker: StartFake) -> None:
    fake = fake_worker()
    fake.fail_next(Hang(0.3, after_chunks=None), path="/worker_get_status")
    async with connect(fake.url) as client:
        started = time.monotonic()
        assert (await client.post("/worker_get_status")).status_code == 200
        assert time.monotonic() - started >= 0.3


async def test_slow_first_token_delays_the_first_chunk_not_the_headers(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    fake.fail_next(slow_first_token(0.3))
    async with connect(fake.url) as client:
        started = time.monotonic()
        async with client.stream("POST", STREAM, json=BODY) as response:
            arrivals = [time.monotonic() - started async for _ in response.aiter_bytes()]
        assert arrivals[0] >= 0.3
        # With the first chunk 30 s away the headers still come: a hang guard well under
        # 30 s, not a measurement. Leaving ends the hang.
        fake.fail_next(slow_first_token(30))
        request = client.build_request("POST", STREAM, json=BODY)
        try:
            response = await asyncio.wait_for(client.send(request, stream=True), 10)
        except TimeoutError:
            raise AssertionError("the headers waited for the slow first token") from None
        assert response.status_code == 200
        await response.aclose()


async def test_error_chunk_is_fastchats_in_band_error(fake_worker: StartFake) -> None:
    fake = fake_worker()
    fake.fail_next(ErrorChunk(after_chunks=1))
    async with connect(fake.url) as client:
        response, raw = await stream_raw(client, BODY)
        await wait_for_queue_length(client, 0)
    frames = split_frames(raw)
    assert response.status_code == 200
    assert len(frames) == 2
    expected = {"text": f"{SERVER_ERROR_MSG}\n\n(boom)", "error_code": 50001}
    assert frames[-1] == expected
    assert raw.endswith(
        b'{"text": "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS '
        b'PAGE.**\\n\\n(boom)", "error_code": 50001}\0'
    )


async def test_no_final_chunk_ends_the_body_cleanly_without_a_finish_reason(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    fake.fail_next(NoFinalChunk())
    async with connect(fake.url) as client:
        _, raw = await stream_raw(client, BODY)
    frames = split_frames(raw)
    assert len(frames) == 4
    assert all(f["finish_reason"] is None for f in frames)


async def test_vllm_flavour_streams_every_token_and_the_final_payload_twice(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker(flavor="vllm")
    async with connect(fake.url) as client:
        _, raw = await stream_raw(client, {**BODY, "max_new_tokens": 3})
    frames = split_frames(raw)
    keys = ["text", "error_code", "usage", "cumulative_logprob", "finish_reason"]
    assert all(list(f) == keys for f in frames)
    texts = expected_texts(fake, 3)
    assert [f["text"] for f in frames] == [*texts, texts[-1]]
    assert [f["usage"]["completion_tokens"] for f in frames] == [1, 2, 3, 3]  # exact counts
    assert [f["finish_reason"] for f in frames] == [None, None, None, "length"]
    assert frames[-2] == {**frames[-1], "finish_reason": None}
    assert all(isinstance(f["cumulative_logprob"], list) for f in frames)


async def test_vllm_flavour_with_several_outputs_lists_finish_reasons(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker(flavor="vllm", vllm_outputs=2)
    async with connect(fake.url) as client:
        _, raw = await stream_raw(client, {**BODY, "max_new_tokens": 2})
    final = split_frames(raw)[-1]
    assert final["finish_reason"] == ["length", "length"]
    assert len(final["cumulative_logprob"]) == 2


@pytest.mark.parametrize("flavor", ["vllm", "model_worker"])
async def test_abort_finishes_the_stream_with_abort(fake_worker: StartFake, flavor: str) -> None:
    fake = fake_worker(flavor=flavor)
    fake.fail_next(Abort(after_chunks=1))
    async with connect(fake.url) as client:
        _, raw = await stream_raw(client, BODY)
        await wait_for_queue_length(client, 0)
    reasons = [f["finish_reason"] for f in split_frames(raw)]
    assert reasons == ([None, None, "abort"] if flavor == "vllm" else [None, "abort"])


async def test_a_stopped_worker_is_unreachable_until_restarted(fake_worker: StartFake) -> None:
    fake = fake_worker()
    url = fake.url
    fake.stop()
    async with connect(url) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post("/worker_get_status")
        await asyncio.to_thread(fake.restart)
        assert fake.url == url
        assert (await client.post("/worker_get_status")).status_code == 200
