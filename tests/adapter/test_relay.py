"""``adapter/relay.py``: one generation from a DB-GPT request to DB-GPT frames, end to end.

Against fake FastChat workers on loopback (``serving``): the exact downstream bytes, what a
steady-state request costs upstream, the refusals before generating, every upstream failure as
one in-band error frame, and the drain after the final chunk. Against a respx worker
(``mocked_worker``, in-process): exactly what the adapter sends FastChat, each body compared
whole so a stray key or a ``null`` fails the test (docs/protocol.md §1.2, §9.2).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapter.relay import DRAIN_TIMEOUT
from adapter.tools.reference_worker import ReferenceWorkerConfig
from adapter.tools.scripted_model import SERVER_ERROR_MSG
from protocol.conversation import render_prompt
from tests.adapter.helpers import (
    MODEL,
    STREAM,
    UPSTREAM_STREAM,
    ZERO_SHOT,
    StartFake,
    assert_slot_freed,
    chat,
    eventually,
    mocked_worker,
    only_error,
    sent,
    serving,
    settings_for,
    stream,
    stream_ok,
    upstream_paths,
    vicuna_prompt,
    within,
)
from tests.support.fake_worker import (
    Abort,
    CloseMidStream,
    ErrorChunk,
    Hang,
    HttpError,
    MalformedFrame,
    NewlineFraming,
    NoFinalChunk,
)
from tests.support.worker_client import connect, wait_for_queue_length


def compact(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\0"


def output(text: str, finish: str | None = None, usage: Any = None) -> dict[str, Any]:
    """A legacy-form ModelOutput, keys in DB-GPT's order (docs/protocol.md §7.3)."""
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


# --- the happy path ------------------------------------------------------------------


async def test_exact_downstream_bytes(fake_worker: StartFake) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url)) as adapter:
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


async def test_steady_state_costs_one_generate_when_the_clamp_cannot_bind(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url)) as adapter:
        await stream(adapter.client, chat(max_new_tokens=2))
        first = upstream_paths(fake.requests)
        await stream(adapter.client, chat("Again", max_new_tokens=2))
        await stream(adapter.client, chat("More", max_new_tokens=2))
        later = upstream_paths(fake.requests)[len(first) :]
    assert sorted(first) == sorted(["/worker_get_conv_template", "/model_details", UPSTREAM_STREAM])
    assert later == [UPSTREAM_STREAM] * 2
    assert fake.disconnects == 0  # every exchange read to its end


async def test_always_count_tokens_asks_count_token_for_every_request(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url, always_count_tokens=True)) as adapter:
        await stream(adapter.client, chat(max_new_tokens=2))
        first = upstream_paths(fake.requests)
        await stream(adapter.client, chat("Again", max_new_tokens=2))
        later = upstream_paths(fake.requests)[len(first) :]
    assert "/count_token" in first
    assert later == ["/count_token", UPSTREAM_STREAM]


@pytest.mark.parametrize("max_new_tokens", [None, 60], ids=["no_max_new_tokens", "may_bind"])
async def test_the_exact_count_is_asked_when_it_can_change_max_new_tokens(
    fake_worker: StartFake, max_new_tokens: int | None
) -> None:
    # 64 tokens of context: the bound on "word " * 4 (its bytes plus a margin) plus 60 tokens
    # does not fit, so the count decides; the clamp binds: min(60, 64 - count - 1).
    fake = fake_worker(ReferenceWorkerConfig(context_length=64))
    prompt_text = "word " * 4
    async with serving(settings_for(fake.url)) as adapter:
        status, frames = await stream(
            adapter.client, chat(prompt_text, max_new_tokens=max_new_tokens)
        )
    assert status == 200 and frames[-1]["error_code"] == 0
    assert upstream_paths(fake.requests)[-2:] == ["/count_token", UPSTREAM_STREAM]
    tokens = fake.model.count_tokens(vicuna_prompt(prompt_text))
    assert fake.bodies(UPSTREAM_STREAM)[-1]["max_new_tokens"] == 64 - tokens - 1


# --- refused before generating -------------------------------------------------------


async def test_unknown_model_is_an_in_band_error_naming_the_served_models(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url)) as adapter:
        status, frames = await stream(adapter.client, {**chat(), "model": "gpt-4"})
        labels = {"route": "generate_stream", "model_name": "unknown", "outcome": "rejected"}
        await eventually(
            lambda: adapter.sample("fastchat_adapter_requests_total", **labels) == 1,
            what="the request counted",
        )
    assert status == 200
    assert len(frames) == 1
    only_error(frames, 40301, "'gpt-4'", MODEL)
    assert upstream_paths(fake.requests) == []


async def test_context_overflow_is_one_40303_frame_and_no_generate(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker(ReferenceWorkerConfig(context_length=64))
    async with serving(settings_for(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat("word " * 80))
    assert status == 200 and len(frames) == 1
    only_error(frames, 40303, "maximum context length is 64 tokens")
    assert fake.bodies(UPSTREAM_STREAM) == []
    assert upstream_paths(fake.requests)[-1] == "/count_token"


# --- upstream failures: one in-band error frame naming the worker and the cause ------


async def test_worker_unreachable(fake_worker: StartFake) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url)) as adapter:
        await stream(adapter.client, chat(max_new_tokens=1))
        fake.stop()
        status, frames = await stream(adapter.client, chat(max_new_tokens=1))
        assert status == 200 and len(frames) == 1
        only_error(frames, 50005, fake.url, "unreachable")
        # Marked down at once: the next request is refused without trying the worker.
        status, frames = await stream(adapter.client, chat(max_new_tokens=1))
        only_error(frames, 50005, "no live FastChat worker serves model", MODEL)
        labels = {"worker": fake.url, "model_name": MODEL, "reason": "unreachable"}
        assert adapter.sample("fastchat_adapter_upstream_errors_total", **labels) == 1


async def test_worker_http_error(fake_worker: StartFake) -> None:
    fake = fake_worker()
    fake.fail_next(HttpError())
    async with serving(settings_for(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=2))
    assert status == 200 and len(frames) == 1
    only_error(frames, 50001, fake.url, "http_status", "HTTP 500", "injected failure")


async def test_connection_dropped_mid_stream(fake_worker: StartFake) -> None:
    fake = fake_worker()
    fake.fail_next(CloseMidStream(after_chunks=1))
    async with serving(settings_for(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=6))
    assert status == 200 and len(frames) == 2
    assert frames[0]["text"] and frames[0]["error_code"] == 0
    only_error(frames, 50001, fake.url, "broken_stream")


async def test_malformed_frame(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(tokens_per_second=10))
    fake.fail_next(MalformedFrame(after_chunks=1))
    async with serving(settings_for(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=20))
    assert status == 200 and len(frames) == 2
    only_error(frames, 50001, fake.url, "malformed", "not UTF-8 JSON")
    await assert_slot_freed(fake)  # the rest of the stream was not waited for


async def test_stream_without_nul_framing(fake_worker: StartFake) -> None:
    fake = fake_worker()
    fake.fail_next(NewlineFraming())
    async with serving(settings_for(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=2))
    assert status == 200 and len(frames) == 1
    only_error(frames, 50001, fake.url, "broken_stream", "ended inside a frame")


@pytest.mark.parametrize("after_chunks", [1, None], ids=["mid_stream", "before_headers"])
async def test_idle_timeout(fake_worker: StartFake, after_chunks: int | None) -> None:
    fake = fake_worker()
    fake.fail_next(Hang(5.0, after_chunks=after_chunks))
    async with serving(settings_for(fake.url, idle_timeout=0.3)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=6))
    assert status == 200 and len(frames) == (after_chunks or 0) + 1
    only_error(frames, 50006, fake.url, "idle_timeout", "no frame for 0.3 s")
    await assert_slot_freed(fake)


async def test_in_band_error_chunk_is_forwarded_and_ends_the_stream(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    fake.fail_next(ErrorChunk(after_chunks=1, message="CUDA out of memory", error_code=50002))
    async with serving(settings_for(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=6))
        labels = {"worker": fake.url, "model_name": MODEL, "reason": "in_band"}
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
    async with serving(settings_for(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=3))
    words = " ".join(fake.model.reply(vicuna_prompt("Hi"), 3))
    assert status == 200 and [f["text"] for f in frames] == [words.split()[0], words, words]
    assert frames[-1] == output(words, finish="stop")


async def test_vllm_worker_shapes_are_normalised(fake_worker: StartFake) -> None:
    # vLLM: one chunk per token, the final payload twice (finish null, then set), exact usage,
    # cumulative_logprob; "abort" is not a finish reason DB-GPT survives (§1.11, §10 item 15).
    fake = fake_worker(flavor="vllm")
    fake.fail_next(Abort(after_chunks=2))
    async with serving(settings_for(fake.url)) as adapter:
        status, frames = await stream(adapter.client, chat(max_new_tokens=6))
    assert status == 200
    assert [f["finish_reason"] for f in frames] == [None, None, None, "stop"]
    assert frames[-1]["usage"] is None  # same text as the frame before: no second finish event
    assert frames[-2]["usage"]["completion_tokens"] == 3
    assert all(set(f) == set(output("")) for f in frames)  # no cumulative_logprob


# --- after the final chunk -----------------------------------------------------------


async def test_a_worker_hanging_after_its_final_chunk_does_not_hold_the_stream_open(
    fake_worker: StartFake,
) -> None:
    # The final chunk (finish_reason set) is out, then the worker sends nothing and keeps the
    # body open. DB-GPT's apiserver sends its last finish event and [DONE] only when our body
    # ends, so draining the upstream must be bounded (DRAIN_TIMEOUT), not wait for the idle
    # timeout. Found in review.
    fake = fake_worker()
    idle_timeout = 20.0
    assert idle_timeout / 2 > DRAIN_TIMEOUT
    async with serving(settings_for(fake.url, idle_timeout=idle_timeout)) as adapter:
        _, clean = await stream(adapter.client, chat(max_new_tokens=3))
        fake.fail_next(Hang(30.0, after_chunks=len(clean)))  # after the last chunk
        status, frames = await within(
            idle_timeout / 2,
            stream(adapter.client, chat(max_new_tokens=3)),
            "a stream whose worker hangs after the final chunk",
        )
        reasons = {"worker": fake.url, "model_name": MODEL, "reason": "idle_timeout"}
        assert adapter.sample("fastchat_adapter_upstream_errors_total", **reasons) == 0
    assert status == 200 and frames == clean
    await fake.wait_for_disconnects(1)  # the upstream was closed, freeing the slot
    async with connect(fake.url) as worker:
        await wait_for_queue_length(worker, 0)


# --- what is sent upstream (respx) ---------------------------------------------------


# What DB-GPT 0.8.2's apiserver sends for a chat (docs/protocol.md §8.2).
DBGPT_CHAT = {
    "model": "m",
    "messages": [
        {"role": "system", "content": "You are terse.", "round_index": 0},
        {"role": "human", "content": "Hi", "round_index": 0},
        {"role": "ai", "content": "Hello.", "round_index": 0},
        {"role": "human", "content": "Say hello world", "round_index": 0},
    ],
    "echo": False,
    "temperature": 0.7,
    "top_p": 0.9,
    "max_new_tokens": 32,
    "stop": ["\n\n", "###"],
    "user": "u1",
    "span_id": "77023fa1d96b0b4ff8a128354cd4c8eb:06ac6ffc49e6ab54",
}

CHAT_PROMPT = (
    "You are terse.\n### Human: Hi\n### Assistant: Hello.\n### Human: Say hello world"
    "\n### Assistant:"
)


@pytest.mark.parametrize("route", ["stream", "generate"])
async def test_a_dbgpt_chat_becomes_exactly_this_fastchat_request(route: str) -> None:
    async with mocked_worker() as (client, mock):
        path = STREAM if route == "stream" else "/api/worker/generate"
        assert (await client.post(path, json=DBGPT_CHAT)).status_code == 200
        assert sent(mock, route) == {
            "model": "m",
            "prompt": CHAT_PROMPT,
            "temperature": 0.7,
            "top_p": 0.9,
            "max_new_tokens": 32,
            "stop": ["\n\n", "###"],  # the request's, then the template's, once each
            "echo": False,
        }
        turns = [(0, "Hi"), (1, "Hello."), (0, "Say hello world"), (1, None)]
        assert render_prompt(ZERO_SHOT, turns, "You are terse.") == CHAT_PROMPT
        assert sent(mock, "count") == {"model": "m", "prompt": CHAT_PROMPT}
        assert sent(mock, "conv") == sent(mock, "details") == {"model": "m"}


async def test_max_new_tokens_is_clamped_to_the_context_and_temperature_defaults() -> None:
    async with mocked_worker(context_length=64, count=20) as (client, mock):
        body = {"model": "m", "messages": [{"role": "human", "content": "Hi"}], "echo": False}
        await stream_ok(client, body)
        first = sent(mock, "stream")
        await stream_ok(client, {**body, "max_new_tokens": 1000})
        second = sent(mock, "stream")
    # 64 tokens of context, 20 of prompt, one of slack so the worker keeps the BOS (§3.5).
    assert first["max_new_tokens"] == second["max_new_tokens"] == 43
    assert first["temperature"] == 0.0  # DB-GPT drops a client's temperature 0 (§8.2)
    assert first["stop"] == ["###"]


async def test_completion_nulls_are_never_forwarded() -> None:
    # What DB-GPT's /v1/completions sends (§8.3): explicit nulls and DB-GPT-only keys.
    body = {
        "model": "m",
        "prompt": "Once upon",
        "chat_model": False,
        "temperature": 0.8,
        "max_new_tokens": 16,
        "stop": None,
        "top_p": 1.0,
        "top_k": -1,
        "echo": False,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "user": None,
        "span_id": "a:b",
    }
    async with mocked_worker() as (client, mock):
        await stream_ok(client, body)
        assert sent(mock, "stream") == {
            "model": "m",
            "prompt": "Once upon",
            "temperature": 0.8,
            "top_p": 1.0,
            "top_k": -1,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "max_new_tokens": 16,
            "stop": ["###"],  # the template's stop applies to completions too (§3.3)
            "echo": False,
        }


async def test_completion_echo_is_done_by_the_adapter() -> None:
    async with mocked_worker() as (client, mock):
        body = {"model": "m", "prompt": "Once upon", "chat_model": False, "echo": True}
        got = await stream_ok(client, body)
        assert sent(mock, "stream")["echo"] is False
    context = {"prompt_echo_len_char": 9, "has_format_prompt": True, "echo": True}
    assert [(f["text"], f["model_context"]) for f in got] == [
        ("Once uponHel", context),
        ("Once uponHello", context),
    ]


async def test_stop_token_ids_come_from_the_request_else_the_template() -> None:
    conv = {**ZERO_SHOT, "stop_token_ids": [2, 7]}
    async with mocked_worker(conv) as (client, mock):
        body = {"model": "m", "messages": [{"role": "human", "content": "Hi"}]}
        await stream_ok(client, body)
        assert sent(mock, "stream")["stop_token_ids"] == [2, 7]
        await stream_ok(client, {**body, "stop_token_ids": [5]})
        assert sent(mock, "stream")["stop_token_ids"] == [5]


# --- images in messages ------------------------------------------------------------

VICUNA: dict[str, Any] = {**ZERO_SHOT, "name": "vicuna_v1.1", "roles": ["USER", "ASSISTANT"],
                          "sep_style": 2, "sep": " ", "sep2": "</s>", "stop_str": None}  # fmt: skip
IMAGE_URL = "https://example.invalid/cat.png"
IMAGE_CHAT = {
    "model": "m",
    "messages": [
        {
            "role": "human",
            "content": [
                {"type": "text", "object": {"data": "What is this?", "format": "text"}},
                {"type": "image", "object": {"data": IMAGE_URL, "format": "url"}},
                {"type": "image", "object": {"data": "iVBORw0K", "format": "base64@image/png"}},
            ],
        }
    ],
    "echo": False,
    "max_new_tokens": 4,
}


async def test_images_for_a_worker_not_known_to_take_them_are_dropped_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with mocked_worker(VICUNA) as (client, mock):
        with caplog.at_level("WARNING", logger="fastchat_adapter.relay"):
            await stream_ok(client, IMAGE_CHAT)
        metrics = (await client.get("/metrics")).text
        body = sent(mock, "stream")
    assert "images" not in body and "$$<image>$$" not in body["prompt"]
    assert 'fastchat_adapter_images_dropped_total{model_name="m"} 2.0' in metrics
    warnings = [r for r in caplog.records if "image(s) dropped" in r.getMessage()]
    assert len(warnings) == 1  # once per request


async def test_images_go_to_a_multimodal_worker_as_fastchat_sends_them() -> None:
    """--multimodal-models: `images` as FastChat's openai_api_server builds it (URLs, base64
    as data URLs) and one placeholder per image before the user's text (0.2.36, Vicuna style)."""
    async with mocked_worker(VICUNA, multimodal_models=["m"]) as (client, mock):
        await stream_ok(client, IMAGE_CHAT)
        body = sent(mock, "stream")
    assert body["images"] == [IMAGE_URL, "data:image/png;base64,iVBORw0K"]
    expected = render_prompt(VICUNA, [(0, "$$<image>$$$$<image>$$What is this?"), (1, None)])
    assert body["prompt"] == expected
