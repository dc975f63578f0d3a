"""Fuzzing every route's body (issue 12, "keep it proven"): hypothesis bodies, and raw bytes
Python's json would accept or choke on. Whatever comes in, on a real socket:

- no answer is a 5xx (but the documented 501 for what FastChat cannot do);
- a ``generate_stream`` answer is NUL-terminated frames, each a ModelOutput (an error frame or
  the normal answer);
- afterwards no worker slot is leaked (the worker's queue is back to 0, nothing in flight), and
  the standalone registry's listing still answers 200.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.app import create_app
from adapter.tools.reference_worker import ReferenceWorkerConfig
from adapter.tools.reference_worker import create_app as reference_app
from tests.adapter.helpers import MODEL, settings_for
from tests.support.servers import LoopbackServer

WORKER_ROUTES = (
    "generate_stream", "generate", "embeddings", "count_token", "model_metadata", "apply",
    "models/startup", "models/shutdown",
)  # fmt: skip
CONTROLLER_ROUTES = ("/api/controller/models", "/api/controller/heartbeat")
PATHS = [f"/api/worker/{route}" for route in WORKER_ROUTES] + list(CONTROLLER_ROUTES)
FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[httpx.Client, LoopbackServer]]:
    worker = LoopbackServer(reference_app(ReferenceWorkerConfig()))
    worker.start()
    config = settings_for(worker.url, controller_accept_workers=True, max_body_bytes=2**20)
    adapter = LoopbackServer(create_app(config))
    adapter.start()
    try:
        with httpx.Client(base_url=adapter.url, trust_env=False, timeout=30) as client:
            yield client, worker
    finally:
        adapter.stop()
        worker.stop()


# --- what the bodies are made of ----------------------------------------------------------

ODD_TEXT = st.sampled_from(["", "\ud800", "a\udfff", "\x00", "é\u2028", "@", "x@llm", " "])
TEXT = st.text(max_size=12) | ODD_TEXT
NUMBERS = (
    st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1, 2, -1, 10**400])
)
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["human", "ai", "system", "view", "user"]) | JSON,
        "content": TEXT | JSON,
        "round_index": NUMBERS | JSON,
    },
)
# Known keys with plausible and implausible values, so bodies get past the first check.
BODY = st.fixed_dictionaries(
    {},
    optional={
        "model": st.just(MODEL) | TEXT | JSON,
        "prompt": TEXT | JSON,
        "messages": st.lists(MESSAGE, max_size=3) | JSON,
        "temperature": NUMBERS | JSON,
        "top_p": NUMBERS,
        "top_k": NUMBERS,
        "max_new_tokens": st.integers(-2, 6) | JSON,
        "stop": TEXT | st.lists(TEXT, max_size=2),
        "echo": st.booleans() | JSON,
        "input": st.lists(TEXT, max_size=3) | JSON,
        "query": TEXT,
        "worker_type": st.sampled_from(["llm", "text2vec", "reranker"]) | JSON,
        "model_name": TEXT | st.just("fuzz@llm") | st.just(f"{MODEL}@llm"),
        "host": TEXT | st.just("127.0.0.2"),
        "port": NUMBERS | TEXT,
        "weight": NUMBERS,
        "context": JSON,
        "apply_type": TEXT,
    },
)


def encode(body: Any) -> bytes:
    """As a careless client would: NaN and Infinity written out, surrogates escaped."""
    return json.dumps(body, allow_nan=True).encode()


RAW_CASES = [
    b"",
    b"\xff\xfe\xfd",  # not UTF-8
    b'{"model": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8 bytes
    b'{"model": "m", "prompt": "a\\ud800"}',
    b'{"model": "m", "temperature": NaN, "prompt": "x"}',
    b'{"model": "m", "temperature": -Infinity, "prompt": "x"}',
    b'{"model": "m", "top_p": 1e999, "prompt": "x"}',
    b'{"model": "m", "prompt": "x", "c": ' + b"[" * 100_000 + b"}",
    b'{"model": "m", "prompt": "x", "c": ' + b"{" * 3_000 + b"}",
    b'{"model": "m", "input": [' + b",".join([b'"a"'] * 50_000) + b"]}",
    b'{"model": "m", "input": [' + b",".join([b"[]"] * 20_000) + b"]}",
    b'{"model": "m", "prompt": 1' + b"0" * 5_000 + b"}",
    b"[" * 5 + b"]" * 5,
    b"null",
    b'"just a string"',
    b'{"model": "m", "prompt": "x"}garbage',
]


# --- the checks ---------------------------------------------------------------------------


def check_answer(path: str, reply: httpx.Response) -> None:
    # 501 is the documented "FastChat cannot do this" (rerank, model start/stop), not a failure.
    deliberate = reply.status_code == 501 and "not supported" in reply.json()["detail"]
    assert reply.status_code < 500 or deliberate, (path, reply.status_code, reply.text[:300])
    if path.endswith("/generate_stream"):
        raw = reply.content
        assert raw.endswith(b"\0"), raw[-200:]
        frames = [json.loads(piece) for piece in raw.split(b"\0") if piece]
        assert frames, raw
        for frame in frames:
            assert isinstance(frame["text"], str) and isinstance(frame["error_code"], int)
        assert frames[-1]["error_code"] != 0 or frames[-1]["finish_reason"] in ("stop", "length")


def check_nothing_leaked(client: httpx.Client, worker: LoopbackServer) -> None:
    for params in ({}, {"healthy_only": "true"}):
        assert client.get("/api/controller/models", params=params).status_code == 200
    status = httpx.post(f"{worker.url}/worker_get_status", json={}, trust_env=False).json()
    assert status["queue_length"] == 0
    metrics = client.get("/metrics").text
    in_flight = [
        line
        for line in metrics.splitlines()
        if line.startswith(
            ("fastchat_adapter_num_requests_running{", "fastchat_adapter_num_requests_waiting{")
        )
        and not line.endswith(" 0.0")
    ]
    assert in_flight == []


@pytest.mark.parametrize("path", PATHS)
def test_fuzzed_bodies_never_get_a_5xx(
    stack: tuple[httpx.Client, LoopbackServer], path: str
) -> None:
    client, worker = stack

    @FUZZ
    @given(body=BODY | JSON)
    def run(body: Any) -> None:
        headers = {"content-type": "application/json"}
        check_answer(path, client.post(path, content=encode(body), headers=headers))

    run()
    check_nothing_leaked(client, worker)


@pytest.mark.parametrize("path", PATHS)
def test_raw_bytes_never_get_a_5xx(stack: tuple[httpx.Client, LoopbackServer], path: str) -> None:
    client, worker = stack
    for raw in RAW_CASES:
        reply = client.post(path, content=raw, headers={"content-type": "application/json"})
        check_answer(path, reply)
    check_nothing_leaked(client, worker)


@FUZZ
@given(raw=st.binary(max_size=64))
def test_random_bytes_never_get_a_5xx(
    stack: tuple[httpx.Client, LoopbackServer], raw: bytes
) -> None:
    client, _ = stack
    for path in PATHS:
        reply = client.post(path, content=raw, headers={"content-type": "application/json"})
        check_answer(path, reply)
