"""``adapter/tracking.py``: what each worker API request leaves behind once it is done: the
``requests`` counter by route, model and outcome, ``num_requests_running`` / ``_waiting`` and
the runtime's in-flight count (what SIGTERM drains), frames, latencies, tokens from ``usage``,
finish reasons, and its access log line."""

from __future__ import annotations

import asyncio
import io
import json

from adapter.app import create_app
from adapter.tools.reference_worker import ReferenceWorkerConfig
from tests.adapter.helpers import (
    MODEL,
    StartFake,
    chat,
    eventually,
    in_process,
    log_lines,
    metric_value,
    serving,
    settings_for,
    status_is,
    stream,
)
from tests.support.servers import LoopbackServer


async def test_metrics_and_inflight_accounting(fake_worker: StartFake) -> None:
    fake = fake_worker(ReferenceWorkerConfig(first_token_delay=0.3))
    async with serving(settings_for(fake.url)) as adapter:
        task = asyncio.create_task(stream(adapter.client, chat(max_new_tokens=3)))
        await eventually(lambda: adapter.runtime.inflight.count == 1, what="in flight")
        labels = {"route": "generate_stream", "model_name": MODEL}
        # Before its first token the stream is waiting, not running (vLLM's meaning).
        assert adapter.sample("fastchat_adapter_num_requests_waiting", model_name=MODEL) == 1
        assert adapter.sample("fastchat_adapter_num_requests_running", **labels) == 0
        await task
        await eventually(lambda: adapter.runtime.inflight.count == 0, what="drained")
        assert adapter.sample("fastchat_adapter_num_requests_waiting", model_name=MODEL) == 0
        assert adapter.sample("fastchat_adapter_num_requests_running", **labels) == 0
        assert adapter.sample("fastchat_adapter_requests_total", **labels, outcome="ok") == 1
        assert adapter.sample("fastchat_adapter_frames_relayed_total", model_name=MODEL) == 3
        ttft = adapter.sample("fastchat_adapter_time_to_first_token_seconds_sum", model_name=MODEL)
        assert 0.3 <= ttft < 5


async def test_request_metrics_after_worker_api_traffic(
    ref_worker: LoopbackServer, json_log: io.StringIO
) -> None:
    app = create_app(settings_for(ref_worker.url, status_interval=0.05))
    request = {
        "model": "ref",
        "messages": [{"role": "human", "content": "Hello", "round_index": 0}],
        "echo": False,
        "max_new_tokens": 12,
    }
    async with in_process(app) as client:
        await eventually(lambda: status_is(client, "/readyz", 200), what="ready")
        stream = await client.post("/api/worker/generate_stream", json=request)
        frames = [f for f in stream.content.split(b"\0") if f]
        assert frames and json.loads(frames[-1])["finish_reason"] == "length"
        assert (await client.post("/api/worker/generate", json=request)).status_code == 200
        unknown = await client.post("/api/worker/generate", json={**request, "model": "nope"})
        assert json.loads(unknown.content)["error_code"] != 0
        text = (await client.get("/metrics")).text

    def count(name: str, **labels: str) -> float | None:
        return metric_value(text, "fastchat_adapter_" + name, **labels)

    ref = {"model_name": "ref"}
    assert count("requests_total", route="generate_stream", **ref, outcome="ok") == 1
    assert count("requests_total", route="generate", **ref, outcome="ok") == 1
    unknown = {"model_name": "unknown"}
    assert count("requests_total", route="generate", **unknown, outcome="rejected") == 1
    assert count("num_requests_running", route="generate_stream", **ref) == 0
    assert count("num_requests_waiting", **ref) == 0
    assert count("frames_relayed_total", **ref) == len(frames)  # streams only
    first_frames = count("time_to_first_token_seconds_count", **ref)
    assert first_frames is not None and first_frames >= 1
    assert count("e2e_request_latency_seconds_count", route="generate_stream", **ref) == 1
    durations = count("e2e_request_latency_seconds_sum", route="generate_stream", **ref)
    assert durations is not None and durations > 0
    # Both generations ran to max_new_tokens: usage and finish reasons are counted.
    assert count("request_success_total", **ref, finished_reason="length") == 2
    usage = [u for u in (json.loads(f).get("usage") for f in frames) if u][-1]
    assert count("prompt_tokens_total", **ref) == 2 * usage["prompt_tokens"]
    assert count("generation_tokens_total", **ref) == 2 * usage["completion_tokens"]

    access = [line for line in log_lines(json_log) if line["logger"] == "fastchat_adapter.access"]
    assert [(a["path"], a["model"]) for a in access if a["path"].startswith("/api/worker")] == [
        ("/api/worker/generate_stream", "ref"),
        ("/api/worker/generate", "ref"),
        ("/api/worker/generate", "nope"),
    ]
    assert not any("Hello" in json.dumps(line) for line in log_lines(json_log))  # no bodies
