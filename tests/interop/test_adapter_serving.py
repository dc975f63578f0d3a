"""Issue #6 scenarios 4-7: what the adapter serves to DB-GPT, against the real programs
(docs/peers.md §5 items 4-7): embeddings, DB-GPT's own client, both ecosystems on one worker at
once, and a worker killed mid-stream.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.interop.calls import (
    Answer,
    chat_body,
    instances_at,
    metric_values,
    post_openai,
    wait_for,
)
from tests.interop.peers import DRIVERS, Peers
from tests.interop.procs import run_json
from tests.interop.stacks import AdapterProc, DbgptCluster, FastChatStack, FastChatWorker

EMBED_TOLERANCE = 1e-6
EMBED_INPUTS = [
    "The quick brown fox jumps over the lazy dog.",
    "hello",
    "A considerably longer sentence, so that padding would matter if inputs were batched.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy.",
    "\u4f60\u597d\uff0c\u4e16\u754c",
    "emoji \U0001f600 and accents: caf\u00e9, na\u00efve",
    "x",
    "Numbers 1 2 3 4 5 6 7 8 9 10",
    "The last of nine inputs.",
]


# --- 4. embeddings --------------------------------------------------------------------------


@pytest.mark.deadline(90)
@pytest.mark.parametrize("count", [1, 9])
def test_s04_embeddings_equal_single_input_worker_vectors(
    fastchat_stack: FastChatStack,
    dbgpt_cluster: DbgptCluster,
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
    count: int,
) -> None:
    """DB-GPT's /api/v1/embeddings (9 inputs become 3 worker calls of <= 4): 384-d vectors in
    input order, each within 1e-6 of the FastChat worker's vector for that input alone."""
    adapter_factory(
        embedding_workers=[fastchat_stack.embed_worker_url],
        controllers=[dbgpt_cluster.controller_url],
    )
    inputs = EMBED_INPUTS[:count]
    reply = http.post(
        dbgpt_cluster.api_url + "/api/v1/embeddings",
        json={"model": fastchat_stack.embed_model, "input": inputs},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert [item["index"] for item in data] == list(range(count))
    for text, item in zip(inputs, data, strict=True):
        direct = http.post(
            fastchat_stack.embed_worker_url + "/worker_get_embeddings",
            json={"model": fastchat_stack.embed_model, "input": [text]},
            timeout=30,
        )
        assert direct.status_code == 200, direct.text
        (expected,) = direct.json()["embedding"]
        got = item["embedding"]
        assert len(got) == len(expected) == 384
        worst = max(abs(a - b) for a, b in zip(got, expected, strict=True))
        assert worst <= EMBED_TOLERANCE, f"{text!r}: max deviation {worst:g}"


# --- 5. DB-GPT's own client ------------------------------------------------------------------


@pytest.mark.deadline(120)
def test_s05_dbgpt_remote_llm_client_end_to_end(
    fastchat_stack: FastChatStack,
    dbgpt_cluster_factory: Callable[..., DbgptCluster],
    adapter_factory: Callable[..., AdapterProc],
    peers: Peers,
) -> None:
    """RemoteLLMClient (DB-GPT's own code, run under the DB-GPT venv) against a fresh cluster
    where only the adapter is registered: models() fans model_metadata out (context_length
    2048); count_token is sent without a `model` and gives a bare int; generate and
    generate_stream give the same greedy text, cumulative chunks and a finish reason."""
    cluster = dbgpt_cluster_factory()
    adapter_factory(
        workers=[fastchat_stack.worker_url],
        embedding_workers=[fastchat_stack.embed_worker_url],
        controllers=[cluster.controller_url],
    )
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "human", "content": "Hello"},
        {"role": "ai", "content": "Hi."},
        {"role": "human", "content": "Tell me about licenses."},
    ]
    params = {"max_new_tokens": 24}  # no temperature: the adapter's default, 0.0 (greedy)
    generation = {"model": fastchat_stack.model, "messages": messages, "params": params}
    spec = {
        "controller": cluster.controller_url,
        "ops": [
            {"op": "models"},
            {"op": "count_token", "model": fastchat_stack.model, "prompt": "hello world"},
            {"op": "generate", **generation},
            {"op": "generate_stream", **generation},
        ],
    }
    out = run_json([peers.dbgpt.python, DRIVERS / "dbgpt_client.py"], spec, timeout=90)
    results = {r["op"]: r for r in out["results"]}
    failed = {op: r["error"] for op, r in results.items() if not r["ok"]}
    assert failed == {}, failed

    models = {m["model"]: m for m in results["models"]["value"]}
    assert set(models) == {fastchat_stack.model}, models  # @llm instances only
    assert models[fastchat_stack.model]["context_length"] == 2048

    count = results["count_token"]["value"]
    assert isinstance(count, int) and not isinstance(count, bool) and count > 0, count

    single = results["generate"]["value"]
    assert single["error_code"] == 0, single
    assert single["text"], single
    assert single["finish_reason"] in ("stop", "length"), single

    chunks = results["generate_stream"]["value"]
    assert chunks, "generate_stream gave no chunk"
    assert all(c["error_code"] == 0 for c in chunks), chunks
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts)), texts
    assert chunks[-1]["finish_reason"] in ("stop", "length"), chunks[-1]
    assert texts[-1] == single["text"]


# --- 6. both ecosystems at once --------------------------------------------------------------


@pytest.mark.deadline(150)
def test_s06_fastchat_and_dbgpt_stream_concurrently_from_one_worker(
    fastchat_stack: FastChatStack,
    dbgpt_cluster: DbgptCluster,
    fastchat_worker_factory: Callable[..., FastChatWorker],
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
    timing: Callable[..., None],
) -> None:
    """A worker with --limit-worker-concurrency 2, registered with FastChat's controller (so
    openai_api_server uses it) and fronted by the adapter (so DB-GPT uses it). 3 streams
    through each ecosystem at once: all complete and equal their sequential results; the
    queue_length the worker reports, FastChat's controller aggregates (live), and the
    adapter exports (fastchat_adapter_upstream_queue_length) exceed 3 (what one side alone
    could cause): the combined load."""
    model = "dual-vicuna"
    worker = fastchat_worker_factory(model, register=True, limit_worker_concurrency=2)
    adapter = adapter_factory(workers=[worker.url], controllers=[dbgpt_cluster.controller_url])
    per_side, max_tokens = 3, 200
    fastchat_url = fastchat_stack.openai_url + "/v1/chat/completions"
    dbgpt_url = dbgpt_cluster.api_url + "/api/v1/chat/completions"
    jobs = [
        (side, url, chat_body(model, f"Request {i}: tell me a story.", max_tokens, stream=True))
        for i in range(per_side)
        for side, url in (("fastchat", fastchat_url), ("dbgpt", dbgpt_url))
    ]

    sequential = [post_openai(http, url, body) for _, url, body in jobs]
    for (side, _, _), answer in zip(jobs, sequential, strict=True):
        assert answer.errors == [] and answer.done and answer.text, (side, answer)

    peaks = {"worker": 0.0, "fastchat-controller": 0.0, "adapter-metric": 0.0}
    stop = threading.Event()

    def sample(name: str, read: Callable[[httpx.Client], float], every: float) -> None:
        with httpx.Client(timeout=5, trust_env=False) as client:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    peaks[name] = max(peaks[name], read(client))
                stop.wait(every)

    def worker_queue(client: httpx.Client) -> float:
        status = client.post(worker.url + "/worker_get_status", json={}).json()
        return float(status["queue_length"])

    def controller_queue(client: httpx.Client) -> float:
        url = fastchat_stack.controller_url + "/worker_get_status"
        return float(client.post(url, json={}).json()["queue_length"])

    def adapter_queue(client: httpx.Client) -> float:
        text = client.get(adapter.url + "/metrics").text
        samples = metric_values(text, "fastchat_adapter_upstream_queue_length")
        return max([v for labels, v in samples if labels.get("model_name") == model] or [0.0])

    samplers = [
        threading.Thread(target=sample, args=("worker", worker_queue, 0.05), daemon=True),
        threading.Thread(
            target=sample, args=("fastchat-controller", controller_queue, 0.3), daemon=True
        ),
        threading.Thread(target=sample, args=("adapter-metric", adapter_queue, 0.1), daemon=True),
    ]
    for thread in samplers:
        thread.start()

    def run(job: tuple[str, str, dict[str, Any]]) -> Answer:
        with httpx.Client(trust_env=False) as client:
            return post_openai(client, job[1], job[2])

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            concurrent = list(pool.map(run, jobs))
    finally:
        stop.set()
        for thread in samplers:
            thread.join(10)
    timing("s06 six concurrent streams (limit 2)", time.monotonic() - started)
    for name, peak in peaks.items():
        timing(f"s06 peak queue_length seen by {name}", peak, "")

    for (side, _, body), alone, together in zip(jobs, sequential, concurrent, strict=True):
        assert together.errors == [] and together.done, (side, together.errors)
        assert together.finish_reason in ("stop", "length"), (side, together.finish_reasons)
        assert together.text == alone.text, (side, body["messages"][0]["content"])
    assert peaks["worker"] > per_side, peaks
    assert peaks["fastchat-controller"] > per_side, peaks
    assert peaks["adapter-metric"] > per_side, peaks


# --- 7. worker killed mid-stream ------------------------------------------------------------


@pytest.mark.deadline(150)
def test_s07_worker_killed_mid_stream_then_restarted(
    dbgpt_cluster: DbgptCluster,
    fastchat_worker_factory: Callable[..., FastChatWorker],
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
    timing: Callable[..., None],
) -> None:
    """SIGKILL the worker while DB-GPT streams from it: the stream ends promptly with an error
    event and [DONE] (no hang, not a silently empty answer); the model turns unhealthy in
    the DB-GPT controller within one adapter heartbeat interval. Restarted on its port, the
    worker is healthy again in the controller and answers through DB-GPT."""
    model = "crash-vicuna"
    key = f"{model}@llm"
    worker = fastchat_worker_factory(model, register=False)
    controller = dbgpt_cluster.controller_url
    adapter = adapter_factory(workers=[worker.url], controllers=[controller])
    assert instances_at(http, controller, *adapter.host_port)[key]["healthy"] is True
    url = dbgpt_cluster.api_url + "/api/v1/chat/completions"

    killed_at: list[float] = []

    def on_event(event: Any) -> None:
        choices = event.get("choices") or [{}]
        if not killed_at and (choices[0].get("delta") or {}).get("content"):
            worker.kill()  # SIGKILL, mid-stream: text has started to flow
            killed_at.append(time.monotonic())

    with httpx.Client(trust_env=False) as client:
        answer = post_openai(
            client,
            url,
            chat_body(model, "Write a very long story.", 1800, stream=True),
            on_event=on_event,
            timeout=httpx.Timeout(30.0, connect=5.0),
        )
    ended = time.monotonic()
    assert killed_at, f"the stream never produced text: {answer}"
    end_after_kill = ended - killed_at[0]
    timing("s07 worker SIGKILL -> DB-GPT stream ended", end_after_kill)
    assert answer.status == 200, answer
    assert answer.text, "nothing before the kill"
    assert answer.errors, f"no error event; the stream ended silently: {answer.events[-3:]}"
    assert answer.errors[-1].get("error_code"), answer.errors
    assert answer.done, "no [DONE] after the error event"
    assert end_after_kill <= 2.0, f"the stream ended {end_after_kill:.2f} s after the kill"

    def unhealthy() -> bool:
        found = instances_at(http, controller, *adapter.host_port)
        return key in found and found[key]["healthy"] is False

    wait_for(unhealthy, timeout=20, interval=0.05, what=f"{key} unhealthy")
    to_unhealthy = time.monotonic() - killed_at[0]
    timing("s07 worker SIGKILL -> unhealthy in the DB-GPT controller", to_unhealthy)
    assert to_unhealthy <= adapter.heartbeat_interval, f"{to_unhealthy:.2f} s"

    # While it is down, DB-GPT refuses at once instead of hanging.
    refused = post_openai(http, url, chat_body(model, "Anyone?", 8, stream=False))
    assert refused.status != 200 or refused.errors, refused
    assert refused.elapsed < 5.0, refused.elapsed

    worker.start(same_port=True)
    restarted = time.monotonic()
    wait_for(
        lambda: instances_at(http, controller, *adapter.host_port)[key]["healthy"],
        timeout=20,
        interval=0.05,
        what=f"{key} healthy again",
    )
    back = time.monotonic() - restarted
    timing("s07 worker ready again -> healthy in the DB-GPT controller", back)
    again = post_openai(http, url, chat_body(model, "Are you back?", 16, stream=True))
    assert again.errors == [] and again.done and again.text, again
    assert again.finish_reason in ("stop", "length"), again.finish_reasons
