"""``adapter/embeddings.py``: one input per upstream call by default (or batches), concurrent but
bounded, input order kept, embedding workers first, and the first failing call fails the
request. Against fake workers on loopback and a respx worker (in-process)."""

from __future__ import annotations

import asyncio
import json

import httpx

from adapter.settings import Settings
from adapter.tools.reference_worker import ReferenceWorkerConfig
from tests.adapter.helpers import (
    MOCK_WORKER,
    MODEL,
    StartFake,
    mocked_worker,
    serving,
    settings_for,
)

EMBED = "/worker_get_embeddings"


async def test_embeddings_one_input_per_call_in_input_order(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(embedding_dim=4))
    texts = ["first", "second text", "third one here", "4"]
    async with serving(settings_for(fake.url)) as adapter:
        reply = await adapter.client.post(
            "/api/worker/embeddings", json={"model": MODEL, "input": texts, "span_id": "s"}
        )
    assert reply.status_code == 200
    assert reply.json() == [fake.model.embed(text, 4) for text in texts]
    bodies = fake.bodies(EMBED)
    assert sorted(b["input"][0] for b in bodies) == sorted(texts)
    assert all(b == {"model": MODEL, "input": b["input"]} and len(b["input"]) == 1 for b in bodies)


async def test_embeddings_batches_when_configured(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(embedding_dim=4))
    texts = [f"text {i}" for i in range(7)]
    async with serving(settings_for(fake.url, embedding_batch_size=3)) as adapter:
        reply = await adapter.client.post(
            "/api/worker/embeddings", json={"model": MODEL, "input": texts}
        )
    assert reply.json() == [fake.model.embed(text, 4) for text in texts]
    assert sorted(len(b["input"]) for b in fake.bodies(EMBED)) == [1, 3, 3]


async def test_embedding_workers_are_preferred(fake_worker: StartFake) -> None:
    llm = fake_worker(ReferenceWorkerConfig(model_names=("shared",)))
    text2vec = fake_worker(ReferenceWorkerConfig(model_names=("shared",), seed=7))
    config = settings_for(llm.url, embedding_worker_address=[text2vec.url])
    async with serving(config) as adapter:
        reply = await adapter.client.post(
            "/api/worker/embeddings", json={"model": "shared", "input": ["a"]}
        )
    assert reply.json() == [text2vec.model.embed("a", 16)]
    assert llm.bodies(EMBED) == []


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

    async with mocked_worker() as (client, mock):
        mock.post("/worker_get_embeddings").mock(side_effect=embed)
        inputs = [str(i) for i in range(10)]
        reply = await client.post("/api/worker/embeddings", json={"model": "m", "input": inputs})
    assert reply.json() == [[float(i)] for i in range(10)]
    assert peak == Settings(worker_address=["http://w"]).embedding_concurrency  # the default


async def test_one_failing_embeddings_call_fails_the_request() -> None:
    async with mocked_worker() as (client, mock):
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
    assert reply.json()["detail"] == f"FastChat worker {MOCK_WORKER}: in_band: CUDA out of memory"
