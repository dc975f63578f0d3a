"""``adapter/app.py``: what the app mounts. Standalone (no ``--controller-address``) it is the
controller too, serving DB-GPT's controller API with its own models registered in it; given a
controller, it mounts no controller API."""

from __future__ import annotations

from adapter.app import create_app
from tests.adapter.helpers import eventually, free_port, serving, settings_for
from tests.support.fake_controller import FakeController
from tests.support.fake_worker import FakeWorker


async def test_standalone_serves_the_controller_api_with_its_own_models(tiny: FakeWorker) -> None:
    config = settings_for(
        brisk=True,
        worker_address=[tiny.url],
        heartbeat_interval=30,
        port=free_port(),
        controller_accept_workers=True,
    )
    assert config.standalone
    async with serving(config, port=config.port) as adapter:
        client, runtime = adapter.client, adapter.runtime
        assert (await client.get("/api/health")).json() == {"status": "ok"}
        [own] = (await client.get("/api/controller/models", params={"healthy_only": "1"})).json()
        assert (own["model_name"], own["host"], own["port"]) == (
            "tiny@llm",
            "127.0.0.1",
            config.port,
        )
        assert (await client.get("/readyz")).status_code == 200  # registered at once
        # With --controller-accept-workers, other DB-GPT workers may register here too.
        other = {"model_name": "other@llm", "host": "10.0.0.9", "port": 1}
        assert (await client.post("/api/controller/heartbeat", json=other)).json() is True
        listed = (await client.get("/api/controller/models")).json()
        assert [i["model_name"] for i in listed] == ["tiny@llm", "other@llm"]
        assert runtime.ready
        tiny.stop()
        await eventually(lambda: not runtime.pool.any_alive(), timeout=2)
        [own] = (await client.get("/api/controller/models?model_name=tiny%40llm")).json()
        assert own["healthy"] is False  # soft delete into our own registry


async def test_no_controller_api_when_a_controller_is_given(tiny: FakeWorker) -> None:
    with FakeController() as fake:
        app = create_app(
            settings_for(brisk=True, worker_address=[tiny.url], controller_address=[fake.url])
        )
        routes = {getattr(route, "path", "") for route in app.routes}
        assert "/api/controller/models" not in routes and "/api/health" not in routes
