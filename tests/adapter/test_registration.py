"""``adapter/registration.py``: registration with DB-GPT controllers, heartbeats, pool events,
backoff, and deregistration at shutdown, against fake controllers and workers on loopback.

The adapter's runtime runs in the test's loop; controllers and FastChat workers are real
servers in threads, so every registration, heartbeat and delete crosses a real socket.
Intervals are short (heartbeat 0.2 s, status poll 0.1 s); what is checked is the order of the
calls the controller saw, and the schedule the code computed (its heartbeat wake-ups, its
backoff waits), not how long anything took.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import pytest
from fastapi import FastAPI

from adapter import registration
from adapter.registration import SERVICE_KEY, SHUTDOWN_CALL_TIMEOUT
from adapter.tools.reference_worker import ReferenceWorkerConfig
from tests.adapter.helpers import (
    DELETE,
    HEARTBEAT,
    REGISTER,
    controller_calls,
    eventually,
    hard_delete_query,
    instance_body,
    running,
    sample,
    settings_for,
    until_listed,
    wait_calls,
    within,
)
from tests.support.fake_controller import FakeController
from tests.support.fake_worker import FakeWorker
from tests.support.servers import LoopbackServer


def worker(*names: str) -> FakeWorker:
    return FakeWorker(ReferenceWorkerConfig(model_names=names))


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
        config = settings_for(
            brisk=True,
            worker_address=[llm.url],
            embedding_worker_address=[embedder.url],
            controller_address=[controller.url],
            heartbeat_interval=30,
        )
        async with running(config) as runtime:
            keys = ["tiny@llm", "tiny-alias@llm", "emb@text2vec"]
            await until_listed(controller, dict.fromkeys(keys, True))
            registered = [controller_calls(controller, REGISTER, key) for key in keys]
            for key, [call] in zip(keys, registered, strict=True):
                assert call.body == instance_body(key, config.port)
            await eventually(lambda: runtime.ready, what="ready")


async def test_worker_manager_service_entry_when_asked(
    controller: FakeController, tiny: FakeWorker
) -> None:
    config = settings_for(
        brisk=True,
        worker_address=[tiny.url],
        controller_address=[controller.url],
        register_service=True,
    )
    async with running(config):
        await eventually(lambda: len(controller_calls(controller, HEARTBEAT, SERVICE_KEY)) >= 2)
        [call] = controller_calls(controller, REGISTER, SERVICE_KEY)
        assert call.body == instance_body(SERVICE_KEY, config.port)
    assert controller.listing() == []


# --- heartbeats -------------------------------------------------------------------------


async def test_heartbeat_cadence_and_body(
    controller: FakeController, tiny: FakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    schedule = _Schedule()
    monkeypatch.setattr(registration, "asyncio", schedule)
    config = settings_for(
        brisk=True, worker_address=[tiny.url], controller_address=[controller.url]
    )
    async with running(config):
        await wait_calls(controller, REGISTER, "tiny@llm", 1)
        beats = await wait_calls(controller, HEARTBEAT, "tiny@llm", 6)
    assert all(b.body == instance_body("tiny@llm", config.port) for b in beats)
    # Every round wakes one interval after the previous one was *due*, however long the round
    # took or however late it ran (a fixed rate: no drift); a round already late does not
    # sleep at all.
    wakes = schedule.wakes
    assert len(wakes) >= 6, wakes
    first = wakes[0][1]
    for number, (delay, wake) in enumerate(wakes):
        if delay > 0:
            assert wake == pytest.approx(first + number * 0.2, abs=1e-6), wakes


class _Schedule:
    """Stands in for ``adapter.registration``'s ``asyncio``: records where each of the heartbeat
    loop's sleeps was meant to end, (delay, loop time), from the loop time the code read."""

    def __init__(self) -> None:
        self.wakes: list[tuple[float, float]] = []
        self._now = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    def get_running_loop(self) -> Any:
        loop, schedule = asyncio.get_running_loop(), self

        class Clock:
            def __getattr__(self, name: str) -> Any:
                return getattr(loop, name)

            def time(self) -> float:
                schedule._now = loop.time()
                return schedule._now

        return Clock()

    async def sleep(self, delay: float) -> None:
        self.wakes.append((delay, self._now + delay))
        await asyncio.sleep(delay)


async def test_heartbeat_polls_workers_first_and_skips_a_dead_one(
    controller: FakeController,
) -> None:
    with worker("a") as a, worker("b") as b:
        # Background polls effectively off: only the heartbeat's own poll can notice a death.
        config = settings_for(
            brisk=True,
            worker_address=[a.url, b.url],
            controller_address=[controller.url],
            status_interval=60,
        )
        async with running(config) as runtime:
            await wait_calls(controller, HEARTBEAT, "b@llm", 1)
            a.stop()
            stopped = time.monotonic()
            [soft] = await wait_calls(controller, DELETE, "a@llm", 1)
            # Noticed by the next heartbeat round's poll: b got at most the heartbeat of the
            # round already under way when a stopped before a's delete (each round sends its
            # deletes before its heartbeats).
            between = [c for c in _beats(controller, "b") if stopped < c.at < soft.at]
            assert len(between) <= 1, between
            await wait_calls(controller, HEARTBEAT, "b@llm", len(_beats(controller, "b")) + 4)
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
    config = settings_for(
        brisk=True,
        worker_address=[tiny.url],
        controller_address=[controller.url],
        heartbeat_interval=30,
    )
    async with running(config) as runtime:
        await until_listed(controller, {"tiny@llm": True})
        tiny.stop()
        stopped = time.monotonic()
        [soft] = await wait_calls(controller, DELETE, "tiny@llm", 1)
        assert soft.raw_query == f"model_name=tiny%40llm&host=127.0.0.1&port={config.port}"
        assert soft.body is None
        # At once: from the status poll, not a heartbeat round (every 30 s, none so far).
        assert [c for c in _beats(controller) if c.at < soft.at] == []
        assert stopped < soft.at
        assert await asyncio.to_thread(controller.health) == {
            "tiny@llm": False
        }  # still listed, unhealthy
        assert not runtime.ready

        tiny.restart()
        await wait_calls(controller, REGISTER, "tiny@llm", 2)
        assert await asyncio.to_thread(controller.health) == {"tiny@llm": True}
        await eventually(lambda: runtime.ready)


async def test_a_name_still_served_elsewhere_is_not_deleted(controller: FakeController) -> None:
    with worker("tiny") as first, worker("tiny") as second:
        config = settings_for(
            brisk=True, worker_address=[first.url, second.url], controller_address=[controller.url]
        )
        async with running(config):
            await wait_calls(controller, HEARTBEAT, "tiny@llm", 1)
            first.stop()
            await wait_calls(controller, HEARTBEAT, "tiny@llm", len(_beats(controller)) + 3)
            assert controller_calls(controller, DELETE) == []
            assert await asyncio.to_thread(controller.health) == {"tiny@llm": True}


async def test_model_list_change_registers_new_and_removes_dropped(
    controller: FakeController,
) -> None:
    status = StatusWorker("a", "b")
    with status.server:
        config = settings_for(
            brisk=True, worker_address=[status.server.url], controller_address=[controller.url]
        )
        async with running(config):
            await until_listed(controller, {"a@llm": True, "b@llm": True})
            status.names = ["b", "c"]
            await until_listed(controller, {"b@llm": True, "c@llm": True})
            [hard] = controller_calls(controller, DELETE, "a@llm")
            assert hard.query["remove_from_registry"] == "true"
            assert len(controller_calls(controller, REGISTER, "c@llm")) == 1


async def test_models_mirrored_from_a_fastchat_controller(controller: FakeController) -> None:
    fastchat = StatusWorker("x", "y")  # its aggregate status lists the live workers' models
    with fastchat.server:
        config = settings_for(
            brisk=True,
            fastchat_controller_address=fastchat.server.url,
            controller_address=[controller.url],
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
        config = settings_for(
            brisk=True,
            worker_address=[llm.url],
            embedding_worker_address=[embedder.url],
            controller_address=[controller.url],
            heartbeat_interval=0.5,
        )
        async with running(config):
            everything = {"tiny@llm": True, "emb@text2vec": True}
            await until_listed(controller, everything)
            await asyncio.to_thread(controller.stop)  # a restart: down, state lost, up again
            controller.clear_calls()  # from here on, only what the restarted one sees
            controller.registry.clear()
            await asyncio.to_thread(controller.start)
            await until_listed(controller, everything)
        # Everything was back before a second heartbeat round reached it: the first round
        # re-creates what it heartbeats (or, had it hit the restart, the retry re-registers).
        back = max(
            min(c.done for c in controller.calls if c.status == 200 and _key(c) == key)
            for key in everything
        )
        rounds = [c for c in _beats(controller) if c.at < back]
        assert len(rounds) <= 1, controller.calls


async def test_every_controller_gets_everything(tiny: FakeWorker) -> None:
    with FakeController() as one, FakeController() as two:
        config = settings_for(
            brisk=True, worker_address=[tiny.url], controller_address=[one.url, two.url]
        )
        async with running(config) as runtime:
            for fake in (one, two):
                await wait_calls(fake, HEARTBEAT, "tiny@llm", 2)
            assert runtime.ready
            two.stop()  # one controller down: the other is still served, and we stay ready
            mark = len(_beats(one))
            await wait_calls(one, HEARTBEAT, "tiny@llm", mark + 3)
            assert runtime.registrar is not None and runtime.registrar.registered_everywhere
            two.restart()  # back, empty
            await until_listed(two, {"tiny@llm": True})
        for fake in (one, two):
            assert fake.listing() == []


async def test_failover_mode_talks_to_one_controller_and_moves_on_failure(
    tiny: FakeWorker,
) -> None:
    """--controller-mode failover (controllers sharing one registry): every call goes to the
    first controller only; when it fails (500, then down) the same calls go to the next one,
    and it stays there; the SIGTERM delete goes to the active one, once."""
    with FakeController() as one, FakeController() as two:
        config = settings_for(
            tiny.url,
            brisk=True,
            controller_address=[one.url, two.url],
            controller_mode="failover",
        )
        async with running(config) as runtime:
            await wait_calls(one, HEARTBEAT, "tiny@llm", 2)
            assert runtime.ready
            assert len(controller_calls(one, REGISTER, "tiny@llm")) == 1 and two.calls == []
            one.fail_status = 500  # a failing registry database
            await wait_calls(two, HEARTBEAT, "tiny@llm", 2)
            one.fail_status = None
            one.stop()
            mark = len(_beats(two))
            await wait_calls(two, HEARTBEAT, "tiny@llm", mark + 2)
            one.start()  # back: the active one stays active (no flapping)
            mark = len(_beats(two))
            await wait_calls(two, HEARTBEAT, "tiny@llm", mark + 2)
            failovers = runtime.metrics.registry.get_sample_value(
                "fastchat_adapter_controller_failovers_total", {"controller": two.url}
            )
            assert failovers == 1
            assert runtime.ready
            one.clear_calls()
        assert len(controller_calls(two, DELETE, "tiny@llm")) == 1 and one.calls == []


async def test_backoff_while_the_controller_fails_at_start(
    controller: FakeController, tiny: FakeWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fastchat_adapter.registration")
    controller.fail_status = 500
    config = settings_for(
        brisk=True,
        worker_address=[tiny.url],
        controller_address=[controller.url],
        heartbeat_interval=2,
    )
    async with running(config) as runtime:
        await wait_calls(controller, REGISTER, "tiny@llm", 5, timeout=15)
        assert not runtime.ready and runtime.pool.any_alive()  # serving, not ready
        waits = backoff_waits(caplog)
        # Equal jitter on 0.5 s doubling, capped at the 2 s heartbeat interval:
        # waits fall in [0.25, 0.5], [0.5, 1], then [1, 2] for good.
        assert len(waits) >= 4, waits
        windows = [(0.25, 0.5), (0.5, 1.0)] + [(1.0, 2.0)] * len(waits)
        for wait, (low, high) in zip(waits, windows, strict=False):
            assert low <= wait <= high, waits
        # ...and the attempts keep to them (arrival times: a margin for a loaded machine).
        attempts = [c.at for c in controller_calls(controller, REGISTER, "tiny@llm")]
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        for gap, wait in zip(gaps, waits, strict=False):
            assert gap > wait - 0.1, (gaps, waits)
        controller.fail_status = None
        await until_listed(controller, {"tiny@llm": True})
        await eventually(lambda: runtime.ready, what="ready")
    # The attempt after the last failure registered: no wait longer than the interval (above).
    statuses = [c.status for c in controller_calls(controller, REGISTER, "tiny@llm")]
    assert statuses[: statuses.index(200)] == [500] * statuses.index(200), statuses
    assert set(statuses[statuses.index(200) :]) == {200}, statuses


async def test_controller_down_at_start_then_up(
    tiny: FakeWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fastchat_adapter.registration")
    fake = FakeController()
    fake.start()
    fake.stop()  # its port is known and closed
    config = settings_for(
        brisk=True, worker_address=[tiny.url], controller_address=[fake.url], heartbeat_interval=1
    )
    try:
        async with running(config) as runtime:
            await asyncio.sleep(0.5)
            assert not runtime.ready
            fake.start()
            await until_listed(fake, {"tiny@llm": True})
            await eventually(lambda: runtime.ready, what="ready")
        # The backoff never waits longer than one interval, and the first call that reached
        # the controller once it was up registered.
        waits = backoff_waits(caplog)
        assert waits and max(waits) <= 1.0, waits
        first = next(c for c in fake.calls if c.method != "GET")  # not the test's listings
        assert ((first.method, first.path), first.status) == (REGISTER, 200)
    finally:
        fake.stop()


async def test_metrics_count_heartbeats_and_registered_models(
    controller: FakeController, tiny: FakeWorker
) -> None:
    config = settings_for(
        brisk=True, worker_address=[tiny.url], controller_address=[controller.url]
    )
    async with running(config) as runtime:

        def value(name: str, **labels: str) -> float:
            return sample(runtime, name, controller=controller.url, **labels)

        await eventually(lambda: value("fastchat_adapter_heartbeats_total", result="ok") >= 2)
        assert value("fastchat_adapter_registered_models") == 1
        controller.fail_status = 500
        await eventually(lambda: value("fastchat_adapter_heartbeats_total", result="error") > 0)
        assert value("fastchat_adapter_registered_models") == 0
        controller.fail_status = None
        await eventually(lambda: value("fastchat_adapter_registered_models") == 1)
        await runtime.begin_shutdown()
        assert value("fastchat_adapter_registered_models") == 0


def _beats(fake: FakeController, name: str = "tiny") -> list[Any]:
    return controller_calls(fake, HEARTBEAT, f"{name}@llm")


def backoff_waits(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The waits the registrar's retry schedule computed, in order (from its debug log)."""
    return [
        float(record.args[2])  # type: ignore[index]
        for record in caplog.records
        if record.name == "fastchat_adapter.registration"
        and record.msg == "controller %s: attempt %d failed, next in %.2f s"
    ]


async def test_measured_worker_death_to_unhealthy_with_the_default_status_interval(
    controller: FakeController, tiny: FakeWorker
) -> None:
    """The default 2 s status poll: the soft delete comes from the first poll after the death,
    whatever the phase (the 20 s heartbeat plays no part)."""
    config = settings_for(
        brisk=True,
        worker_address=[tiny.url],
        controller_address=[controller.url],
        status_interval=2.0,
        heartbeat_interval=20.0,
    )
    async with running(config) as runtime:
        polls: list[float] = []  # when each status poll began
        refresh = runtime.pool.refresh

        async def recorded_refresh() -> None:
            polls.append(time.monotonic())
            await refresh()

        runtime.pool.refresh = recorded_refresh  # type: ignore[method-assign]
        await until_listed(controller, {"tiny@llm": True})
        for phase in (0.3, 1.1, 1.9):  # where in the poll cycle the worker dies
            await asyncio.sleep(phase)
            stopping = time.monotonic()
            await asyncio.to_thread(tiny.stop)
            stopped = time.monotonic()  # down for sure from here (maybe a bit before)
            await until_listed(controller, {"tiny@llm": False}, timeout=10)
            soft = controller_calls(controller, DELETE, "tiny@llm")[-1]
            assert soft.at > stopping  # this death's delete
            # Within one poll: no poll that began once the worker was down came and went
            # without the delete following it.
            assert len([p for p in polls if stopped < p < soft.at]) <= 1, (phase, polls)
            assert [c for c in _beats(controller) if stopping < c.at < soft.at] == []
            await asyncio.to_thread(tiny.restart)
            await until_listed(controller, {"tiny@llm": True}, timeout=10)


async def test_heartbeats_go_on_after_an_unexpected_poll_error(
    controller: FakeController, tiny: FakeWorker
) -> None:
    # A bug or an odd reply in the poll before a heartbeat must cost one round, not end
    # heartbeats for good (DB-GPT would mark everything unhealthy a minute later).
    config = settings_for(
        brisk=True, worker_address=[tiny.url], controller_address=[controller.url]
    )
    async with running(config) as runtime:
        await wait_calls(controller, REGISTER, "tiny@llm", 1)
        refresh = runtime.pool.refresh
        failures = iter([RuntimeError("surprise")] * 5)  # the status loop shares some

        async def flaky_refresh() -> None:
            failure = next(failures, None)
            if failure is not None:
                raise failure
            await refresh()

        runtime.pool.refresh = flaky_refresh  # type: ignore[method-assign]
        before = len(controller_calls(controller, HEARTBEAT, "tiny@llm"))
        await wait_calls(controller, HEARTBEAT, "tiny@llm", before + 3, timeout=3)


def _key(call: Any) -> str | None:
    if isinstance(call.body, dict):
        return call.body.get("model_name")
    return call.query.get("model_name")


# --- shutdown: deregistered everywhere, nothing after -----------------------------------


async def test_shutdown_hard_deletes_everything_everywhere_and_nothing_returns(
    tiny: FakeWorker,
) -> None:
    with (
        FakeWorker(ReferenceWorkerConfig(model_names=("emb",))) as embedder,
        FakeController() as one,
        FakeController() as two,
    ):
        config = settings_for(
            brisk=True,
            worker_address=[tiny.url],
            embedding_worker_address=[embedder.url],
            controller_address=[one.url, two.url],
            register_service=True,
        )
        keys = ["tiny@llm", "emb@text2vec", SERVICE_KEY]
        async with running(config) as runtime:
            for fake in (one, two):
                await wait_calls(fake, HEARTBEAT, "tiny@llm", 2)
            await runtime.begin_shutdown()
            assert not runtime.ready
            for fake in (one, two):
                deletes = controller_calls(fake, DELETE)
                assert sorted(c.raw_query for c in deletes) == sorted(
                    hard_delete_query(key, config.port) for key in keys
                )
                assert await asyncio.to_thread(fake.listing) == []
            last = max(c.at for fake in (one, two) for c in fake.calls)
            tiny.stop()  # a pool event after shutdown must not send anything either
            await asyncio.sleep(1.0)  # five heartbeat intervals
        for fake in (one, two):
            assert [c for c in fake.calls if c.at > last] == []
            assert fake.listing() == []


async def test_a_call_in_flight_at_shutdown_lands_before_the_delete(tiny: FakeWorker) -> None:
    with FakeController() as fake:
        config = settings_for(brisk=True, worker_address=[tiny.url], controller_address=[fake.url])
        async with running(config) as runtime:
            await until_listed(fake, {"tiny@llm": True})
            fake.delays["/api/controller/heartbeat"] = 0.5  # the next heartbeat is slow
            await eventually(lambda: fake.in_flight > 0, what="a heartbeat in flight")
            await runtime.begin_shutdown()
            [delete] = controller_calls(fake, DELETE)
            slow = controller_calls(fake, HEARTBEAT)[-1]
            assert slow.done <= delete.at  # applied first, so the delete wins
            assert await asyncio.to_thread(fake.listing) == []


async def test_shutdown_is_bounded_when_a_controller_hangs(tiny: FakeWorker) -> None:
    with FakeController() as stuck, FakeController() as fine:
        config = settings_for(
            brisk=True, worker_address=[tiny.url], controller_address=[stuck.url, fine.url]
        )
        async with running(config) as runtime:
            for fake in (stuck, fine):
                await until_listed(fake, {"tiny@llm": True})
            stuck.delays["/api/controller/models"] = 30
            await within(
                10 * SHUTDOWN_CALL_TIMEOUT,
                runtime.begin_shutdown(),
                "shutdown with a hanging controller",
            )
            # One short timeout: it gave up on the hanging call rather than wait for it.
            assert stuck.in_flight == 1
            assert await asyncio.to_thread(fine.listing) == []
        stuck.delays.clear()
    # The calls ran concurrently: the other controller's delete did not wait for the hanging
    # one to time out (both arrival times as the controllers recorded them).
    [hung] = controller_calls(stuck, DELETE)
    [deleted] = controller_calls(fine, DELETE)
    assert deleted.status == 200 and hung.status != 200
    assert deleted.at < hung.at + SHUTDOWN_CALL_TIMEOUT, (hung, deleted)


async def test_lifespan_end_without_a_signal_still_deregisters(tiny: FakeWorker) -> None:
    with FakeController() as fake:
        config = settings_for(brisk=True, worker_address=[tiny.url], controller_address=[fake.url])
        async with running(config):  # leaving calls Runtime.stop() only
            await until_listed(fake, {"tiny@llm": True})
        assert fake.listing() == []
        [delete] = controller_calls(fake, DELETE)
        assert delete.query["remove_from_registry"] == "true"


# --- a controller that fails: the cause in every warning, and what the address really is -----


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "fastchat_adapter.registration" and r.levelno == logging.WARNING
    ]


async def test_a_failing_controller_is_warned_about_with_its_cause_throttled(
    tiny: FakeWorker, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="fastchat_adapter.registration")
    dead = LoopbackServer(FastAPI())
    dead.start()
    dead.stop()  # refuses connections
    config = settings_for(tiny.url, brisk=True, controller_address=[dead.url])
    async with running(config) as runtime:
        failures = {"controller": dead.url, "operation": "register", "reason": "unreachable"}

        def failed() -> float:
            return sample(runtime, "fastchat_adapter_registration_failures_total", **failures)

        await eventually(lambda: failed() >= 3, what="three failed attempts")
        [warning] = warnings_of(caplog)  # retried every few tenths of a second: said once
        assert warning.startswith(f"DB-GPT controller {dead.url}: POST /api/controller/models")
        assert "unreachable" in warning and "retrying with backoff" in warning
        monkeypatch.setattr(registration, "WARN_EVERY", 0.0)  # every retry warns now
        await eventually(lambda: len(warnings_of(caplog)) >= 3, what="repeated warnings")
    assert all("unreachable" in w for w in warnings_of(caplog))


@pytest.mark.parametrize("kind", ["FastChat worker", "FastChat controller"])
async def test_a_fastchat_address_given_as_controller_gets_a_hint(
    tiny: FakeWorker, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """FastChat's own --controller-address means a FastChat controller: given here, the address
    answers 404 to DB-GPT's registry calls, and the warning says what it answers like."""
    caplog.set_level(logging.INFO, logger="fastchat_adapter.registration")
    # StatusWorker answers /list_models and /worker_get_status, as a FastChat controller (§2).
    wrong = worker("other") if kind == "FastChat worker" else StatusWorker("other")
    with wrong.server as server:
        config = settings_for(tiny.url, brisk=True, controller_address=[server.url])
        async with running(config):
            await eventually(lambda: bool(warnings_of(caplog)), what="a warning")
            [warning] = warnings_of(caplog)  # before the deregistration at shutdown
    assert "HTTP 404" in warning, warning
    assert f"it answers like a {kind}" in warning, warning
    flag = "--worker-address" if kind == "FastChat worker" else "--fastchat-controller-address"
    assert flag in warning, warning
