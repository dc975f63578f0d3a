"""The standalone registry against DB-GPT's measured registry semantics (docs/protocol.md §5.3)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from adapter.registry import ModelRegistry
from protocol.dbgpt import ModelInstance

NAIVE_ISO_MICROS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")


class Clock:
    """Both clocks the registry reads, moved by hand."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.start = datetime(2026, 11, 21, 22, 15, 59)  # microsecond 0 on purpose

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> datetime:
        return self.start + timedelta(seconds=self.mono - 1000.0)


def make() -> tuple[ModelRegistry, Clock]:
    clock = Clock()
    return ModelRegistry(monotonic=clock.monotonic, wall=clock.wall), clock


def inst(
    name: str = "m@llm", host: str = "10.0.0.1", port: int = 8100, **kw: object
) -> ModelInstance:
    return ModelInstance.model_validate({"model_name": name, "host": host, "port": port, **kw})


def only(registry: ModelRegistry) -> dict[str, object]:
    [entry] = registry.instances()
    return entry.to_wire()


def test_new_instance_is_forced_healthy_and_stamped() -> None:
    registry, _ = make()
    registry.register(inst(healthy=False, weight=3.0, enabled=False))
    entry = only(registry)
    assert entry == {
        "model_name": "m@llm",
        "host": "10.0.0.1",
        "port": 8100,
        "weight": 3.0,
        "check_healthy": True,
        "healthy": True,
        "enabled": False,
        "prompt_template": None,
        "last_heartbeat": "2026-11-21T22:15:59.000000",
        "remove_from_registry": False,
    }
    assert NAIVE_ISO_MICROS.match(str(entry["last_heartbeat"]))


def test_identity_strips_name_and_host_whitespace() -> None:
    registry, _ = make()
    registry.register(inst(" m@llm ", " 10.0.0.1\t"))
    registry.register(inst("m@llm", "10.0.0.1", weight=2.0))
    entry = only(registry)
    assert (entry["model_name"], entry["host"], entry["weight"]) == ("m@llm", "10.0.0.1", 2.0)
    registry.deregister(" m@llm", "10.0.0.1 ", 8100)
    assert only(registry)["healthy"] is False


def test_port_is_part_of_the_identity() -> None:
    registry, _ = make()
    registry.register(inst(port=1))
    registry.register(inst(port=2))
    assert [i.port for i in registry.instances("m@llm")] == [1, 2]


def test_re_register_updates_only_weight_template_health_and_time() -> None:
    registry, clock = make()
    registry.register(inst(check_healthy=True, enabled=True))
    registry.deregister("m@llm", "10.0.0.1", 8100)
    clock.mono += 5
    registry.register(
        inst(weight=0.5, prompt_template="vicuna", check_healthy=False, enabled=False)
    )
    entry = only(registry)
    assert entry["weight"] == 0.5 and entry["prompt_template"] == "vicuna"
    assert entry["healthy"] is True and entry["last_heartbeat"] == "2026-11-21T22:16:04.000000"
    assert entry["check_healthy"] is True and entry["enabled"] is True  # first values kept


def test_heartbeat_of_unknown_instance_registers_it_from_the_body() -> None:
    registry, _ = make()
    registry.heartbeat(inst(enabled=False, weight=2.0))
    entry = only(registry)
    assert (entry["healthy"], entry["enabled"], entry["weight"]) == (True, False, 2.0)


def test_heartbeat_of_known_instance_touches_only_health_and_time() -> None:
    registry, clock = make()
    registry.register(inst(weight=1.0))
    registry.deregister("m@llm", "10.0.0.1", 8100)
    clock.mono += 1.5
    registry.heartbeat(inst(weight=9.0, prompt_template="x"))
    entry = only(registry)
    assert (entry["healthy"], entry["weight"], entry["prompt_template"]) == (True, 1.0, None)
    assert entry["last_heartbeat"] == "2026-11-21T22:16:00.500000"


def test_soft_delete_keeps_the_instance_listed_unhealthy() -> None:
    registry, _ = make()
    registry.register(inst())
    registry.deregister("m@llm", "10.0.0.1", 8100)
    assert only(registry)["healthy"] is False
    assert registry.instances("m@llm", healthy_only=True) == []
    registry.register(inst())  # a later register revives it, as does a heartbeat
    assert only(registry)["healthy"] is True


def test_hard_delete_removes_and_unknown_delete_is_fine() -> None:
    registry, _ = make()
    registry.register(inst(port=1))
    registry.register(inst(port=2))
    registry.deregister("m@llm", "10.0.0.1", 1, remove_from_registry=True)
    assert [i.port for i in registry.instances()] == [2]
    registry.deregister("m@llm", "10.0.0.1", 2, remove_from_registry=True)
    registry.deregister("nobody@llm", "h", 1, remove_from_registry=True)
    registry.deregister("nobody@llm", "h", 1)
    assert registry.instances() == []


def test_expiry_marks_unhealthy_after_the_timeout_only_when_checked() -> None:
    registry, clock = make()
    registry.register(inst("a@llm"))
    registry.register(inst("b@llm", check_healthy=False))
    clock.mono += 60
    assert registry.expire(60) == []  # strictly more than the timeout
    clock.mono += 0.001
    assert registry.expire(60) == ["a@llm 10.0.0.1:8100"]
    assert registry.expire(60) == []  # reported once
    healthy = {i.model_name: i.healthy for i in registry.instances()}
    assert healthy == {"a@llm": False, "b@llm": True}  # never deleted; check_healthy honoured
    registry.heartbeat(inst("a@llm"))
    assert all(i.healthy for i in registry.instances())


def test_listing_filters_by_key_and_health_grouped_in_first_registration_order() -> None:
    registry, _ = make()
    registry.register(inst("a@llm", port=1))
    registry.register(inst("b@text2vec", port=1))
    registry.register(inst("a@llm", port=2))
    registry.deregister("a@llm", "10.0.0.1", 2)
    assert [(i.model_name, i.port) for i in registry.instances()] == [
        ("a@llm", 1),
        ("a@llm", 2),
        ("b@text2vec", 1),
    ]
    assert [i.port for i in registry.instances("a@llm", healthy_only=True)] == [1]
    assert len(registry.instances("", healthy_only=False)) == 3  # empty name: everything


def test_listing_an_unknown_name_inserts_nothing() -> None:
    registry, _ = make()
    assert registry.instances("ghost@llm") == []
    assert registry._by_name == {}  # DB-GPT inserts an empty key here; we do not


def test_clear_forgets_everything_like_a_restart() -> None:
    registry, _ = make()
    registry.register(inst())
    registry.clear()
    assert registry.instances() == []


OPS = st.lists(
    st.tuples(
        st.sampled_from(["register", "heartbeat", "soft", "hard", "expire"]),
        st.sampled_from(["a@llm", " a@llm", "b@text2vec"]),
        st.sampled_from(["h", "h ", "g"]),
        st.sampled_from([1, 2]),
    ),
    max_size=40,
)


@given(OPS)
def test_matches_a_plain_model_of_the_rules(ops: list[tuple[str, str, str, int]]) -> None:
    """Any sequence of calls: one entry per stripped identity, health as the rules say."""
    registry, clock = make()
    healthy: dict[tuple[str, str, int], bool] = {}  # the model: identity -> healthy
    refreshed: dict[tuple[str, str, int], float] = {}
    for op, name, host, port in ops:
        clock.mono += 10
        key = (name.strip(), host.strip(), port)
        if op in ("register", "heartbeat"):
            getattr(registry, op)(inst(name, host, port))
            healthy[key], refreshed[key] = True, clock.mono
        elif op == "expire":
            registry.expire(15)
            for k, at in refreshed.items():
                if k in healthy and clock.mono - at > 15:
                    healthy[k] = False
        elif op == "soft":
            registry.deregister(name, host, port)
            if key in healthy:
                healthy[key] = False
        else:
            registry.deregister(name, host, port, remove_from_registry=True)
            healthy.pop(key, None)
    listed = {(i.model_name, i.host, i.port): i.healthy for i in registry.instances()}
    assert len(listed) == len(registry.instances())
    assert listed == healthy
