"""Issue #6 scenarios 1, 8, 9 and 10: the adapter's registration lifecycle against the real
DB-GPT 0.8.2 controller and apiserver (docs/peers.md §5).

The adapter is the real `fastchat-adapter serve`, fronting the shared FastChat workers, with a
1 s heartbeat and a 0.5 s status poll (stacks.ADAPTER_*); the DB-GPT controllers use 5/15 s.
Scenario 1's body is `check_registration`; test_dbgpt_075.py runs it against DB-GPT 0.7.5.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.interop.calls import (
    Answer,
    chat_body,
    controller_instances,
    instances_at,
    post_openai,
    wait_for,
)
from tests.interop.stacks import AdapterProc, DbgptCluster, FastChatStack

LLM_KEY = "tiny-vicuna@llm"
EMBED_KEY = "all-MiniLM-L6-v2@text2vec"
BOTH = {LLM_KEY, EMBED_KEY}
REGISTRATION_DEADLINE_S = 2.0


def _standard_adapter(
    adapter_factory: Callable[..., AdapterProc],
    stack: FastChatStack,
    controller_url: str | None,
    **options: Any,
) -> AdapterProc:
    return adapter_factory(
        workers=[stack.worker_url],
        embedding_workers=[stack.embed_worker_url],
        controllers=[controller_url] if controller_url else [],
        **options,
    )


def _healthy_at(http: httpx.Client, controller_url: str, adapter: AdapterProc) -> set[str]:
    found = instances_at(http, controller_url, *adapter.host_port)
    return {key for key, inst in found.items() if inst["healthy"]}


def _model_list_rows(cluster: DbgptCluster) -> list[list[str]]:
    """`dbgpt model list` as rows of cells (its table uses `|` between cells)."""
    result = cluster.model_list()
    assert result.returncode == 0, result.stdout + result.stderr
    rows = []
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0] not in ("Model Name", ""):
            rows.append(cells)
    return rows


# --- 1. registration ----------------------------------------------------------------------------


@pytest.mark.deadline(90)
def test_s01_registration_within_2s_of_start(
    fastchat_stack: FastChatStack,
    dbgpt_cluster: DbgptCluster,
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
    timing: Callable[..., None],
) -> None:
    check_registration(fastchat_stack, dbgpt_cluster, adapter_factory, http, timing)


def check_registration(
    fastchat_stack: FastChatStack,
    dbgpt_cluster: DbgptCluster,
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
    timing: Callable[..., None],
    label: str = "s01",
) -> None:
    """Both models healthy at the adapter's host:port on the real controller within 2 s of the
    process being spawned; `dbgpt model list` (that cluster's CLI) shows both rows (Healthy
    True, right type); the apiserver's /api/v1/models lists both names. `label` prefixes the
    timing names."""
    controller = dbgpt_cluster.controller_url
    adapter = _standard_adapter(adapter_factory, fastchat_stack, controller, wait_ready=False)
    assert adapter.launched_at is not None
    listening: list[float] = []  # when /livez first answered: the process is serving

    def registered() -> bool:
        if not listening:
            try:
                if http.get(adapter.url + "/livez", timeout=0.5).status_code == 200:
                    listening.append(time.monotonic())
            except httpx.HTTPError:
                pass
        return _healthy_at(http, controller, adapter) >= BOTH

    wait_for(
        registered,
        timeout=15,
        interval=0.02,
        what=f"{sorted(BOTH)} healthy at {adapter.url} on {controller}",
    )
    done = time.monotonic()
    latency = done - adapter.launched_at
    timing(f"{label} registration latency (spawn -> both healthy on the controller)", latency)
    if listening:
        timing(f"{label} registration latency (first /livez -> both healthy)", done - listening[0])
    adapter.wait_ready(10)

    instances = instances_at(http, controller, *adapter.host_port)
    for key in BOTH:
        assert instances[key]["host"] == "127.0.0.1"
        assert instances[key]["port"] == adapter.port
        assert instances[key]["healthy"] is True
        assert instances[key]["enabled"] is True

    rows = _model_list_rows(dbgpt_cluster)
    mine = {(r[0], r[1]): r for r in rows if r[2] == "127.0.0.1" and r[3] == str(adapter.port)}
    assert set(mine) == {("tiny-vicuna", "llm"), ("all-MiniLM-L6-v2", "text2vec")}, rows
    assert all(r[4] == "True" for r in mine.values()), rows

    models = http.get(dbgpt_cluster.api_url + "/api/v1/models", timeout=10)
    assert models.status_code == 200, models.text
    assert {"tiny-vicuna", "all-MiniLM-L6-v2"} <= {m["id"] for m in models.json()["data"]}

    # Registration starts in the adapter's start-up, so the 2 s count from the process spawn,
    # Python's imports (~1 s on a busy 2-core machine) included.
    assert latency <= REGISTRATION_DEADLINE_S, (
        f"registered {latency:.2f} s after the adapter was spawned (limit 2 s)"
    )


# --- 8. DB-GPT controller restart ---------------------------------------------------------------


@pytest.mark.deadline(120)
def test_s08_controller_restart_registry_refilled_within_one_heartbeat(
    fastchat_stack: FastChatStack,
    dbgpt_cluster: DbgptCluster,
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
    timing: Callable[..., None],
) -> None:
    """SIGTERM the controller: the adapter keeps serving while it is down; restarted (empty
    registry, same TOML), the adapter's next heartbeat puts both models back within one
    heartbeat interval, and `dbgpt model list` shows them."""
    controller = dbgpt_cluster.controller_url
    adapter = _standard_adapter(adapter_factory, fastchat_stack, controller)
    assert _healthy_at(http, controller, adapter) >= BOTH

    dbgpt_cluster.stop_controller()
    time.sleep(2 * adapter.heartbeat_interval)  # let heartbeats fail against the dead port
    assert adapter.alive
    generate = {
        "model": "tiny-vicuna",
        "messages": [{"role": "human", "content": "Still there?", "round_index": 0}],
        "max_new_tokens": 8,
        "echo": False,
    }
    reply = http.post(adapter.url + "/api/worker/generate", json=generate, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["error_code"] == 0, reply.text

    dbgpt_cluster.start_controller()  # returns once /api/health answers
    up = time.monotonic()
    wait_for(
        lambda: _healthy_at(http, controller, adapter) >= BOTH,
        timeout=15,
        interval=0.05,
        what="both models back on the restarted controller",
    )
    refill = time.monotonic() - up
    timing("s08 controller restart -> both models back", refill)
    assert adapter.alive
    rows = _model_list_rows(dbgpt_cluster)
    mine = {(r[0], r[1]) for r in rows if r[3] == str(adapter.port) and r[4] == "True"}
    assert mine == {("tiny-vicuna", "llm"), ("all-MiniLM-L6-v2", "text2vec")}, rows
    answer = post_openai(
        http,
        dbgpt_cluster.api_url + "/api/v1/chat/completions",
        chat_body("tiny-vicuna", "Back again", 8, stream=False),
    )
    assert answer.errors == [] and answer.status == 200, answer
    # One heartbeat interval (counted from when the harness saw /api/health answer, i.e. up to
    # 0.15 s late), plus slack for the 50 ms listing poll itself.
    assert refill <= adapter.heartbeat_interval + 0.25, f"{refill:.2f} s"


# --- 9. SIGTERM with streams in flight ----------------------------------------------------------


@pytest.mark.deadline(120)
def test_s09_sigterm_deregisters_first_then_drains_five_streams(
    fastchat_stack: FastChatStack,
    dbgpt_cluster_factory: Callable[..., DbgptCluster],
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
    timing: Callable[..., None],
) -> None:
    """5 streams of ~300 tokens through a fresh DB-GPT cluster (the shared worker's limit is
    5); SIGTERM the adapter once all 5 are producing. Polling every 50 ms shows its entries
    removed from the controller (hard delete: gone, not unhealthy) before the last stream
    ends; all 5 end with a finish reason; the process exits 0; nothing comes back."""
    cluster = dbgpt_cluster_factory()
    controller = cluster.controller_url
    adapter = _standard_adapter(adapter_factory, fastchat_stack, controller)
    assert _healthy_at(http, controller, adapter) >= BOTH

    streams = 5
    started = threading.Barrier(streams + 1, timeout=60)
    results: list[Answer | BaseException | None] = [None] * streams
    ended_at: list[float] = [0.0] * streams

    def run(index: int) -> None:
        seen = threading.Event()

        def on_event(event: Any) -> None:
            choices = event.get("choices") or [{}]
            if not seen.is_set() and (choices[0].get("delta") or {}).get("content"):
                seen.set()
                started.wait()

        try:
            with httpx.Client(trust_env=False) as client:
                body = chat_body("tiny-vicuna", f"Tell me story number {index}", 300, stream=True)
                url = cluster.api_url + "/api/v1/chat/completions"
                results[index] = post_openai(client, url, body, on_event=on_event)
        except BaseException as exc:
            results[index] = exc
            started.abort()
        finally:
            ended_at[index] = time.monotonic()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    started.wait()  # all 5 are producing text
    sigterm_at = time.monotonic()
    adapter.signal(signal.SIGTERM)

    removed_at = None
    deadline = sigterm_at + 30
    while time.monotonic() < deadline:
        if not instances_at(http, controller, *adapter.host_port):
            removed_at = time.monotonic()
            break
        time.sleep(0.05)
    for thread in threads:
        thread.join(60)
    code = adapter.wait_exit(40)

    assert removed_at is not None, "the adapter's entries were never removed"
    last_end = max(ended_at)
    timing("s09 SIGTERM -> entries removed", removed_at - sigterm_at)
    timing("s09 SIGTERM -> last stream ended", last_end - sigterm_at)
    for index, result in enumerate(results):
        assert isinstance(result, Answer), (index, result)
        assert result.errors == [] and result.done, (index, result.errors, result.events[-3:])
        assert result.finish_reason in ("stop", "length"), (index, result.finish_reasons)
        assert result.text, index
    assert removed_at < last_end, (
        f"entries removed {removed_at - sigterm_at:.2f} s after SIGTERM, "
        f"last stream ended {last_end - sigterm_at:.2f} s after it"
    )
    assert code == 0, f"exit code {code}"
    # Nothing comes back: no heartbeat after the deletes (watch two heartbeat intervals).
    until = time.monotonic() + 2 * adapter.heartbeat_interval + 0.5
    while time.monotonic() < until:
        assert instances_at(http, controller, *adapter.host_port) == {}
        time.sleep(0.1)


# --- 10. standalone ------------------------------------------------------------------------------


@pytest.mark.deadline(120)
def test_s10_standalone_apiserver_uses_the_adapter_as_its_controller(
    fastchat_stack: FastChatStack,
    dbgpt_cluster_factory: Callable[..., DbgptCluster],
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
    timing: Callable[..., None],
) -> None:
    """No --controller-address: the adapter is the controller. A DB-GPT apiserver whose
    controller_addr is the adapter lists both models and serves chats (stream and not) and
    embeddings; /api/health answers, so no call pays DB-GPT's 2 s health-check wait."""
    adapter = _standard_adapter(adapter_factory, fastchat_stack, None)
    assert adapter.standalone
    assert http.get(adapter.url + "/api/health", timeout=5).json() == {"status": "ok"}
    listed = {i["model_name"]: i for i in controller_instances(http, adapter.url)}
    assert set(listed) >= BOTH, listed
    assert all(listed[k]["healthy"] and listed[k]["port"] == adapter.port for k in BOTH)

    cluster = dbgpt_cluster_factory(controller_addr=adapter.url)
    api = cluster.api_url
    started = time.monotonic()
    models = http.get(api + "/api/v1/models", timeout=10)
    timing("s10 standalone /api/v1/models", time.monotonic() - started)
    assert models.status_code == 200, models.text
    assert {"tiny-vicuna", "all-MiniLM-L6-v2"} <= {m["id"] for m in models.json()["data"]}

    url = api + "/api/v1/chat/completions"
    plain = post_openai(http, url, chat_body("tiny-vicuna", "Hello there", 16, stream=False))
    assert plain.status == 200 and plain.errors == [], plain
    assert plain.text and plain.finish_reason in ("stop", "length")
    streamed = post_openai(http, url, chat_body("tiny-vicuna", "Hello there", 16, stream=True))
    assert streamed.errors == [] and streamed.done, streamed
    assert streamed.text == plain.text.replace("\ufffd", "")
    timing("s10 standalone chat (non-stream)", plain.elapsed)

    inputs = ["first input", "a second, longer input sentence"]
    reply = http.post(
        api + "/api/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": inputs}, timeout=30
    )
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert all(len(d["embedding"]) == 384 for d in data)
    assert plain.elapsed < 2.0, f"a chat took {plain.elapsed:.2f} s: health-check wait?"
