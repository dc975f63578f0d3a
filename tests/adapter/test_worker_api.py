"""``adapter/worker_api.py``: DB-GPT's worker API routes, against fake FastChat workers on loopback:
generate, embeddings (the route's refusals and statuses; the fan-out is ``test_embeddings.py``),
count_token, model_metadata, models/supports, and the 422 of a generate_stream body that does not
parse (start, stop and restart are in ``test_model_control.py``)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.middleware.errors import ServerErrorMiddleware

from adapter import worker_api
from adapter.model_control import parameter_descriptions
from adapter.tools.reference_worker import ReferenceWorkerConfig
from adapter.tools.scripted_model import SERVER_ERROR_MSG
from tests.adapter.helpers import (
    MODEL,
    STREAM,
    StartFake,
    chat,
    eventually,
    only_error,
    serving,
    settings_for,
    split,
    upstream_paths,
    vicuna_prompt,
)
from tests.support.fake_worker import Hang, HttpError

EMBED = "/worker_get_embeddings"
IN_FLIGHT = "fastchat_adapter_num_requests_running"
REQUESTS = "fastchat_adapter_requests_total"
EMBED_LABELS = {"route": "embeddings", "model_name": MODEL}


def error(text: str, code: int) -> dict[str, Any]:
    return {
        "text": text,
        "error_code": code,
        "model_context": None,
        "finish_reason": None,
        "usage": None,
        "metrics": None,
    }


# --- /generate ---------------------------------------------------------------------------


async def test_generate_returns_the_last_chunk_as_one_model_output(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url)) as adapter:
        reply = await adapter.client.post("/api/worker/generate", json=chat(max_new_tokens=3))
    prompt = vicuna_prompt("Hi")
    tokens = fake.model.count_tokens(prompt)
    assert reply.status_code == 200
    assert reply.json() == {
        **error(" ".join(fake.model.reply(prompt, 3)), 0),
        "finish_reason": "length",
        "usage": {"prompt_tokens": tokens, "completion_tokens": 2, "total_tokens": tokens + 2},
    }
    # A short prompt cannot make 3 tokens overflow the context: no /count_token (relay.py).
    assert upstream_paths(fake.requests)[-1] == "/worker_generate"
    assert "/count_token" not in upstream_paths(fake.requests)
    assert fake.bodies("/worker_generate")[0]["echo"] is False


async def test_generate_errors_are_model_outputs_with_http_200(fake_worker: StartFake) -> None:
    fake = fake_worker()
    fake.fail_next(HttpError(), path="/worker_generate")
    in_band_body = json.dumps({"text": f"{SERVER_ERROR_MSG}\n\n(boom)", "error_code": 50001})
    fake.fail_next(HttpError(200, in_band_body.encode()), path="/worker_generate")
    async with serving(settings_for(fake.url)) as adapter:
        failed = await adapter.client.post("/api/worker/generate", json=chat())
        in_band = await adapter.client.post("/api/worker/generate", json=chat())
        unknown = await adapter.client.post("/api/worker/generate", json={**chat(), "model": "x"})
    assert failed.status_code == in_band.status_code == unknown.status_code == 200
    body = failed.json()
    assert body["error_code"] == 50001
    assert fake.url in body["text"] and "HTTP 500" in body["text"]
    assert in_band.json() == error(f"{SERVER_ERROR_MSG}\n\n(boom)", 50001)  # forwarded
    assert unknown.json() == error(f"unknown model 'x'; served models: {MODEL}", 40301)


async def test_generate_is_bounded_by_the_generate_timeout_not_the_idle_timeout(
    fake_worker: StartFake,
) -> None:
    # /worker_generate sends nothing until the whole generation is done: a 0.2 s idle timeout
    # must not cut a 0.6 s generation short, while the generate timeout still bounds a hang.
    fake = fake_worker(ReferenceWorkerConfig(first_token_delay=0.6))
    fake.fail_next(Hang(5.0, after_chunks=None), path="/worker_generate")
    config = settings_for(fake.url, idle_timeout=0.2, generate_timeout=1.0)
    async with serving(config) as adapter:
        hung = await adapter.client.post("/api/worker/generate", json=chat(max_new_tokens=3))
        slow = await adapter.client.post("/api/worker/generate", json=chat(max_new_tokens=3))
    assert hung.status_code == 200 and hung.json()["error_code"] == 50006
    assert fake.url in hung.json()["text"]
    assert slow.status_code == 200 and slow.json()["error_code"] == 0
    assert slow.json()["finish_reason"] == "length"


async def test_generate_invalid_body_is_422_naming_the_field(fake_worker: StartFake) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url)) as adapter:
        reply = await adapter.client.post(
            "/api/worker/generate", json={"model": MODEL, "prompt": "x", "top_k": 1.5}
        )
    assert reply.status_code == 422
    assert reply.json()["detail"][0]["loc"] == ["body", "top_k"]


# --- generate_stream: a body that does not parse is 422, as one error frame ---


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
    async with serving(settings_for(fake.url)) as adapter:
        reply = await adapter.client.post(STREAM, json=body)
    assert reply.status_code == 422
    frames, keepalives = split(reply.content)
    assert keepalives == 0 and len(frames) == 1
    only_error(frames, code, f"invalid request: {field}:")
    assert upstream_paths(fake.requests) == []


async def test_body_that_is_not_json_is_422(fake_worker: StartFake) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url)) as adapter:
        reply = await adapter.client.post(STREAM, content=b"{nope")
    assert reply.status_code == 422
    only_error(split(reply.content)[0], 40001, "not JSON")


# --- bodies Python's json accepts but no peer can use (issue 12, items 4, 6, 7) ------------

# Each POST route with a body, a valid body for it, and its string field a surrogate goes in.
STRICT_ROUTES: dict[str, tuple[dict[str, Any], str]] = {
    "generate_stream": ({"model": MODEL, "prompt": "a", "max_new_tokens": 2}, "prompt"),
    "generate": ({"model": MODEL, "prompt": "a", "max_new_tokens": 2}, "prompt"),
    "embeddings": ({"model": MODEL, "input": ["a"]}, "input.0"),
    "count_token": ({"model": MODEL, "prompt": "a"}, "prompt"),
    "model_metadata": ({"model": MODEL}, "model"),
}


def _with(body: dict[str, Any], key: str, raw_value: str) -> bytes:
    """``body`` as JSON text with ``"key": <raw_value>`` appended verbatim."""
    return (json.dumps(body)[:-1] + f', "{key}": {raw_value}}}').encode()


def _surrogate(body: dict[str, Any], field: str) -> bytes:
    """``body`` with a lone surrogate in ``field`` (json.dumps writes it as ``\\ud800``)."""
    name, _, index = field.partition(".")
    value = "a\ud800"
    return json.dumps({**body, name: [value] if index else value}).encode()


def _strict_cases() -> list[Any]:
    cases = []
    for route, (body, field) in STRICT_ROUTES.items():
        cases += [
            pytest.param(route, _surrogate(body, field), field, id=f"{route}-surrogate"),
            pytest.param(route, _with(body, "temperature", "NaN"), "", id=f"{route}-nan"),
            pytest.param(route, _with(body, "top_p", "-Infinity"), "", id=f"{route}-inf"),
            pytest.param(route, _with(body, "top_p", "1e999"), "", id=f"{route}-1e999"),
            pytest.param(route, _with(body, "context", "[" * 50_000), "", id=f"{route}-deep"),
            pytest.param(route, _with(body, "c", "[" * 70 + "]" * 70), "c.0", id=f"{route}-64"),
        ]
    return cases


@pytest.mark.parametrize(("route", "raw", "field"), _strict_cases())
async def test_unusable_json_is_a_422_naming_the_field_on_every_route(
    fake_worker: StartFake, route: str, raw: bytes, field: str
) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url)) as adapter:
        reply = await adapter.client.post(f"/api/worker/{route}", content=raw)
        assert (await adapter.client.get("/api/worker/models/supports")).status_code == 200
    assert reply.status_code == 422, reply.text
    if route == "generate_stream":  # one error frame DB-GPT's stream reader can show
        assert reply.content.endswith(b"\0") and reply.content.count(b"\0") == 1
        output = json.loads(reply.content[:-1])
        assert output["error_code"] == 40001 and output["text"].startswith("invalid request")
        assert field in output["text"]
    else:
        [error] = reply.json()["detail"]
        assert ".".join(str(part) for part in error["loc"][1:]).startswith(field)
        assert error["type"] == "invalid_request"
    assert upstream_paths(fake.requests) == []  # refused before any upstream call


# --- /embeddings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": ["a", 3]}, "input.1"),
        ({"model": MODEL, "input": "a bare string"}, "input"),
        ({"input": ["a"]}, "model"),
    ],
)
async def test_embeddings_bad_input_is_refused_before_sending(
    fake_worker: StartFake, body: dict[str, Any], field: str
) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url)) as adapter:
        reply = await adapter.client.post("/api/worker/embeddings", json=body)
    assert reply.status_code == 422
    loc = reply.json()["detail"][0]["loc"]
    assert ".".join(str(part) for part in loc[1:]) == field
    assert fake.bodies(EMBED) == []


async def test_embeddings_over_the_input_limit_is_a_413_naming_the_setting(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url, max_embedding_inputs=3)) as adapter:
        body = {"model": MODEL, "input": ["a", "b", "c", "d"]}
        refused = await adapter.client.post("/api/worker/embeddings", json=body)
        body["input"] = ["a", "b", "c"]
        accepted = await adapter.client.post("/api/worker/embeddings", json=body)
    assert refused.status_code == 413
    detail = refused.json()["detail"]
    assert "4 inputs exceed the limit of 3" in detail and "max_embedding_inputs" in detail
    assert accepted.status_code == 200 and len(accepted.json()) == 3
    assert len(fake.bodies(EMBED)) == 3  # the refused request sent nothing


async def test_embeddings_stop_calling_the_worker_when_the_client_leaves(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    fake.fail_next(Hang(0.2, after_chunks=None), path=EMBED, times=200)  # every call is slow
    config = settings_for(fake.url, embedding_concurrency=2)
    async with serving(config) as adapter:
        body = {"model": MODEL, "input": [str(i) for i in range(200)]}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes
            await adapter.client.post("/api/worker/embeddings", json=body, timeout=0.5)
        await eventually(lambda: adapter.sample(IN_FLIGHT, **EMBED_LABELS) == 0, what="done")
        made = len(fake.bodies(EMBED))
        await asyncio.sleep(1.0)  # several call durations: a call still going would show
        assert len(fake.bodies(EMBED)) == made
        assert adapter.sample(REQUESTS, outcome="client_gone", **EMBED_LABELS) == 1


@pytest.mark.parametrize(
    "extra", [{"query": "what?"}, {"worker_type": "reranker"}], ids=["query", "worker_type"]
)
async def test_rerank_is_a_clear_501(fake_worker: StartFake, extra: dict[str, Any]) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url)) as adapter:
        reply = await adapter.client.post(
            "/api/worker/embeddings", json={"model": MODEL, "input": ["a", "b"], **extra}
        )
    assert reply.status_code == 501
    assert "rerank is not supported" in reply.json()["detail"]
    assert fake.bodies(EMBED) == []


async def test_embeddings_upstream_failure_is_500_naming_the_worker(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    fake.fail_next(HttpError(), path=EMBED)
    async with serving(settings_for(fake.url)) as adapter:
        failed = await adapter.client.post(
            "/api/worker/embeddings", json={"model": MODEL, "input": ["a"]}
        )
        unknown = await adapter.client.post(
            "/api/worker/embeddings", json={"model": "nope", "input": ["a"]}
        )
    assert failed.status_code == 500
    assert fake.url in failed.json()["detail"] and "HTTP 500" in failed.json()["detail"]
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == f"unknown model 'nope'; served models: {MODEL}"


# --- /count_token and /model_metadata -------------------------------------------------------


async def test_count_token_with_and_without_model(fake_worker: StartFake) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url)) as adapter:
        without = await adapter.client.post("/api/worker/count_token", json={"prompt": "a b c"})
        named = await adapter.client.post(
            "/api/worker/count_token", json={"model": MODEL, "prompt": "a b c d"}
        )
    assert (without.status_code, without.json()) == (200, 4)  # three words and the BOS
    assert named.json() == 5
    assert fake.bodies("/count_token") == [
        {"model": MODEL, "prompt": "a b c"},
        {"model": MODEL, "prompt": "a b c d"},
    ]


async def test_count_token_without_model_when_several_are_served(
    fake_worker: StartFake,
) -> None:
    """DB-GPT's app trims chat history with a count_token that names no model (§6.3): with
    several models served, the largest of their counts answers (the safe side of a limit)."""
    fake = fake_worker(ReferenceWorkerConfig(model_names=("a", "b"), route_by_model=True))
    async with serving(settings_for(fake.url)) as adapter:
        mark = len(fake.bodies("/count_token"))
        ambiguous = await adapter.client.post("/api/worker/count_token", json={"prompt": "x y"})
        asked = fake.bodies("/count_token")[mark:]
        named = await adapter.client.post(
            "/api/worker/count_token", json={"model": "b", "prompt": "x"}
        )
        unknown = await adapter.client.post(
            "/api/worker/count_token", json={"model": "c", "prompt": "x"}
        )
    assert (ambiguous.status_code, ambiguous.json()) == (200, 3)
    assert sorted(body["model"] for body in asked) == ["a", "b"]
    assert named.json() == 2
    assert unknown.status_code == 404 and "served models: a, b" in unknown.json()["detail"]


async def test_count_token_without_model_takes_the_largest_count(
    fake_worker: StartFake,
) -> None:
    short = fake_worker(ReferenceWorkerConfig(model_names=("short",)))
    long = fake_worker(ReferenceWorkerConfig(model_names=("long",)))
    # A worker whose tokenizer makes more of the same prompt (a 200 "failure" with its count).
    long.fail_next(HttpError(200, b'{"count": 99, "error_code": 0}'), path="/count_token")
    async with serving(settings_for(f"{short.url},{long.url}")) as adapter:
        reply = await adapter.client.post("/api/worker/count_token", json={"prompt": "x"})
    assert reply.json() == 99


async def test_model_metadata(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(context_length=4096))
    async with serving(settings_for(fake.url)) as adapter:
        reply = await adapter.client.post("/api/worker/model_metadata", json={"model": MODEL})
        unknown = await adapter.client.post("/api/worker/model_metadata", json={"model": "x"})
    assert reply.json() == {
        "model": MODEL,
        "context_length": 4096,
        "chat_model": True,
        "metadata": {},
        "ext_metadata": {
            "prompt_roles": ["system", "human", "ai"],
            "prompt_sep": " ",  # vicuna_v1.1's sep
            "prompt_chat_template": None,
        },
    }
    assert unknown.status_code == 404


# --- worker-manager routes ----------------------------------------------------------------


async def test_models_supports_lists_every_served_model(fake_worker: StartFake) -> None:
    llm = fake_worker(ReferenceWorkerConfig(model_names=("b", "a")))
    text2vec = fake_worker(ReferenceWorkerConfig(model_names=("e",)))
    config = settings_for(llm.url, embedding_worker_address=[text2vec.url], port=23456)
    async with serving(config) as adapter:
        reply = await adapter.client.get("/api/worker/models/supports")

    def supported(name: str, kind: str) -> dict[str, Any]:
        return {
            "model": name,
            "path": None,
            "worker_type": kind,
            "path_exist": False,
            "proxy": False,
            "enabled": True,
            "params": [
                {
                    "param_class": "builtins.FastChatAdapterModelParameters",
                    "param_name": "fastchat_worker_address",
                    "param_type": "str",
                    "default_value": (text2vec if kind == "text2vec" else llm).url,
                    "description": parameter_descriptions(adapter.runtime, name, kind)[0].to_wire()[
                        "description"
                    ],
                    "required": False,
                    "valid_values": None,
                    "ext_metadata": None,
                }
            ],
        }

    assert reply.json() == [
        {
            "host": "127.0.0.1",
            "port": 23456,
            "models": [supported("a", "llm"), supported("b", "llm"), supported("e", "text2vec")],
        }
    ]


# --- the stream route's own lane -------------------------------------------------------------


async def test_the_stream_route_takes_its_own_lane_inside_the_guard(
    fake_worker: StartFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    routed: list[str] = []
    handle = APIRoute.handle

    async def spy(self: APIRoute, scope: Any, receive: Any, send: Any) -> None:
        routed.append(scope["path"])
        await handle(self, scope, receive, send)

    monkeypatch.setattr(APIRoute, "handle", spy)
    outer: list[str] = []  # what entered Starlette's outermost layer (app.front skips it)
    error_layer = ServerErrorMiddleware.__call__

    async def outer_spy(self: Any, scope: Any, receive: Any, send: Any) -> None:
        outer.append(scope.get("path", ""))
        await error_layer(self, scope, receive, send)

    monkeypatch.setattr(ServerErrorMiddleware, "__call__", outer_spy)
    fake = fake_worker()
    async with serving(settings_for(fake.url, api_key="s3cret")) as adapter:
        key = {"authorization": "Bearer s3cret"}
        refused = await adapter.client.post(STREAM, json=chat())
        async with adapter.client.stream("POST", STREAM, json=chat(), headers=key) as reply:
            frames, _ = split(await reply.aread())
        generated = await adapter.client.post("/api/worker/generate", json=chat(), headers=key)
    assert refused.status_code == 401  # the guard still wraps the lane
    assert frames[-1]["finish_reason"] in ("stop", "length") and frames[-1]["error_code"] == 0
    assert generated.status_code == 200
    ours = [path for path in routed if path.startswith("/api/worker/")]  # not the fake worker
    assert ours == ["/api/worker/generate"]  # the stream never went through the router
    assert STREAM not in outer and "/api/worker/generate" in outer


async def test_an_unexpected_error_on_the_stream_route_is_a_500(
    fake_worker: StartFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(request: Any) -> Any:
        await request.body()  # (unread, the close after the 500 would reset the connection)
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(worker_api, "generate_stream", broken)
    fake = fake_worker()
    async with serving(settings_for(fake.url)) as adapter:
        reply = await adapter.client.post(STREAM, json=chat())
        still = await adapter.client.post("/api/worker/generate", json=chat())
    assert (reply.status_code, reply.text) == (500, "Internal Server Error")
    assert still.status_code == 200
