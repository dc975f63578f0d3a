"""The harness itself: the real peers start, answer, stop and restart as docs/peers.md says."""

from __future__ import annotations

import math
from collections.abc import Callable

import httpx

from tests.interop.peers import DRIVERS, Peers
from tests.interop.procs import run_json
from tests.interop.stacks import DbgptCluster, FastChatStack, FastChatWorker


def test_fastchat_worker_status(fastchat_stack: FastChatStack, http: httpx.Client) -> None:
    body = {"model": fastchat_stack.model}
    status = http.post(fastchat_stack.worker_url + "/worker_get_status", json=body).json()
    assert status["model_names"] == ["tiny-vicuna"]
    details = http.post(fastchat_stack.worker_url + "/model_details", json=body).json()
    assert details == {"context_length": 2048}


def test_fastchat_controller_lists_both_models(
    fastchat_stack: FastChatStack, http: httpx.Client
) -> None:
    models = http.post(fastchat_stack.controller_url + "/list_models").json()["models"]
    assert {"all-MiniLM-L6-v2", "tiny-vicuna"} <= set(models)


def test_worker_template_is_the_registry_template(
    fastchat_stack: FastChatStack, peers: Peers, http: httpx.Client
) -> None:
    served = http.post(
        fastchat_stack.worker_url + "/worker_get_conv_template",
        json={"model": fastchat_stack.model},
    ).json()["conv"]
    dumped = run_json([peers.fastchat.python, DRIVERS / "fschat_render.py", "templates"])
    by_name = {t["name"]: t["conv"] for t in dumped["templates"]}
    assert served["name"] == "vicuna_v1.1"
    assert served == by_name["vicuna_v1.1"]


def test_openai_chat_is_deterministic_at_temperature_0(
    fastchat_stack: FastChatStack, http: httpx.Client
) -> None:
    request = {
        "model": fastchat_stack.model,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello there"},
        ],
        "temperature": 0,
        "max_tokens": 16,
    }
    url = fastchat_stack.openai_url + "/v1/chat/completions"
    first = http.post(url, json=request)
    assert first.status_code == 200, first.text
    choice = first.json()["choices"][0]
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    second = http.post(url, json=request).json()["choices"][0]
    assert second["message"]["content"] == choice["message"]["content"]


def test_embedding_worker_returns_384_d_unit_vectors(
    fastchat_stack: FastChatStack, http: httpx.Client
) -> None:
    reply = http.post(
        fastchat_stack.embed_worker_url + "/worker_get_embeddings",
        json={"model": fastchat_stack.embed_model, "input": ["hello world"]},
    )
    assert reply.status_code == 200, reply.text
    (vector,) = reply.json()["embedding"]
    assert len(vector) == 384
    assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-5)


def test_dbgpt_controller_and_apiserver_answer(
    dbgpt_cluster: DbgptCluster, http: httpx.Client
) -> None:
    assert http.get(dbgpt_cluster.controller_url + "/api/health").json() == {"status": "ok"}
    models = http.get(dbgpt_cluster.api_url + "/api/v1/models")
    assert models.status_code == 200, models.text
    assert models.json()["object"] == "list"


def test_dbgpt_model_list_cli(dbgpt_cluster: DbgptCluster) -> None:
    result = dbgpt_cluster.model_list()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Model Name" in result.stdout


def test_dbgpt_controller_restart(dbgpt_cluster: DbgptCluster, http: httpx.Client) -> None:
    port, pid = dbgpt_cluster.controller_url, dbgpt_cluster.pids
    dbgpt_cluster.restart_controller()
    assert dbgpt_cluster.controller_url == port
    assert dbgpt_cluster.pids != pid
    assert http.get(dbgpt_cluster.controller_url + "/api/health").json() == {"status": "ok"}
    assert http.get(dbgpt_cluster.api_url + "/api/v1/models").status_code == 200


def test_dbgpt_client_driver_on_a_fresh_cluster(
    dbgpt_cluster_factory: Callable[..., DbgptCluster], peers: Peers
) -> None:
    cluster = dbgpt_cluster_factory()
    spec = {"controller": cluster.controller_url, "ops": [{"op": "models"}]}
    out = run_json([peers.dbgpt.python, DRIVERS / "dbgpt_client.py"], spec, timeout=60)
    assert out["results"] == [{"op": "models", "ok": True, "value": []}]


def test_registered_worker_is_served_by_openai_api_server(
    fastchat_stack: FastChatStack,
    fastchat_worker_factory: Callable[..., FastChatWorker],
    http: httpx.Client,
) -> None:
    worker = fastchat_worker_factory("smoke-registered", conv_template="llama-2", seed=1)
    assert worker.registered
    models = http.post(fastchat_stack.controller_url + "/list_models").json()["models"]
    assert "smoke-registered" in models
    template = http.post(worker.url + "/worker_get_conv_template", json={}).json()["conv"]
    assert template["name"] == "llama-2"
    reply = http.post(
        fastchat_stack.openai_url + "/v1/chat/completions",
        json={
            "model": "smoke-registered",
            "messages": [{"role": "user", "content": "Hi"}],
            "temperature": 0.7,
            "max_tokens": 4,
        },
    )
    assert reply.status_code == 200, reply.text


def test_revive_restarts_killed_shared_processes(
    fastchat_stack: FastChatStack, dbgpt_cluster: DbgptCluster, http: httpx.Client
) -> None:
    """What the autouse fixture does before every test, after a fault test left things dead."""
    ports = [p.port for p in fastchat_stack.procs + dbgpt_cluster.procs]
    fastchat_stack.worker.kill()
    dbgpt_cluster.stop_controller()
    fastchat_stack.revive()
    dbgpt_cluster.revive()
    assert [p.port for p in fastchat_stack.procs + dbgpt_cluster.procs] == ports
    assert all(p.alive for p in fastchat_stack.procs + dbgpt_cluster.procs)
    status = http.post(fastchat_stack.worker_url + "/worker_get_status", json={}).json()
    assert status["model_names"] == ["tiny-vicuna"]
    models = http.post(fastchat_stack.controller_url + "/list_models").json()["models"]
    assert "tiny-vicuna" in models
    assert http.get(dbgpt_cluster.controller_url + "/api/health").json() == {"status": "ok"}


def test_fastchat_controller_restart_reregisters_workers(
    fastchat_stack: FastChatStack, http: httpx.Client
) -> None:
    fastchat_stack.restart_controller()
    models = http.post(fastchat_stack.controller_url + "/list_models").json()["models"]
    assert {"all-MiniLM-L6-v2", "tiny-vicuna"} <= set(models)


def test_dedicated_worker_kill_and_restart_on_same_port(
    fastchat_worker_factory: Callable[..., FastChatWorker], http: httpx.Client
) -> None:
    worker = fastchat_worker_factory("smoke-llm", register=False, limit_worker_concurrency=2)
    port, pid = worker.port, worker.pid
    status = http.post(worker.url + "/worker_get_status", json={"model": "smoke-llm"}).json()
    assert status["model_names"] == ["smoke-llm"]
    assert worker.kill() == -9
    assert not worker.alive
    worker.start(same_port=True)
    assert (worker.port, worker.alive) == (port, True)
    assert worker.pid != pid
    reply = http.post(
        worker.url + "/worker_generate",
        json={"model": "smoke-llm", "prompt": "Hi", "temperature": 0, "max_new_tokens": 4},
    ).json()
    assert reply["error_code"] == 0
