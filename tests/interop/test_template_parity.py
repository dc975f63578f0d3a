"""The template leg of scenarios 2 and 3: chat and completions parity (test_adapter_parity.py's
checks, unchanged) against dedicated tiny-vicuna workers started with `--conv-template NAME`, so
prompts are built with separator styles other than vicuna_v1.1's ADD_COLON_TWO
(docs/protocol.md §3.2-§3.4, §4.3-§4.4).

One module-scoped set of rigs (`parity_rigs`): a worker per template, started in parallel, each
behind its own two recording proxies, and one adapter serving them all, registered with the
shared DB-GPT 0.8.2 cluster; the FastChat stack is the shared one. The templates cover a
template stop string (zero_shot), an empty default system message (llama-2), a stop string plus
stop token ids beyond the tiny model's 2000-token vocabulary (qwen-7b-chat) and a style numbered
differently in 0.2.36 and FastChat main (chatglm3, with stop id 2 = the tiny model's EOS).
The model weights stay tiny-vicuna's whatever the template: the answers are gibberish, but
greedy and deterministic, so byte-for-byte comparable.

To run this leg alone: `pytest -m interop tests/interop -k template_parity`.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.interop.peers import Peers
from tests.interop.procs import RunDir
from tests.interop.stacks import DbgptCluster, FastChatStack
from tests.interop.test_adapter_parity import (
    CASES,
    PROMPTS,
    Case,
    Rig,
    check_chat_parity,
    check_completions_parity,
    check_rig_topology,
    parity_rigs,
)

# template name -> (its SeparatorStyle in fschat 0.2.36, its stop_str, its stop_token_ids)
TEMPLATES: dict[str, tuple[int, str | None, list[int] | None]] = {
    "zero_shot": (1, "###", None),  # ADD_COLON_SINGLE
    "llama-2": (7, None, None),  # LLAMA2
    "qwen-7b-chat": (9, "<|endoftext|>", [151643, 151644, 151645]),  # CHATML
    "chatglm3": (16, None, [64795, 64797, 2]),  # CHATGLM3
}
# A system message with one turn, no system message (the template's default), and a multi-turn
# conversation with a stop string that hits.
CHAT_CASES = [c for c in CASES if c.name in ("system-one-turn", "no-system", "multi-turn-stop-hit")]
COMPLETION_PROMPTS = [p for p in PROMPTS if p[0] == "plain"]
assert len(CHAT_CASES) == 3 and len(COMPLETION_PROMPTS) == 1


def model_for(template: str) -> str:
    return f"parity-tmpl-{template}"


@pytest.fixture(scope="module")
def template_rigs(
    interop_run: RunDir,
    peers: Peers,
    fastchat_stack: FastChatStack,
    dbgpt_cluster: DbgptCluster,
) -> Iterator[dict[str, Rig]]:
    models = {model_for(t): t for t in TEMPLATES}
    with parity_rigs(
        interop_run, peers, fastchat_stack, dbgpt_cluster, name="tmpl", models=models
    ) as rigs:
        yield {t: rigs[model_for(t)] for t in TEMPLATES}


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_s02_template_parity_rig(
    template_rigs: dict[str, Rig], http: httpx.Client, template: str
) -> None:
    """The worker really serves the template (else this leg would test vicuna_v1.1 again)."""
    rig = template_rigs[template]
    check_rig_topology(rig, http)
    conv = http.post(
        rig.worker.url + "/worker_get_conv_template", json={"model": rig.model}, timeout=10
    ).json()["conv"]
    style, stop_str, stop_token_ids = TEMPLATES[template]
    assert (conv["name"], conv["sep_style"]) == (template, style), conv
    assert (conv["stop_str"], conv["stop_token_ids"]) == (stop_str, stop_token_ids), conv


@pytest.mark.deadline(90)
@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize("case", CHAT_CASES, ids=[c.name for c in CHAT_CASES])
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_s02_template_chat_parity(
    template_rigs: dict[str, Rig], http: httpx.Client, template: str, case: Case, stream: bool
) -> None:
    check_chat_parity(template_rigs[template], http, case, stream=stream)


@pytest.mark.deadline(60)
@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize(
    ("name", "prompt", "max_tokens"), COMPLETION_PROMPTS, ids=[p[0] for p in COMPLETION_PROMPTS]
)
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_s03_template_completions_parity(
    template_rigs: dict[str, Rig],
    http: httpx.Client,
    template: str,
    name: str,
    prompt: str,
    max_tokens: int,
    stream: bool,
) -> None:
    check_completions_parity(template_rigs[template], http, prompt, max_tokens, stream=stream)
