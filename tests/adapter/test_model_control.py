"""`dbgpt model start|stop|restart` on served models (adapter/model_control.py), through the
worker API routes DB-GPT's CLI calls, with the adapter standalone (its own registry shows the
effect) and a fake FastChat worker on loopback."""

from __future__ import annotations

from typing import Any

import pytest

from adapter.model_control import UNTOUCHED
from adapter.registration import SERVICE_KEY
from tests.adapter.helpers import (
    MODEL,
    Adapter,
    StartFake,
    chat,
    eventually,
    serving,
    settings_for,
    upstream_paths,
)
from tests.support.fake_worker import FakeWorker

KEY = f"{MODEL}@llm"
HEARTBEATS = "fastchat_adapter_heartbeats_total"


def _apply(apply_type: str, model: str = MODEL) -> dict[str, Any]:
    """The body `dbgpt model restart` sends to the model's instance (§8.8)."""
    body = {"model": model, "apply_type": apply_type, "worker_type": "llm", "params": {}}
    return {**body, "apply_user": None}


def _startup(model: str = MODEL, **extra: Any) -> dict[str, Any]:
    """The body `dbgpt model start|stop` sends to WorkerManager@service (§8.8)."""
    body = {"host": "127.0.0.1", "port": 1, "model": model, "worker_type": "llm", "params": {}}
    return {**body, "delete_after": False, "worker_name": None, "sys_code": None, **extra}


def _health(adapter: Adapter) -> bool | None:
    """Whether the registry lists the model healthy; None when it does not list it."""
    registry = adapter.runtime.registry
    assert registry is not None
    listed = registry.instances(KEY)
    return listed[0].healthy if listed else None


def _lively(fake: FakeWorker) -> Any:
    # Fast heartbeats, and the service entry, so heartbeats go on while the model is stopped.
    return settings_for(
        fake.url, heartbeat_interval=0.05, status_interval=0.05, register_service=True
    )


async def _heartbeats_pass(adapter: Adapter, count: int = 3) -> None:
    controller = adapter.runtime.settings.effective_controllers[0]  # our own, standalone

    def sent() -> float:
        return adapter.sample(HEARTBEATS, controller=controller, result="ok")

    before = sent()
    await eventually(lambda: sent() >= before + count, what=f"{count} heartbeats")


async def test_apply_stop_then_start(fake_worker: StartFake) -> None:
    """stop: marked unhealthy (DB-GPT's own stop), and heartbeats never revive it; start:
    healthy again. Both replies say the FastChat worker is untouched."""
    fake = fake_worker()
    async with serving(_lively(fake)) as adapter:
        await eventually(lambda: _health(adapter) is True, what="registered")
        stopped = await adapter.client.post("/api/worker/apply", json=_apply("stop"))
        await eventually(lambda: _health(adapter) is False, what="marked unhealthy")
        await _heartbeats_pass(adapter)
        assert _health(adapter) is False
        started = await adapter.client.post("/api/worker/apply", json=_apply("start"))
        await eventually(lambda: _health(adapter) is True, what="registered again")
    for reply, verb in ((stopped, "stopped"), (started, "started")):
        answer = reply.json()
        assert reply.status_code == 200 and list(answer) == ["message", "success", "timecost"]
        assert answer["success"] is True
        assert answer["message"].startswith(f"{verb} {KEY}: ")
        assert answer["message"].endswith(UNTOUCHED)


async def test_restart_drops_the_cached_template_and_registers_again(
    fake_worker: StartFake,
) -> None:
    fake = fake_worker()
    async with serving(_lively(fake)) as adapter:
        await eventually(lambda: _health(adapter) is True, what="registered")
        await adapter.client.post("/api/worker/generate", json=chat(max_new_tokens=2))
        reply = await adapter.client.post("/api/worker/apply", json=_apply("restart"))
        assert _health(adapter) is True  # deregistered and registered before the reply
        await adapter.client.post("/api/worker/generate", json=chat(max_new_tokens=2))
    assert reply.json()["success"] is True
    assert reply.json()["message"].startswith(f"restarted {KEY}: deregistered, cached template")
    # Fetched again after the restart: the cache was dropped.
    assert upstream_paths(fake.requests).count("/worker_get_conv_template") == 2


async def test_service_shutdown_and_startup(fake_worker: StartFake) -> None:
    """`dbgpt model stop` (models/shutdown; delete_after removes the entry) and `start`."""
    fake = fake_worker()
    async with serving(_lively(fake)) as adapter:
        await eventually(lambda: _health(adapter) is True, what="registered")
        down = await adapter.client.post("/api/worker/models/shutdown", json=_startup())
        await eventually(lambda: _health(adapter) is False, what="marked unhealthy")
        up = await adapter.client.post("/api/worker/models/startup", json=_startup())
        await eventually(lambda: _health(adapter) is True, what="registered again")
        gone = await adapter.client.post(
            "/api/worker/models/shutdown", json=_startup(delete_after=True)
        )
        await eventually(lambda: _health(adapter) is None, what="removed")
        registry = adapter.runtime.registry
        assert registry is not None and registry.instances(SERVICE_KEY)  # the service stays
    assert [r.status_code for r in (down, up, gone)] == [200, 200, 200]
    assert all(r.json()["message"].endswith(UNTOUCHED) for r in (down, up, gone))


@pytest.mark.parametrize("path", ["/api/worker/models/startup", "/api/worker/models/shutdown"])
async def test_startup_and_shutdown_of_an_unknown_model_are_404(
    fake_worker: StartFake, path: str
) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url)) as adapter:
        reply = await adapter.client.post(path, json=_startup("nope"))
        bad = await adapter.client.post(path, json={"host": "h"})
    assert reply.status_code == 404
    assert "no FastChat worker of this adapter serves that model" in reply.json()["detail"]
    assert bad.status_code == 422


async def test_apply_refuses_what_it_cannot_do(fake_worker: StartFake) -> None:
    fake = fake_worker()
    async with serving(settings_for(fake.url)) as adapter:
        update = await adapter.client.post("/api/worker/apply", json=_apply("update_params"))
        unknown = await adapter.client.post("/api/worker/apply", json=_apply("stop", "nope"))
        garbage = await adapter.client.post("/api/worker/apply", content=b"]")
    assert update.status_code == 200 and update.json()["success"] is False
    assert update.json()["message"] == f"update_params of {KEY} is not supported: {UNTOUCHED}"
    assert unknown.json()["success"] is False
    assert garbage.status_code == 200 and garbage.json()["success"] is False


async def test_parameter_descriptions_name_the_worker(fake_worker: StartFake) -> None:
    """What `dbgpt model start --help` builds its options from: one truthful parameter."""
    fake = fake_worker()
    async with serving(settings_for(fake.url)) as adapter:
        known = await adapter.client.get(
            "/api/worker/parameter/descriptions", params={"model": MODEL, "worker_type": "llm"}
        )
        unknown = await adapter.client.get(
            "/api/worker/parameter/descriptions", params={"model": "nope"}
        )
    (described,) = known.json()
    assert described["param_name"] == "fastchat_worker_address"
    assert described["default_value"] == fake.url
    assert described["param_type"] == "str" and described["param_class"]
    assert unknown.json() == []
