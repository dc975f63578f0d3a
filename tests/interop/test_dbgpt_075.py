"""The DB-GPT 0.7.5 leg (docs/peers.md §2.7): scenarios 1-3 against a 0.7.5 controller and
apiserver, with the scenario bodies of test_adapter_registration.py and test_adapter_parity.py.

The 0.7.5 venv (peers.DBGPT_075, lock tests/interop/locks/dbgpt-0.7.5.txt) is built and its
cluster started only when a test here is selected; the FastChat stack is the shared one. To run
this leg alone: `pytest -m interop tests/interop -k "075 or 0.7.5"`.

Kept small: registration (s01), 4 chat-parity conversations and 2 completions prompts, each
stream and non-stream. The parity worker serves its own name, so it cannot be confused with
test_adapter_parity.py's.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.interop.peers import Peers
from tests.interop.procs import RunDir
from tests.interop.stacks import AdapterProc, DbgptCluster, FastChatStack
from tests.interop.test_adapter_parity import (
    CASES,
    PROMPTS,
    Case,
    Rig,
    check_chat_parity,
    check_completions_parity,
    check_rig_topology,
    parity_rig,
)
from tests.interop.test_adapter_registration import check_registration

VERSION = "dbgpt-0.7.5"
# Conversations covering the system turn, a stop string that hits, non-ASCII text and a
# multi-part user message (the consecutive-human merge).
CHAT_CASES = [c for c in CASES if c.name in ("system-one-turn", "multi-turn-stop-hit", "unicode")]
CHAT_CASES += [c for c in CASES if c.name == "text-parts"]
COMPLETION_PROMPTS = [p for p in PROMPTS if p[0] in ("plain", "rendered-vicuna")]
assert len(CHAT_CASES) == 4 and len(COMPLETION_PROMPTS) == 2


def test_dbgpt075_cluster_runs_0_7_5(dbgpt075_cluster: DbgptCluster) -> None:
    """The leg really runs 0.7.5: the venv its controller and apiserver come from."""
    assert dbgpt075_cluster.env.name == VERSION
    probe = "from importlib.metadata import version; print(version('dbgpt'))"
    out = subprocess.run(
        [str(dbgpt075_cluster.env.python), "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip() == "0.7.5", (out.stdout, out.stderr)
    assert all(p.alive for p in dbgpt075_cluster.procs)


@pytest.mark.deadline(90)
def test_s01_registration_dbgpt_075(
    fastchat_stack: FastChatStack,
    dbgpt075_cluster: DbgptCluster,
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
    timing: Callable[..., None],
) -> None:
    check_registration(
        fastchat_stack, dbgpt075_cluster, adapter_factory, http, timing, f"s01[{VERSION}]"
    )


@pytest.fixture(scope="module")
def rig075(
    interop_run: RunDir,
    peers: Peers,
    fastchat_stack: FastChatStack,
    dbgpt075_cluster: DbgptCluster,
) -> Iterator[Rig]:
    with parity_rig(
        interop_run,
        peers,
        fastchat_stack,
        dbgpt075_cluster,
        name="parity075",
        model="parity-vicuna-075",
    ) as rig:
        yield rig


def test_s02_parity_rig_topology_dbgpt_075(rig075: Rig, http: httpx.Client) -> None:
    check_rig_topology(rig075, http)


@pytest.mark.deadline(90)
@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize("case", CHAT_CASES, ids=[f"{VERSION}-{c.name}" for c in CHAT_CASES])
def test_s02_chat_parity_dbgpt_075(
    rig075: Rig, http: httpx.Client, case: Case, stream: bool
) -> None:
    check_chat_parity(rig075, http, case, stream=stream)


@pytest.mark.deadline(60)
@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize(
    ("name", "prompt", "max_tokens"),
    COMPLETION_PROMPTS,
    ids=[f"{VERSION}-{p[0]}" for p in COMPLETION_PROMPTS],
)
def test_s03_completions_parity_dbgpt_075(
    rig075: Rig, http: httpx.Client, name: str, prompt: str, max_tokens: int, stream: bool
) -> None:
    check_completions_parity(rig075, http, prompt, max_tokens, stream=stream)
