"""Issue 10 part 1: reasoning output split into DB-GPT's thinking part, seen through the real
DB-GPT 0.8.2 apiserver (docs/protocol.md §7.4). A reference worker replies with a scripted
answer in each of the three tag shapes; the adapter runs with its default `--reasoning auto`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.interop.calls import Answer, chat_body, post_openai, reasoning_of
from tests.interop.stacks import AdapterProc, DbgptCluster, ReferenceWorkerProc

THINKING = "Let me see: {a: 1}."
ANSWER = "The answer is 42."
BOTH_TAGS = ["<think>", *THINKING.split(), "</think>", *ANSWER.split()]
END_TAG_ONLY = BOTH_TAGS[1:]  # the template pre-fills <think>

# A ChatML template whose open assistant turn ends with <think> (as DeepSeek-R1 distills'
# templates do): the prompt pre-fills the start tag, the model writes only the end tag.
PREFILL_TEMPLATE = {
    "name": "chatml-think-prefill",
    "system_template": "<|im_start|>system\n{system_message}",
    "system_message": "You are a helpful assistant.",
    "roles": ["<|im_start|>user", "<|im_start|>assistant\n<think>"],
    "messages": [],
    "offset": 0,
    "sep_style": 9,  # CHATML in FastChat 0.2.36's numbering
    "sep": "<|im_end|>",
    "sep2": None,
    "stop_str": None,
    "stop_token_ids": None,
}

# shape -> (model name, script, max_tokens, expected thinking, expected answer, finish reason)
SHAPES = {
    "both-tags": ("think-both", BOTH_TAGS, 32, THINKING, ANSWER, "stop"),
    "end-tag-only": ("think-prefill", END_TAG_ONLY, 32, THINKING, ANSWER, "stop"),
    # Cut by max_tokens while still thinking: only the start tag has been written.
    "start-tag-only": ("think-open", BOTH_TAGS, 6, THINKING, "", "length"),
}


def _start(
    shape: str,
    tmp_path: Path,
    reference_worker_factory: Callable[..., ReferenceWorkerProc],
    adapter_factory: Callable[..., AdapterProc],
    controller_url: str,
    *extra_args: str,
) -> str:
    model, script, *_ = SHAPES[shape]
    options: dict[str, object] = {"script": script, "eos_after": len(script)}
    if shape == "end-tag-only":
        template = tmp_path / "prefill.json"
        template.write_text(json.dumps(PREFILL_TEMPLATE))
        options["conv_template_file"] = str(template)
    worker = reference_worker_factory(model, **options)
    adapter_factory(workers=[worker.url], controllers=[controller_url], extra_args=extra_args)
    return model


def _ask(http: httpx.Client, cluster: DbgptCluster, model: str, *, stream: bool) -> Answer:
    max_tokens = next(s[2] for s in SHAPES.values() if s[0] == model)
    body = chat_body(model, "What is the answer?", max_tokens, stream=stream)
    answer = post_openai(http, cluster.api_url + "/api/v1/chat/completions", body)
    assert answer.status == 200 and not answer.errors, answer.errors
    return answer


@pytest.mark.deadline(120)
@pytest.mark.parametrize("shape", SHAPES)
def test_reasoning_content_carries_the_thinking(
    shape: str,
    tmp_path: Path,
    dbgpt_cluster: DbgptCluster,
    reference_worker_factory: Callable[..., ReferenceWorkerProc],
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
) -> None:
    """Streaming and not: `reasoning_content` is exactly the thinking (braces and all, never in
    `content`), `content` exactly the answer; the stream's deltas add up with nothing lost."""
    model = _start(
        shape, tmp_path, reference_worker_factory, adapter_factory, dbgpt_cluster.controller_url
    )
    _, _, _, thinking, answer_text, finish = SHAPES[shape]
    for stream in (True, False):
        answer = _ask(http, dbgpt_cluster, model, stream=stream)
        assert reasoning_of(answer) == thinking, (stream, answer.events)
        assert answer.text == answer_text, (stream, answer.events)
        assert answer.finish_reason == finish
        if stream:
            assert answer.done


@pytest.mark.deadline(120)
@pytest.mark.parametrize(
    ("mode", "content"),
    [("strip", ANSWER), ("pass", " ".join(BOTH_TAGS))],
)
def test_strip_and_pass_keep_the_text_form(
    mode: str,
    content: str,
    tmp_path: Path,
    dbgpt_cluster: DbgptCluster,
    reference_worker_factory: Callable[..., ReferenceWorkerProc],
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
) -> None:
    """`--reasoning strip`: the answer only, no reasoning_content; `pass`: today's relay, the
    think block inside `content`."""
    model = _start(
        "both-tags",
        tmp_path,
        reference_worker_factory,
        adapter_factory,
        dbgpt_cluster.controller_url,
        "--reasoning",
        mode,
    )
    for stream in (True, False):
        answer = _ask(http, dbgpt_cluster, model, stream=stream)
        assert answer.text == content, (stream, answer.events)
        assert reasoning_of(answer) == ""


@pytest.mark.deadline(120)
def test_dbgpt_075_apiserver_reads_the_split_too(
    tmp_path: Path,
    dbgpt075_cluster: DbgptCluster,
    reference_worker_factory: Callable[..., ReferenceWorkerProc],
    adapter_factory: Callable[..., AdapterProc],
    http: httpx.Client,
) -> None:
    """DB-GPT 0.7.5 (content lists are read from 0.7.1 on): the same split, streaming and not."""
    model = _start(
        "both-tags",
        tmp_path,
        reference_worker_factory,
        adapter_factory,
        dbgpt075_cluster.controller_url,
    )
    for stream in (True, False):
        answer = _ask(http, dbgpt075_cluster, model, stream=stream)
        assert (reasoning_of(answer), answer.text) == (THINKING, ANSWER), answer.events
