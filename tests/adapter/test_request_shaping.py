"""What the adapter sends FastChat, exactly: respx stands in for the worker, the adapter runs
in-process (ASGI transport plus its lifespan). Every body is compared whole, so a stray key or
a ``null`` fails the test (PROTOCOLS.md §1.2, §9.2)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import respx

from adapter.app import create_app
from adapter.embeddings import CONCURRENCY
from protocol.conversation import render_prompt
from tests.adapter.helpers import STREAM, settings, split

WORKER = "http://fastchat-worker:21002"
# FastChat's zero_shot template (sep_style 1, stop_str "###"), §1.9 and §4.4.
ZERO_SHOT: dict[str, Any] = {
    "name": "zero_shot",
    "system_template": "{system_message}",
    "system_message": "A chat between a curious human and an artificial intelligence assistant.",
    "roles": ["Human", "Assistant"],
    "messages": [],
    "offset": 0,
    "sep_style": 1,
    "sep": "\n### ",
    "sep2": None,
    "stop_str": "###",
    "stop_token_ids": None,
}
CHUNKS = [
    {"text": "Hel", "error_code": 0, "usage": None, "finish_reason": None, "logprobs": None},
    {"text": "Hello", "error_code": 0, "finish_reason": "stop", "logprobs": None},
]
STREAM_BODY = b"".join(json.dumps(chunk).encode() + b"\0" for chunk in CHUNKS)


@asynccontextmanager
async def mocked(
    conv: dict[str, Any] = ZERO_SHOT,
    *,
    names: tuple[str, ...] = ("m",),
    context_length: int = 64,
    count: int = 20,
    **values: Any,
) -> AsyncIterator[tuple[httpx.AsyncClient, respx.MockRouter]]:
    """The adapter in front of a respx worker; its routes are named after FastChat's paths."""
    with respx.mock(base_url=WORKER, assert_all_called=False) as mock:
        status = {"model_names": list(names), "speed": 1, "queue_length": 0}
        mock.post("/worker_get_status", name="status").respond(json=status)
        mock.post("/worker_get_conv_template", name="conv").respond(json={"conv": conv})
        details = {"context_length": context_length}
        mock.post("/model_details", name="details").respond(json=details)
        counted = {"count": count, "error_code": 0}
        mock.post("/count_token", name="count").respond(json=counted)
        mock.post("/worker_generate_stream", name="stream").respond(content=STREAM_BODY)
        mock.post("/worker_generate", name="generate").respond(json=CHUNKS[-1])
        app = create_app(settings(WORKER, **values))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://adapter") as client:
                yield client, mock


def sent(mock: respx.MockRouter, route: str) -> Any:
    return json.loads(mock[route].calls.last.request.content)


async def frames(client: httpx.AsyncClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    reply = await client.post(STREAM, json=body)
    assert reply.status_code == 200
    return split(reply.content)[0]


# What DB-GPT 0.8.2's apiserver sends for a chat (PROTOCOLS.md §8.2).
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
    async with mocked() as (client, mock):
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
    async with mocked(context_length=64, count=20) as (client, mock):
        body = {"model": "m", "messages": [{"role": "human", "content": "Hi"}], "echo": False}
        await frames(client, body)
        first = sent(mock, "stream")
        await frames(client, {**body, "max_new_tokens": 1000})
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
    async with mocked() as (client, mock):
        await frames(client, body)
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
    async with mocked() as (client, mock):
        body = {"model": "m", "prompt": "Once upon", "chat_model": False, "echo": True}
        got = await frames(client, body)
        assert sent(mock, "stream")["echo"] is False
    context = {"prompt_echo_len_char": 9, "has_format_prompt": True, "echo": True}
    assert [(f["text"], f["model_context"]) for f in got] == [
        ("Once uponHel", context),
        ("Once uponHello", context),
    ]


async def test_stop_token_ids_come_from_the_request_else_the_template() -> None:
    conv = {**ZERO_SHOT, "stop_token_ids": [2, 7]}
    async with mocked(conv) as (client, mock):
        body = {"model": "m", "messages": [{"role": "human", "content": "Hi"}]}
        await frames(client, body)
        assert sent(mock, "stream")["stop_token_ids"] == [2, 7]
        await frames(client, {**body, "stop_token_ids": [5]})
        assert sent(mock, "stream")["stop_token_ids"] == [5]


async def test_every_call_names_the_model_of_a_multi_model_worker() -> None:
    async with mocked(names=("a", "b")) as (client, mock):
        await frames(client, {"model": "b", "messages": [{"role": "human", "content": "Hi"}]})
        for route in ("conv", "details", "count", "stream"):
            assert sent(mock, route)["model"] == "b", route


async def test_worker_refusing_the_connection_at_generate() -> None:
    async with mocked() as (client, mock):
        mock["stream"].side_effect = httpx.ConnectError("connection refused")
        got = await frames(client, {"model": "m", "prompt": "x", "chat_model": False})
    assert len(got) == 1 and got[0]["error_code"] == 50005
    assert got[0]["text"] == f"FastChat worker {WORKER}: unreachable: connection refused"


async def test_template_errors_are_not_cached() -> None:
    async with mocked() as (client, mock):
        template = httpx.Response(200, json={"conv": ZERO_SHOT})
        mock["conv"].side_effect = [httpx.Response(502, text="bad gateway"), template]
        body = {"model": "m", "messages": [{"role": "human", "content": "Hi"}]}
        failed = await frames(client, body)
        assert failed[0]["error_code"] == 50001
        assert "/worker_get_conv_template: HTTP 502: bad gateway" in failed[0]["text"]
        assert (await frames(client, body))[-1]["text"] == "Hello"
        await frames(client, body)
        assert mock["conv"].call_count == 2  # fetched again after the error, then cached


async def test_embeddings_concurrency_is_bounded_and_order_kept() -> None:
    active = peak = 0

    async def embed(request: httpx.Request) -> httpx.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        (text,) = json.loads(request.content)["input"]
        await asyncio.sleep(0.05 if int(text) % 2 else 0.01)  # finish out of order
        active -= 1
        return httpx.Response(200, json={"embedding": [[float(text)]], "token_num": 1})

    async with mocked() as (client, mock):
        mock.post("/worker_get_embeddings").mock(side_effect=embed)
        inputs = [str(i) for i in range(10)]
        reply = await client.post("/api/worker/embeddings", json={"model": "m", "input": inputs})
    assert reply.json() == [[float(i)] for i in range(10)]
    assert peak == CONCURRENCY


async def test_one_failing_embeddings_call_fails_the_request() -> None:
    async with mocked() as (client, mock):
        mock.post("/worker_get_embeddings").mock(
            side_effect=[
                httpx.Response(200, json={"embedding": [[1.0]], "token_num": 1}),
                httpx.Response(200, json={"text": "CUDA out of memory", "error_code": 50002}),
            ]
            + [httpx.Response(200, json={"embedding": [[1.0]], "token_num": 1})] * 4
        )
        reply = await client.post(
            "/api/worker/embeddings", json={"model": "m", "input": ["a", "b", "c"]}
        )
    assert reply.status_code == 500
    assert reply.json()["detail"] == f"FastChat worker {WORKER}: in_band: CUDA out of memory"
