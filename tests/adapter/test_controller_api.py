"""The standalone controller API over a real socket, against DB-GPT 0.8.2's measured shapes
(docs/protocol.md §5.2, §5.5)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from protocol.dbgpt import ModelInstance
from tests.adapter.helpers import instance_body, serving, settings_for
from tests.support.fake_controller import FakeController
from tests.support.fake_worker import FakeWorker

CAP_BODY = instance_body("cap@llm", 25033)
# What DB-GPT's own ModelRegistryClient sends to deregister (§5.5): every field, no body.
CLIENT_DELETE_QUERY = (
    "model_name=cap%40llm&host=127.0.0.1&port=25033&weight=1.0&check_healthy=true&healthy=false"
    "&enabled=true&prompt_template=&last_heartbeat=&remove_from_registry=true"
)
KEYS = list(CAP_BODY)


@pytest.fixture
def http(controller: FakeController) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=controller.url, trust_env=False, timeout=5) as client:
        yield client


def detail(reply: httpx.Response) -> list[dict[str, Any]]:
    assert reply.status_code == 422, reply.text
    body = reply.json()
    assert list(body) == ["detail"]
    for error in body["detail"]:
        assert {"type", "loc", "msg", "input"} <= set(error)
    errors: list[dict[str, Any]] = body["detail"]
    return errors


def test_health(http: httpx.Client) -> None:
    reply = http.get("/api/health")
    assert (reply.status_code, reply.json()) == (200, {"status": "ok"})


def test_register_answers_bare_true_and_lists_exactly_dbgpt_keys(http: httpx.Client) -> None:
    reply = http.post("/api/controller/models", json=CAP_BODY)
    assert (reply.status_code, reply.content) == (200, b"true")
    [listed] = http.get("/api/controller/models").json()
    assert list(listed) == KEYS
    assert listed | {"last_heartbeat": None} == CAP_BODY | {"healthy": True}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}", listed["last_heartbeat"])


def test_unknown_fields_are_dropped_and_a_numeric_string_port_coerced(http: httpx.Client) -> None:
    body = CAP_BODY | {"port": "25033", "queue_length": 3, "speed": 2.5, "foo": "bar"}
    assert http.post("/api/controller/heartbeat", json=body).json() is True
    [listed] = http.get("/api/controller/models", params={"model_name": "cap@llm"}).json()
    assert list(listed) == KEYS and listed["port"] == 25033


def test_heartbeat_of_an_unknown_instance_registers_it(http: httpx.Client) -> None:
    assert http.post("/api/controller/heartbeat", json=CAP_BODY).json() is True
    [listed] = http.get("/api/controller/models", params={"healthy_only": "true"}).json()
    assert listed["model_name"] == "cap@llm"


def test_soft_then_hard_delete_through_query_parameters(http: httpx.Client) -> None:
    http.post("/api/controller/models", json=CAP_BODY)
    soft = http.delete("/api/controller/models?model_name=cap%40llm&host=127.0.0.1&port=25033")
    assert soft.content == b"true"
    [listed] = http.get("/api/controller/models").json()
    assert listed["healthy"] is False
    for flag in ("true", "1"):
        assert http.get("/api/controller/models", params={"healthy_only": flag}).json() == []
    assert len(http.get("/api/controller/models", params={"healthy_only": "false"}).json()) == 1
    hard = http.delete("/api/controller/models?" + CLIENT_DELETE_QUERY)
    assert (hard.status_code, hard.content) == (200, b"true")
    assert http.get("/api/controller/models").json() == []


def test_delete_of_an_unknown_instance_is_true(http: httpx.Client) -> None:
    reply = http.delete("/api/controller/models?model_name=x%40llm&host=h&port=1")
    assert (reply.status_code, reply.content) == (200, b"true")


def test_listing_filters_by_worker_key_and_an_unknown_key_inserts_nothing(
    http: httpx.Client, controller: FakeController
) -> None:
    http.post("/api/controller/models", json=CAP_BODY)
    http.post("/api/controller/models", json=CAP_BODY | {"model_name": "emb@text2vec"})
    only = http.get("/api/controller/models", params={"model_name": "emb@text2vec"}).json()
    assert [i["model_name"] for i in only] == ["emb@text2vec"]
    assert http.get("/api/controller/models", params={"model_name": "ghost@llm"}).json() == []
    every = http.get("/api/controller/models", params={"model_name": ""}).json()
    assert [i["model_name"] for i in every] == ["cap@llm", "emb@text2vec"]
    assert "ghost@llm" not in controller.registry._by_name


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("content", "headers", "loc"),
    [
        ('{"model_name":"m@llm","port":1}', JSON, ["body", "host"]),
        ('{"model_name":"m@llm","host":"h"}', JSON, ["body", "port"]),
        ('{"model_name":"m@llm","host":"h","port":"x"}', JSON, ["body", "port"]),
        ('{"model_name":', JSON, ["body", 14]),  # invalid JSON: the offset of the error
        ("", JSON, ["body"]),
        ("[1, 2]", JSON, ["body"]),
        ('{"model_name":"m@llm","host":"h","port":1}', {"content-type": "text/plain"}, ["body"]),
    ],
)
@pytest.mark.parametrize("path", ["/api/controller/models", "/api/controller/heartbeat"])
def test_bad_bodies_get_fastapis_422(
    http: httpx.Client, path: str, content: str, headers: dict[str, str], loc: list[Any]
) -> None:
    errors = detail(http.post(path, content=content, headers=headers))
    assert errors[0]["loc"] == loc
    assert http.get("/api/controller/models").json() == []


def test_delete_needs_its_query_parameters_and_ignores_a_body(http: httpx.Client) -> None:
    reply = http.request("DELETE", "/api/controller/models", json=CAP_BODY)
    missing = {tuple(e["loc"]) for e in detail(reply)}
    assert missing == {("query", "model_name"), ("query", "host"), ("query", "port")}
    bad_port = http.delete("/api/controller/models?model_name=m%40llm&host=h&port=x")
    assert detail(bad_port)[0]["loc"] == ["query", "port"]


def test_bogus_healthy_only_is_422(http: httpx.Client) -> None:
    errors = detail(http.get("/api/controller/models", params={"healthy_only": "bogus"}))
    assert errors[0]["loc"] == ["query", "healthy_only"]


def test_unknown_paths_are_404_and_there_are_no_fastchat_routes(http: httpx.Client) -> None:
    assert http.post("/list_models").status_code == 404
    assert http.get("/api/controller/nothing").status_code == 404


def test_the_recorder_sees_method_path_query_and_body(
    http: httpx.Client, controller: FakeController
) -> None:
    http.post("/api/controller/models", json=CAP_BODY)
    http.delete("/api/controller/models?" + CLIENT_DELETE_QUERY)
    post, delete = controller.calls
    assert (post.method, post.path, post.body, post.status) == (
        "POST",
        "/api/controller/models",
        CAP_BODY,
        200,
    )
    assert delete.raw_query == CLIENT_DELETE_QUERY and delete.body is None
    assert delete.query["remove_from_registry"] == "true" and delete.at >= post.at


def test_injected_failures_and_restart_forget_state(
    http: httpx.Client, controller: FakeController
) -> None:
    http.post("/api/controller/models", json=CAP_BODY)
    controller.fail_status = 500
    assert http.post("/api/controller/heartbeat", json=CAP_BODY).status_code == 500
    assert controller.calls[-1].status == 500
    controller.fail_status = None
    controller.restart()
    with httpx.Client(base_url=controller.url, trust_env=False, timeout=5) as fresh:
        assert fresh.get("/api/controller/models").json() == []


# --- issue 12, item 1: one POST must not break the listing --------------------------------


@pytest.mark.parametrize(
    ("content", "what"),
    [
        ('{"model_name":"evil\\ud800@llm","host":"h","port":1}', "surrogate"),
        ('{"model_name":"m@llm","host":"h\\udfff","port":1}', "surrogate"),
        ('{"model_name":"m@llm","host":"h","port":1,"weight":NaN}', "NaN"),
        ('{"model_name":"m@llm","host":"h","port":1,"weight":1e999}', "float"),
        ('{"model_name":"m@llm","host":"h","port":1,"x":' + "[" * 20_000 + "}", "nests"),
    ],
    ids=["surrogate-name", "surrogate-host", "nan", "1e999", "deep"],
)
@pytest.mark.parametrize("path", ["/api/controller/models", "/api/controller/heartbeat"])
def test_bodies_no_listing_could_write_back_are_422_and_the_listing_stays_200(
    http: httpx.Client, path: str, content: str, what: str
) -> None:
    http.post("/api/controller/models", json=CAP_BODY)
    [error] = detail(http.post(path, content=content, headers=JSON))
    assert error["type"] == "json_invalid" and what in error["ctx"]["error"]
    for params in ({}, {"healthy_only": "true"}):
        listed = http.get("/api/controller/models", params=params)
        assert listed.status_code == 200
        assert [i["model_name"] for i in listed.json()] == ["cap@llm"]


def test_a_stored_value_that_cannot_be_written_does_not_break_the_listing(
    http: httpx.Client, controller: FakeController
) -> None:
    # Not through HTTP any more: as if a FastChat worker reported such a model name.
    http.post("/api/controller/models", json=CAP_BODY)
    controller.registry.register(ModelInstance(model_name="odd\ud800@llm", host="h", port=1))
    controller.registry.register(
        ModelInstance(model_name="nan@llm", host="h", port=1, weight=float("nan"))
    )
    for params in ({}, {"healthy_only": "true"}):
        listed = http.get("/api/controller/models", params=params)
        assert listed.status_code == 200
        names = [i["model_name"] for i in listed.json()]
        assert names == ["cap@llm", "odd\ud800@llm"]  # an ASCII escape; the NaN entry left out


# --- issue 12, item 2: who may write the adapter's own standalone registry ----------------

OWN = "reference-model@llm"
REFUSED = "fastchat_adapter_controller_writes_refused_total"


def _own_delete(port: int) -> str:
    return f"/api/controller/models?model_name={OWN}&host=127.0.0.1&port={port}"


async def test_strangers_cannot_delete_or_shadow_the_adapters_own_entries(
    fake_worker: Callable[..., FakeWorker],
) -> None:
    config = settings_for(fake_worker().url)  # standalone, defaults: only our own models
    async with serving(config) as adapter:
        client = adapter.client
        shadow = {"model_name": OWN, "host": "10.9.9.9", "port": 80}
        other = {"model_name": "other@llm", "host": "10.9.9.9", "port": 80}
        answers = [
            await client.post("/api/controller/models", json=shadow),
            await client.post("/api/controller/heartbeat", json=shadow),
            await client.delete(_own_delete(config.port) + "&remove_from_registry=true"),
            await client.post("/api/controller/models", json=other),
        ]
        assert [a.status_code for a in answers] == [403] * 4
        assert "registered by this adapter itself" in answers[0].json()["detail"]
        assert "--controller-accept-workers" in answers[3].json()["detail"]
        listed = (await client.get("/api/controller/models")).json()
        assert [(i["model_name"], i["host"], i["healthy"]) for i in listed] == [
            (OWN, "127.0.0.1", True)
        ]
        assert adapter.sample(REFUSED, reason="own_entry") == 3
        assert adapter.sample(REFUSED, reason="disabled") == 1


async def test_other_workers_write_only_when_enabled_with_the_key_from_allowed_hosts(
    fake_worker: Callable[..., FakeWorker],
) -> None:
    fake = fake_worker()
    other = {"model_name": "other@llm", "host": "10.9.9.9", "port": 80}
    keyed = settings_for(fake.url, controller_accept_workers=True, api_key="s3cret")
    async with serving(keyed) as adapter:
        client, key = adapter.client, {"authorization": "Bearer s3cret"}
        assert (await client.post("/api/controller/models", json=other)).status_code == 403
        assert (await client.get("/api/controller/models")).status_code == 200  # reads: open
        reply = await client.post("/api/controller/models", json=other, headers=key)
        assert (reply.status_code, reply.json()) == (200, True)
        shadow = other | {"model_name": OWN}
        assert (
            await client.post("/api/controller/models", json=shadow, headers=key)
        ).status_code == 403
        assert adapter.sample(REFUSED, reason="api_key") == 1
    elsewhere = settings_for(
        fake.url, controller_accept_workers=True, controller_allow_hosts="10.1.1.1"
    )
    async with serving(elsewhere) as adapter:
        reply = await adapter.client.post("/api/controller/heartbeat", json=other)
        assert reply.status_code == 403 and "127.0.0.1" in reply.json()["detail"]
        assert adapter.sample(REFUSED, reason="host") == 1
    here = settings_for(
        fake.url, controller_accept_workers=True, controller_allow_hosts="127.0.0.1"
    )
    async with serving(here) as adapter:
        assert (await adapter.client.post("/api/controller/heartbeat", json=other)).json() is True
