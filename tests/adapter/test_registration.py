"""Registration with DB-GPT controllers, against fake controllers and workers on loopback.

The adapter's runtime runs in the test's loop; controllers and FastChat workers are real
servers in threads, so every registration, heartbeat and delete crosses a real socket.
Timings use short intervals (heartbeat 0.2 s, status poll 0.1 s) with generous margins.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI

from adapter.registration import SERVICE_KEY
from adapter.tools.reference_worker import ReferenceWorkerConfig
from tests.adapter._registration import (
    DELETE,
    HEARTBEAT,
    REGISTER,
    body,
    calls,
    eventually,
    running,
    settings,
    until_listed,
)
from tests.support.fake_controller import FakeController
from tests.support.fake_worker import FakeWorker
from tests.support.servers import LoopbackServer


def worker(*names: str) -> FakeWorker:
    return FakeWorker(ReferenceWorkerConfig(model_names=names))


@pytest.fixture
def controller() -> Iterator[FakeController]:
    with FakeController() as fake:
        yield fake


@pytest.fixture
def tiny() -> Iterator[FakeWorker]:
    with worker("tiny") as fake:
        yield fake


class StatusWorker:
    """Just ``/worker_get_status`` with a model list the test can change (FakeWorker's is
    fixed), plus ``/list_models`` so it can also stand in for a FastChat controller."""

    def __init__(self, *names: str) -> None:
        self.names = list(names)
        app = FastAPI()

        @app.post("/worker_get_status")
        async def status() -> dict[str, Any]:
            return {"model_names": self.names, "speed": 1, "queue_length": 0}

        @app.post("/list_models")
        async def list_models() -> dict[str, Any]:
            return {"models": self.names}

        self.server = LoopbackServer(app)


# --- what is registered -----------------------------------------------------------------


async def test_every_served_name_is_registered_with_the_full_body(
    controller: FakeController,
) -> None:
    with worker("tiny", "tiny-alias") as llm, worker("emb") as embedder:
        config = settings(
            worker_address=[llm.url],
            embedding_worker_address=[embedder.url],
            controller_address=[controller.url],
            heartbeat_interval=30,
        )
        started = time.monotonic()
        async with running(config) as runtime:
            keys = ["tiny@llm", "tiny-alias@llm", "emb@text2vec"]
            await until_listed(controller, dict.fromkeys(keys, True))
            registered = [calls(controller, REGISTER, key) for key in keys]
            for key, [call] in zip(keys, registered, strict=True):
                assert call.body == body(key, config.port)
            last = max(call.at for [call] in registered)
            print(f"\nstart -> registered (in-process): {1000 * (last - started):.1f} ms")
            await eventually(lambda: runtime.ready, timeout=0.5)


async def test_worker_manager_service_entry_when_asked(
    controller: FakeController, tiny: FakeWorker
) -> None:
    config = settings(
        worker_address=[tiny.url], controller_address=[controller.url], register_service=True
    )
    async with running(config):
        await eventually(lambda: len(calls(controller, HEARTBEAT, SERVICE_KEY)) >= 2)
        [call] = calls(controller, REGISTER, SERVICE_KEY)
        assert call.body == body(SERVICE_KEY, config.port)
    assert controller.listing() == []


# --- heartbeats -------------------------------------------------------------------------


async def test_heartbeat_cadence_and_body(controller: FakeController, tiny: FakeWorker) -> None:
    config = settings(worker_address=[tiny.url], controller_address=[controller.url])
    async with running(config):
        [registered] = await _wait_calls(controller, REGISTER, "tiny@llm", 1)
        beats = await _wait_calls(controller, HEARTBEAT, "tiny@llm", 6, timeout=3)
    gaps = [b.at - a.at for a, b in zip([registered, *beats], beats, strict=False)]
    assert all(0.1 < gap < 0.35 for gap in gaps), gaps
    assert abs(sum(gaps[1:]) / len(gaps[1:]) - 0.2) < 0.03, gaps  # fixed rate: no drift
    assert all(b.body == body("tiny@llm", config.port) for b in beats)


async def test_heartbeat_polls_workers_first_and_skips_a_dead_one(
    controller: FakeController,
) -> None:
    with worker("a") as a, worker("b") as b:
        # Background polls effectively off: only the heartbeat's own poll can notice a death.
        config = settings(
            worker_address=[a.url, b.url], controller_address=[controller.url], status_interval=60
        )
        async with running(config) as runtime:
            await _wait_calls(controller, HEARTBEAT, "b@llm", 1)
            a.stop()
            stopped = time.monotonic()
            [soft] = await _wait_calls(controller, DELETE, "a@llm", 1, timeout=1)
            assert soft.at - stopped < 0.2 + 0.15  # noticed by the next heartbeat round
            await _wait_calls(controller, HEARTBEAT, "b@llm", len(_beats(controller, "b")) + 4)
            assert not [c for c in _beats(controller, "a") if c.at > stopped]
            # Each round polls, then heartbeats: the newest poll is after the previous beat.
            last_poll = runtime.pool.workers[b.url].last_seen
            assert last_poll is not None and last_poll > _beats(controller, "b")[-2].at
            skipped = runtime.metrics.heartbeats.labels(controller.url, "skipped_dead")
            assert skipped._value.get() >= 3
            assert await asyncio.to_thread(controller.health) == {"a@llm": False, "b@llm": True}


async def test_soft_delete_at_once_then_revival(
    controller: FakeController, tiny: FakeWorker
) -> None:
    config = settings(
        worker_address=[tiny.url], controller_address=[controller.url], heartbeat_interval=30
    )
    async with running(config) as runtime:
        await until_listed(controller, {"tiny@llm": True})
        tiny.stop()
        stopped = time.monotonic()
        [soft] = await _wait_calls(controller, DELETE, "tiny@llm", 1, timeout=2)
        assert soft.raw_query == f"model_name=tiny%40llm&host=127.0.0.1&port={config.port}"
        assert soft.body is None and soft.at - stopped < 0.5
        assert await asyncio.to_thread(controller.health) == {
            "tiny@llm": False
        }  # still listed, unhealthy
        assert not runtime.ready

        tiny.restart()
        await _wait_calls(controller, REGISTER, "tiny@llm", 2, timeout=2)
        assert await asyncio.to_thread(controller.health) == {"tiny@llm": True}
        await eventually(lambda: runtime.ready)


async def test_a_name_still_served_elsewhere_is_not_deleted(controller: FakeController) -> None:
    with worker("tiny") as first, worker("tiny") as second:
        config = settings(
            worker_address=[first.url, second.url], controller_address=[controller.url]
        )
        async with running(config):
            await _wait_calls(controller, HEARTBEAT, "tiny@llm", 1)
            first.stop()
            await _wait_calls(controller, HEARTBEAT, "tiny@llm", len(_beats(controller)) + 3)
            assert calls(controller, DELETE) == []
            assert await asyncio.to_thread(controller.health) == {"tiny@llm": True}


async def test_model_list_change_registers_new_and_removes_dropped(
    controller: FakeController,
) -> None:
    status = StatusWorker("a", "b")
    with status.server:
        config = settings(worker_address=[status.server.url], controller_address=[controller.url])
        async with running(config):
            await until_listed(controller, {"a@llm": True, "b@llm": True})
            status.names = ["b", "c"]
            await until_listed(controller, {"b@llm": True, "c@llm": True})
            [hard] = calls(controller, DELETE, "a@llm")
            assert hard.query["remove_from_registry"] == "true"
            assert len(calls(controller, REGISTER, "c@llm")) == 1


async def test_models_mirrored_from_a_fastchat_controller(controller: FakeController) -> None:
    fastchat = StatusWorker("x", "y")  # its aggregate status lists the live workers' models
    with fastchat.server:
        config = settings(
            fastchat_controller_address=fastchat.server.url, controller_address=[controller.url]
        )
        async with running(config):
            await until_listed(controller, {"x@llm": True, "y@llm": True})
            fastchat.names = ["y"]  # x's worker left the FastChat controller
            await until_listed(controller, {"y@llm": True})
            fastchat.server.stop()  # the FastChat controller itself is gone
            await until_listed(controller, {"y@llm": False})


# --- controllers that restart, fail or multiply ------------------------------------------


async def test_restarted_controller_has_everything_back_within_one_interval(
    controller: FakeController,
) -> None:
    with worker("tiny") as llm, worker("emb") as embedder:
        config = settings(
            worker_address=[llm.url],
            embedding_worker_address=[embedder.url],
            controller_address=[controller.url],
            heartbeat_interval=0.5,
        )
        async with running(config):
            everything = {"tiny@llm": True, "emb@text2vec": True}
            await until_listed(controller, everything)
            await asyncio.to_thread(controller.restart)
            restarted = time.monotonic()
            back = await until_listed(controller, everything, timeout=2)
            print(f"\ncontroller restart -> all back: {1000 * (back - restarted):.0f} ms")
            assert back - restarted < 0.5 + 0.2


async def test_every_controller_gets_everything(tiny: FakeWorker) -> None:
    with FakeController() as one, FakeController() as two:
        config = settings(worker_address=[tiny.url], controller_address=[one.url, two.url])
        async with running(config) as runtime:
            for fake in (one, two):
                await _wait_calls(fake, HEARTBEAT, "tiny@llm", 2)
            assert runtime.ready
            two.stop()  # one controller down: the other is still served, and we stay ready
            mark = len(_beats(one))
            await _wait_calls(one, HEARTBEAT, "tiny@llm", mark + 3)
            assert runtime.registrar is not None and runtime.registrar.registered_everywhere
            two.restart()  # back, empty
            await until_listed(two, {"tiny@llm": True}, timeout=1)
        for fake in (one, two):
            assert fake.listing() == []


async def test_failover_mode_talks_to_one_controller_and_moves_on_failure(
    tiny: FakeWorker,
) -> None:
    """--controller-mode failover (controllers sharing one registry): every call goes to the
    first controller only; when it fails (500, then down) the same calls go to the next one,
    and it stays there; the SIGTERM delete goes to the active one, once."""
    with FakeController() as one, FakeController() as two:
        config = settings(
            worker_address=[tiny.url],
            controller_address=[one.url, two.url],
            controller_mode="failover",
        )
        async with running(config) as runtime:
            await _wait_calls(one, HEARTBEAT, "tiny@llm", 2)
            assert runtime.ready
            assert len(calls(one, REGISTER, "tiny@llm")) == 1 and two.calls == []
            one.fail_status = 500  # a failing registry database
            await _wait_calls(two, HEARTBEAT, "tiny@llm", 2)
            one.fail_status = None
            one.stop()
            mark = len(_beats(two))
            await _wait_calls(two, HEARTBEAT, "tiny@llm", mark + 2)
            one.start()  # back: the active one stays active (no flapping)
            mark = len(_beats(two))
            await _wait_calls(two, HEARTBEAT, "tiny@llm", mark + 2)
            failovers = runtime.metrics.registry.get_sample_value(
                "fastchat_adapter_controller_failovers_total", {"controller": two.url}
            )
            assert failovers == 1
            assert runtime.ready
            one.clear_calls()
        assert len(calls(two, DELETE, "tiny@llm")) == 1 and one.calls == []


async def test_backoff_while_the_controller_fails_at_start(
    controller: FakeController, tiny: FakeWorker
) -> None:
    controller.fail_status = 500
    config = settings(
        worker_address=[tiny.url], controller_address=[controller.url], heartbeat_interval=2
    )
    async with running(config) as runtime:
        await asyncio.sleep(4.5)
        attempts = [c.at for c in calls(controller, REGISTER, "tiny@llm")]
        assert not runtime.ready and runtime.pool.any_alive()  # serving, not ready
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        # Equal jitter on 0.5 s doubling, capped at the 2 s heartbeat interval:
        # waits fall in [0.25, 0.5], [0.5, 1], then [1, 2] for good.
        assert 4 <= len(attempts) <= 7, gaps
        windows = [(0.25, 0.5), (0.5, 1.0)] + [(1.0, 2.0)] * len(gaps)
        for gap, (low, high) in zip(gaps, windows, strict=False):
            assert low - 0.02 < gap < high + 0.1, gaps
        controller.fail_status = None
        done = await until_listed(controller, {"tiny@llm": True}, timeout=2.5)
        await eventually(lambda: runtime.ready, timeout=0.5)
        assert done - attempts[-1] < 2.1


async def test_controller_down_at_start_then_up(tiny: FakeWorker) -> None:
    fake = FakeController()
    fake.start()
    fake.stop()  # its port is known and closed
    config = settings(
        worker_address=[tiny.url], controller_address=[fake.url], heartbeat_interval=1
    )
    try:
        async with running(config) as runtime:
            await asyncio.sleep(0.5)
            assert not runtime.ready
            fake.start()
            up = time.monotonic()
            back = await until_listed(fake, {"tiny@llm": True}, timeout=2)
            assert back - up < 1.1  # the backoff never waits longer than one interval
            await eventually(lambda: runtime.ready, timeout=0.5)
    finally:
        fake.stop()


async def test_metrics_count_heartbeats_and_registered_models(
    controller: FakeController, tiny: FakeWorker
) -> None:
    config = settings(worker_address=[tiny.url], controller_address=[controller.url])
    async with running(config) as runtime:
        m = runtime.metrics

        def value(name: str, **labels: str) -> float:
            found = m.registry.get_sample_value(name, {"controller": controller.url, **labels})
            return found or 0.0

        await eventually(lambda: value("fastchat_adapter_heartbeats_total", result="ok") >= 2)
        assert value("fastchat_adapter_registered_models") == 1
        controller.fail_status = 500
        await eventually(lambda: value("fastchat_adapter_heartbeats_total", result="error") > 0)
        assert value("fastchat_adapter_registered_models") == 0
        controller.fail_status = None
        await eventually(lambda: value("fastchat_adapter_registered_models") == 1, timeout=1)
        await runtime.begin_shutdown()
        assert value("fastchat_adapter_registered_models") == 0


# --- helpers ----------------------------------------------------------------------------


async def _wait_calls(
    fake: FakeController, kind: tuple[str, str], key: str, count: int, timeout: float = 5
) -> list[Any]:
    await eventually(
        lambda: len(calls(fake, kind, key)) >= count, timeout, f"{count} x {kind} {key}"
    )
    return calls(fake, kind, key)


def _beats(fake: FakeController, name: str = "tiny") -> list[Any]:
    return calls(fake, HEARTBEAT, f"{name}@llm")


# --- measured ---------------------------------------------------------------------------


async def test_measured_worker_death_to_unhealthy_with_the_default_status_interval(
    controller: FakeController, tiny: FakeWorker
) -> None:
    """The default 2 s status poll: the soft delete lands within one poll of the death,
    whatever the phase (the 20 s heartbeat plays no part)."""
    config = settings(
        worker_address=[tiny.url],
        controller_address=[controller.url],
        status_interval=2.0,
        heartbeat_interval=20.0,
    )
    started = time.monotonic()
    async with running(config):
        await until_listed(controller, {"tiny@llm": True})
        [first] = calls(controller, REGISTER, "tiny@llm")
        print(f"\nRuntime.start -> registered: {1000 * (first.at - started):.0f} ms")
        delays = []
        for phase in (0.3, 1.1, 1.9):  # where in the poll cycle the worker dies
            await asyncio.sleep(phase)
            await asyncio.to_thread(tiny.stop)
            stopped = time.monotonic()
            unhealthy = await until_listed(controller, {"tiny@llm": False}, timeout=4)
            delays.append(unhealthy - stopped)
            await asyncio.to_thread(tiny.restart)
            await until_listed(controller, {"tiny@llm": True}, timeout=4)
        print("worker death -> unhealthy: " + ", ".join(f"{d:.2f} s" for d in delays))
        assert all(d < 2.0 + 0.5 for d in delays), delays


async def test_heartbeats_go_on_after_an_unexpected_poll_error(
    controller: FakeController, tiny: FakeWorker
) -> None:
    # A bug or an odd reply in the poll before a heartbeat must cost one round, not end
    # heartbeats for good (DB-GPT would mark everything unhealthy a minute later).
    config = settings(worker_address=[tiny.url], controller_address=[controller.url])
    async with running(config) as runtime:
        await _wait_calls(controller, REGISTER, "tiny@llm", 1)
        refresh = runtime.pool.refresh
        failures = iter([RuntimeError("surprise")] * 5)  # the status loop shares some

        async def flaky_refresh() -> None:
            failure = next(failures, None)
            if failure is not None:
                raise failure
            await refresh()

        runtime.pool.refresh = flaky_refresh  # type: ignore[method-assign]
        before = len(calls(controller, HEARTBEAT, "tiny@llm"))
        await _wait_calls(controller, HEARTBEAT, "tiny@llm", before + 3, timeout=3)
