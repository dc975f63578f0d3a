"""Issue 10 part 2: two real DB-GPT 0.8.2 controllers sharing one registry database (DB-GPT's
HA deployment), (a) one SQLite file and (b) a real MariaDB server, with the adapter in
`--controller-mode failover`: one row per model instance after start, heartbeats, restarts;
one controller stopped -> the apiserver through the other still answers, no duplicate row;
SIGTERM removes the rows. Failover time and rows per instance (fan-out vs failover) are
recorded as timings."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.interop.calls import chat_body, metric_values, post_openai, wait_for
from tests.interop.mariadb import MariaDb, ensure_mariadb, sqlite_registry
from tests.interop.peers import DRIVERS, Peers
from tests.interop.procs import RunDir, run_json
from tests.interop.stacks import AdapterProc, DbgptCluster, ReferenceWorkerProc

MODEL = "ha-model"
KEY = f"{MODEL}@llm"
FAILOVERS = "fastchat_adapter_controller_failovers_total"


@pytest.fixture(scope="module")
def mariadb(interop_run: RunDir) -> Iterator[MariaDb]:
    found = ensure_mariadb()
    if isinstance(found, str):
        if os.environ.get("CI") == "true":
            pytest.fail(found)
        pytest.skip(found)
    server, install_db = found
    db = MariaDb(interop_run, "mariadb", server=server, install_db=install_db)
    db.initialise()
    db.start()
    yield db
    db.stop()


class Registry:
    """The shared registry database, read with DB-GPT's own table definition."""

    def __init__(self, peers: Peers, url: str) -> None:
        self.peers, self.url = peers, url

    def _call(self, op: str) -> Any:
        driver = DRIVERS / "dbgpt_registry.py"
        return run_json([self.peers.dbgpt.python, driver], {"url": self.url, "op": op})

    def create(self) -> None:
        self._call("create")

    def clear(self) -> None:
        self._call("clear")

    def rows(self, adapter: AdapterProc) -> list[dict[str, Any]]:
        host, port = adapter.host_port
        return [
            r
            for r in self._call("rows")["rows"]
            if r["model_name"] == KEY and r["host"] == host and r["port"] == port
        ]


def _failovers(adapter: AdapterProc) -> float:
    return sum(value for _, value in metric_values(adapter.metrics_text(), FAILOVERS))


def _scenario(
    registry: Registry,
    database: dict[str, object],
    leg: str,
    dbgpt_cluster_factory: Callable[..., DbgptCluster],
    reference_worker_factory: Callable[..., ReferenceWorkerProc],
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
    timing: Callable[..., None],
) -> None:
    registry.create()
    registry.clear()
    first = dbgpt_cluster_factory(registry=database)
    second = dbgpt_cluster_factory(registry=database)
    worker = reference_worker_factory(MODEL)
    controllers = [first.controller_url, second.controller_url]

    # Before: fan-out to both controllers of one database (rows per instance, not asserted:
    # the race makes it vary).
    fanout = adapter_factory(workers=[worker.url], controllers=controllers)
    time.sleep(3 * fanout.heartbeat_interval)
    timing(f"{leg}: rows per instance, fan-out", len(registry.rows(fanout)), "rows")
    fanout.stop()
    registry.clear()

    def start_adapter() -> AdapterProc:
        return adapter_factory(
            workers=[worker.url],
            controllers=controllers,
            extra_args=["--controller-mode", "failover"],
        )

    adapter = start_adapter()
    rows = wait_for(lambda: registry.rows(adapter), timeout=10, what="registered")[0]
    assert [r["healthy"] for r in rows] == [True]
    # Heartbeats: the one row's last_heartbeat moves on, and it stays one row.
    wait_for(
        lambda: (
            (now := registry.rows(adapter)) and now[0]["last_heartbeat"] > rows[0]["last_heartbeat"]
        ),
        timeout=10,
        what="a newer heartbeat",
    )
    timing(f"{leg}: rows per instance, failover", len(registry.rows(adapter)), "rows")
    assert len(registry.rows(adapter)) == 1

    # An adapter restart: SIGTERM removes the row, the new process registers exactly one.
    adapter.stop()
    assert registry.rows(adapter) == []
    adapter = start_adapter()
    wait_for(lambda: registry.rows(adapter), timeout=10, what="registered again")

    # Stop the active controller (the first, for a fresh adapter): calls move to the other,
    # whose apiserver answers from the same row.
    before = _failovers(adapter)
    first.stop_controller()
    _, failover_s = wait_for(
        lambda: _failovers(adapter) > before, timeout=10, what="failover", interval=0.02
    )
    timing(f"{leg}: controller stopped -> calls on the other", failover_s)
    answer = post_openai(
        http,
        second.api_url + "/api/v1/chat/completions",
        chat_body(MODEL, "Hello", 4, stream=True),
    )
    assert answer.status == 200 and not answer.errors and answer.text, answer.events
    time.sleep(2 * adapter.heartbeat_interval)
    assert [r["healthy"] for r in registry.rows(adapter)] == [True]

    # Controller restarts: the stopped one comes back (calls stay where they are), then the
    # active one restarts (calls move back). The row never doubles.
    first.start_controller()
    second.restart_controller()
    wait_for(lambda: _failovers(adapter) > before + 1, timeout=10, what="second failover")
    time.sleep(2 * adapter.heartbeat_interval)
    assert [r["healthy"] for r in registry.rows(adapter)] == [True]

    # SIGTERM: the row goes, through the controller still up.
    adapter.stop()
    assert registry.rows(adapter) == []


@pytest.mark.deadline(240)
def test_ha_controllers_on_one_sqlite_file(
    tmp_path: Path,
    peers: Peers,
    dbgpt_cluster_factory: Callable[..., DbgptCluster],
    reference_worker_factory: Callable[..., ReferenceWorkerProc],
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
    timing: Callable[..., None],
) -> None:
    path = tmp_path / "registry.db"
    _scenario(
        Registry(peers, f"sqlite:///{path}"),
        sqlite_registry(path),
        "sqlite",
        dbgpt_cluster_factory,
        reference_worker_factory,
        adapter_factory,
        http,
        timing,
    )


@pytest.mark.deadline(300)
def test_ha_controllers_on_mariadb(
    mariadb: MariaDb,
    peers: Peers,
    dbgpt_cluster_factory: Callable[..., DbgptCluster],
    reference_worker_factory: Callable[..., ReferenceWorkerProc],
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
    timing: Callable[..., None],
) -> None:
    _scenario(
        Registry(peers, mariadb.sqlalchemy_url),
        mariadb.dbgpt_registry,
        "mariadb",
        dbgpt_cluster_factory,
        reference_worker_factory,
        adapter_factory,
        http,
        timing,
    )
