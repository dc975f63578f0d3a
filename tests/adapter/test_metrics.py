"""``adapter/metrics.py``: the Prometheus page, names and values, as ``/metrics`` serves it from
the real app in-process against reference workers on loopback. (Request counters are
``test_tracking.py``'s, registration counters ``test_registration.py``'s.)"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from adapter.app import create_app
from adapter.metrics import CONTENT_TYPE
from adapter.tools.reference_worker import ReferenceWorkerConfig
from adapter.tools.reference_worker import create_app as reference_app
from tests.adapter.helpers import (
    VERSION,
    eventually,
    in_process,
    metric_value,
    settings_for,
    status_is,
)
from tests.support.servers import LoopbackServer


async def test_metrics_names_and_values_after_status_polls(ref_worker: LoopbackServer) -> None:
    app = create_app(settings_for(ref_worker.url, heartbeat_interval=0.1, status_interval=0.05))
    async with in_process(app) as client:
        await eventually(lambda: status_is(client, "/readyz", 200), what="ready")
        reply = await client.get("/metrics")
        assert reply.status_code == 200
        assert reply.headers["content-type"] == CONTENT_TYPE
        text = reply.text

    families = {f.name for f in text_string_to_metric_families(text)}
    ours = {name for name in families if name.startswith("fastchat_adapter_")}
    assert all(name.startswith(("process_", "python_")) for name in families - ours)
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info"} <= families
    assert "python_gc_collections" in families
    expected = {
        "upstream_queue_length", "upstream_speed", "upstream_up", "status_poll_failures",
        "num_requests_running", "num_requests_waiting", "requests", "request_success",
        "time_to_first_token_seconds", "e2e_request_latency_seconds", "prompt_tokens",
        "generation_tokens", "frames_relayed", "upstream_errors", "heartbeats",
        "registration_failures", "registered_models", "build_info",
    }  # fmt: skip
    assert {"fastchat_adapter_" + name for name in expected} <= ours
    assert "_created" not in text
    assert metric_value(text, "fastchat_adapter_build_info", version=VERSION) == 1
    assert metric_value(text, "fastchat_adapter_upstream_up", worker=ref_worker.url) == 1
    labels = {"worker": ref_worker.url, "model_name": "ref"}
    assert metric_value(text, "fastchat_adapter_upstream_queue_length", **labels) == 0
    assert metric_value(text, "fastchat_adapter_upstream_speed", **labels) == 1
    own_controller = settings_for(ref_worker.url, status_interval=0.05).effective_controllers[0]
    assert metric_value(text, "fastchat_adapter_registered_models", controller=own_controller) == 1


async def test_queue_length_metric_follows_the_worker() -> None:
    slow = ReferenceWorkerConfig(model_names=("slow",), tokens_per_second=20)
    with LoopbackServer(reference_app(slow)) as upstream:
        app = create_app(settings_for(upstream.url, status_interval=0.05))
        labels = {"worker": upstream.url, "model_name": "slow"}
        async with in_process(app) as client, httpx.AsyncClient() as direct:
            body = {"model": "slow", "prompt": "hi", "max_new_tokens": 40, "echo": False}
            url = upstream.url + "/worker_generate_stream"
            async with direct.stream("POST", url, json=body):  # held open, not read

                async def busy() -> bool:
                    text = (await client.get("/metrics")).text
                    return (
                        metric_value(text, "fastchat_adapter_upstream_queue_length", **labels) == 1
                    )

                await eventually(busy)

            async def idle() -> bool:
                text = (await client.get("/metrics")).text
                return metric_value(text, "fastchat_adapter_upstream_queue_length", **labels) == 0

            await eventually(idle)
            upstream.stop()

            async def down() -> bool:
                text = (await client.get("/metrics")).text
                return metric_value(text, "fastchat_adapter_upstream_up", worker=upstream.url) == 0

            await eventually(down)
