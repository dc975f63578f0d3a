"""Issue 10 part 3: the real `dbgpt model` CLI (DB-GPT 0.8.2) on models the adapter serves,
with `--register-service` (the WorkerManager@service entry the CLI asks for its models):
`start --help` lists a truthful parameter, `stop` / `start` change the registration through
models/shutdown|startup, `restart` goes through /api/worker/apply (docs/protocol.md §8.8)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from tests.interop.calls import instances_at, wait_for
from tests.interop.stacks import (
    ADAPTER_HEARTBEAT_INTERVAL_S,
    AdapterProc,
    DbgptCluster,
    ReferenceWorkerProc,
)

MODEL = "cli-model"
KEY = f"{MODEL}@llm"
UNTOUCHED = "the FastChat worker itself is untouched"


@pytest.mark.deadline(240)
def test_dbgpt_model_commands(
    dbgpt_cluster_factory: Callable[..., DbgptCluster],
    reference_worker_factory: Callable[..., ReferenceWorkerProc],
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
) -> None:
    cluster = dbgpt_cluster_factory()  # a registry where only the adapter's models are
    worker = reference_worker_factory(MODEL)
    adapter = adapter_factory(
        workers=[worker.url],
        controllers=[cluster.controller_url],
        extra_args=["--register-service"],
    )
    host, port = adapter.host_port
    address = ["model", "--address", cluster.controller_url]
    target = ["--model_name", MODEL, "--host", host, "--port", str(port)]

    def healthy() -> bool | None:
        listed = instances_at(http, cluster.controller_url, host, port).get(KEY)
        return None if listed is None else bool(listed["healthy"])

    helped = cluster.dbgpt(*address, "start", "--help")
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "--fastchat_worker_address" in helped.stdout
    assert worker.url in helped.stdout  # its default: the worker serving the model

    stopped = cluster.dbgpt(*address, "stop", *target)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert stopped.stdout.strip().splitlines()[-1] == "None"  # the CLI prints no reply body
    wait_for(lambda: healthy() is False, timeout=10, what="stopped model marked unhealthy")
    # Several adapter heartbeats later it is still unhealthy: nothing re-registers it.
    time.sleep(3 * ADAPTER_HEARTBEAT_INTERVAL_S)
    assert healthy() is False

    started = cluster.dbgpt(*address, "start", *target)
    assert started.returncode == 0, started.stderr[-3000:]
    wait_for(lambda: healthy() is True, timeout=10, what="started model healthy")

    restarted = cluster.dbgpt(*address, "restart", "--model_name", MODEL)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "success=True" in restarted.stdout and UNTOUCHED in restarted.stdout
    assert f"restarted {KEY}" in restarted.stdout
    assert healthy() is True
    assert worker.alive  # the worker process was never touched
