"""Issue #6 scenarios 2 and 3: answer parity at temperature 0 between FastChat's own
openai_api_server and DB-GPT's apiserver routed through the adapter, with the prompts the
worker receives compared too (docs/peers.md §5 items 2-3).

Topology (one per module): a dedicated tiny-vicuna worker served as `parity-vicuna`, behind two
recording proxies (tests/interop/recording_proxy.py). The worker registers with FastChat's
controller under proxy A's address, so openai_api_server reaches it through A; the adapter's
`--worker-address` is proxy B. So every request body the worker gets is recorded, and we know
which side sent it. The adapter registers `parity-vicuna@llm` with the shared DB-GPT cluster.
The rig and the checks are plain functions (`parity_rig`, `parity_rigs`, `check_*`):
test_dbgpt_075.py runs a subset of them against a DB-GPT 0.7.5 cluster, and
test_template_parity.py against workers started with other conversation templates.

Both sides get `temperature: 0`. DB-GPT's apiserver drops a 0 (docs/protocol.md §8.2), so the
adapter sees none and applies its documented default, 0.0 (greedy); FastChat's server forwards
0.0, greedy below 1e-5 (docs/peers.md §3.6). Both are checked on the recorded worker bodies.
Stream is compared with stream and non-stream with non-stream: both OpenAI layers strip U+FFFD
from stream deltas only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.interop.calls import Answer, post_openai
from tests.interop.conftest import start_adapter
from tests.interop.peers import Peers
from tests.interop.procs import RunDir, free_port, start_parallel
from tests.interop.recording_proxy import RecordingProxy
from tests.interop.stacks import AdapterProc, DbgptCluster, FastChatStack, FastChatWorker

MODEL = "parity-vicuna"
GREEDY_BELOW = 1e-5  # FastChat's model_worker: temperature < 1e-5 means argmax
# Stop strings that never occur in this model's output (checked against each reference).
MISSES = ("@@@@", "~~~~", "{{{{", "^^^^", "<<>>", "]]]]")


@dataclass
class Rig:
    stack: FastChatStack
    cluster: DbgptCluster
    worker: FastChatWorker
    adapter: AdapterProc
    fastchat_proxy: RecordingProxy  # what openai_api_server sends the worker
    adapter_proxy: RecordingProxy  # what the adapter sends the worker
    model: str = MODEL  # the name the worker serves and both sides ask for
    references: dict[str, str] = field(default_factory=dict)

    @property
    def fastchat_chat(self) -> str:
        return self.stack.openai_url + "/v1/chat/completions"

    @property
    def dbgpt_chat(self) -> str:
        return self.cluster.api_url + "/api/v1/chat/completions"


@contextlib.contextmanager
def parity_rig(
    interop_run: RunDir,
    peers: Peers,
    fastchat_stack: FastChatStack,
    dbgpt_cluster: DbgptCluster,
    *,
    name: str = "parity",
    model: str = MODEL,
    conv_template: str | None = None,
) -> Iterator[Rig]:
    """Start the worker (serving `model`, with `--conv-template conv_template` if given), both
    proxies and an adapter registered with `dbgpt_cluster`'s controller; stop them all on exit.
    `name` prefixes the process names."""
    rigs = parity_rigs(
        interop_run, peers, fastchat_stack, dbgpt_cluster, name=name, models={model: conv_template}
    )
    with rigs as started:
        yield started[model]


@contextlib.contextmanager
def parity_rigs(
    interop_run: RunDir,
    peers: Peers,
    fastchat_stack: FastChatStack,
    dbgpt_cluster: DbgptCluster,
    *,
    name: str,
    models: dict[str, str | None],
) -> Iterator[dict[str, Rig]]:
    """Like `parity_rig`, for several dedicated workers at once: one per entry of `models`
    (served name -> `--conv-template`, None for the model path's own), each behind its own two
    proxies, started in parallel; one adapter serves them all. Yields the rigs by model name."""
    parts: dict[str, tuple[FastChatWorker, RecordingProxy, RecordingProxy]] = {}
    adapter: AdapterProc | None = None
    try:
        for model, conv_template in models.items():
            port = free_port()
            target = f"http://127.0.0.1:{port}"
            fastchat_proxy = RecordingProxy(target).start()
            adapter_proxy = RecordingProxy(target).start()
            worker = FastChatWorker(
                interop_run,
                f"{name}-worker" if len(models) == 1 else f"{name}-worker-{model}",
                python=peers.fastchat.python,
                model_path=peers.models.tiny_llm,
                model_name=model,
                controller_url=fastchat_stack.controller_url,
                port=port,
                conv_template=conv_template,
                worker_address=fastchat_proxy.url,
            )
            parts[model] = (worker, fastchat_proxy, adapter_proxy)
        start_parallel([worker for worker, _, _ in parts.values()], same_port=True)
        adapter = start_adapter(
            interop_run,
            f"{name}-adapter",
            workers=[adapter_proxy.url for _, _, adapter_proxy in parts.values()],
            controllers=[dbgpt_cluster.controller_url],
        )
        yield {
            model: Rig(fastchat_stack, dbgpt_cluster, worker, adapter, fc_proxy, ad_proxy, model)
            for model, (worker, fc_proxy, ad_proxy) in parts.items()
        }
    finally:
        if adapter is not None:
            adapter.stop()
        with ThreadPoolExecutor(max_workers=max(1, len(parts))) as pool:
            list(pool.map(lambda part: part[0].stop(), parts.values()))
        for _, fastchat_proxy, adapter_proxy in parts.values():
            fastchat_proxy.stop()
            adapter_proxy.stop()
        # Drop the workers from FastChat's controller now (their proxies refuse connections).
        with httpx.Client(timeout=10, trust_env=False) as client:
            client.post(fastchat_stack.controller_url + "/refresh_all_workers")


@pytest.fixture(scope="module")
def rig(
    interop_run: RunDir,
    peers: Peers,
    fastchat_stack: FastChatStack,
    dbgpt_cluster: DbgptCluster,
) -> Iterator[Rig]:
    with parity_rig(interop_run, peers, fastchat_stack, dbgpt_cluster) as parity:
        yield parity


# --- conversations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    messages: list[dict[str, Any]]
    max_tokens: int
    hit: bool = False  # add a stop string taken from the reference answer (it will stop)
    misses: int = 0  # add this many stop strings that never occur

    def stops(self, reference: str) -> list[str]:
        misses = [m for m in MISSES if m not in reference][: self.misses]
        assert len(misses) == self.misses, f"too few stop strings absent from {reference!r}"
        if not self.hit:
            return misses
        return [stop_from(reference), *misses]


def stop_from(reference: str) -> str:
    """A short ASCII piece of the reference answer from ~40% in: generation stops there."""
    start = max(1, int(len(reference) * 0.4))
    for offset in range(start, len(reference) - 4):
        piece = reference[offset : offset + 4]
        if piece.isascii() and piece.strip() and piece.isprintable():
            return piece
    raise AssertionError(f"no usable stop string in {reference!r}")


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _user_parts(*texts: str) -> dict[str, Any]:
    """One user message of several text parts. FastChat joins them with "\n"; DB-GPT's
    apiserver splits them into consecutive human messages, which the adapter merges back."""
    return {"role": "user", "content": [{"type": "text", "text": t} for t in texts]}


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def _system(text: str) -> dict[str, Any]:
    return {"role": "system", "content": text}


CASES = [
    Case("system-one-turn", [_system("You are terse."), _user("Hello!")], 32),
    Case("no-system", [_user("What is a license?")], 48, misses=1),
    Case(
        "multi-turn-stop-hit",
        [
            _system("You are a helpful assistant."),
            _user("Hi"),
            _assistant("Hello. How can I help?"),
            _user("Explain the GNU General Public License."),
        ],
        40,
        hit=True,
    ),
    Case(
        "five-turns-four-stops",
        [
            _system("Answer in one sentence."),
            _user("First question?"),
            _assistant("First answer."),
            _user("Second question?"),
            _assistant("Second answer."),
            _user("Third question, please."),
        ],
        64,
        hit=True,
        misses=3,
    ),
    Case("unicode", [_system("Réponds en français."), _user("你好, 世界 😀 — ça va?")], 24),
    Case(
        "template-lookalikes",
        [_system("Line one.\nLine two."), _user("USER: ASSISTANT: </s> ### {x} {{y}}")],
        32,
        hit=True,
        misses=1,
    ),
    Case("long-user", [_user("Permission is hereby granted, free of charge, " * 8)], 16),
    Case("one-token", [_system("Be brief."), _user("Yes or no?")], 1),
    Case("text-parts", [_user_parts("Part one.", "Part two.")], 32, misses=2),
    Case(
        "assistant-last-turn-then-user",
        [
            _user("Count to three."),
            _assistant("One, two, three."),
            _user("Again, backwards."),
        ],
        48,
        hit=True,
    ),
    Case("longer-answer", [_system("Write at length."), _user("Tell me a story.")], 160),
    Case("whitespace", [_system("  spaced  "), _user("\tTabbed\n\ntext  ")], 24, misses=4),
]


def _body(rig: Rig, case: Case, stops: list[str], *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": rig.model,
        "messages": case.messages,
        "temperature": 0,
        "max_tokens": case.max_tokens,
        "stream": stream,
    }
    if stops:
        body["stop"] = stops
    return body


def _reference(rig: Rig, http: httpx.Client, case: Case) -> str:
    """FastChat's non-stream answer without stop strings (to pick stops from)."""
    if case.name not in rig.references:
        answer = post_openai(http, rig.fastchat_chat, _body(rig, case, [], stream=False))
        assert answer.status == 200 and not answer.errors, answer
        rig.references[case.name] = answer.text
    return rig.references[case.name]


def _one_body(proxy: RecordingProxy, mark: int) -> dict[str, Any]:
    bodies = proxy.generate_bodies(mark)
    assert len(bodies) == 1, bodies
    body = bodies[0]
    assert isinstance(body, dict), body
    return body


def _compare_worker_bodies(fastchat: dict[str, Any], adapter: dict[str, Any]) -> list[str]:
    problems = []
    if fastchat.get("prompt") != adapter.get("prompt"):
        problems.append(f"prompt: {fastchat.get('prompt')!r} != {adapter.get('prompt')!r}")
    if fastchat.get("max_new_tokens") != adapter.get("max_new_tokens"):
        problems.append(
            f"max_new_tokens {fastchat.get('max_new_tokens')} != {adapter.get('max_new_tokens')}"
        )
    if set(fastchat.get("stop") or []) != set(adapter.get("stop") or []):
        problems.append(f"stop {fastchat.get('stop')} != {adapter.get('stop')}")
    if (fastchat.get("stop_token_ids") or None) != (adapter.get("stop_token_ids") or None):
        problems.append(f"stop_token_ids {fastchat.get('stop_token_ids')} != ...")
    for side, body in (("FastChat", fastchat), ("adapter", adapter)):
        temperature = body.get("temperature", 1.0)  # the worker's default when absent
        if not (isinstance(temperature, float | int) and temperature < GREEDY_BELOW):
            problems.append(f"{side} sent temperature {temperature!r}: not greedy")
        if body.get("echo"):
            problems.append(f"{side} sent echo {body.get('echo')!r}")
    return problems


def _answers_differ(fastchat: Answer, dbgpt: Answer) -> list[str]:
    problems = []
    for side, answer in (("FastChat", fastchat), ("DB-GPT", dbgpt)):
        if answer.status != 200 or answer.errors:
            problems.append(f"{side}: HTTP {answer.status}, errors {answer.errors}")
    if fastchat.text != dbgpt.text:
        problems.append(f"text: FastChat {fastchat.text!r} != DB-GPT {dbgpt.text!r}")
    if fastchat.finish_reason != dbgpt.finish_reason:
        problems.append(f"finish_reason {fastchat.finish_reason!r} != {dbgpt.finish_reason!r}")
    return problems


# --- 2. chat parity --------------------------------------------------------------------------


def check_rig_topology(rig: Rig, http: httpx.Client) -> None:
    """Each side reaches the worker through its own proxy, and only through it."""
    models = http.post(rig.stack.controller_url + "/list_models", timeout=10).json()["models"]
    assert rig.model in models
    address = http.post(
        rig.stack.controller_url + "/get_worker_address", json={"model": rig.model}, timeout=10
    ).json()["address"]
    assert address == rig.fastchat_proxy.url


def test_s02_parity_rig_topology(rig: Rig, http: httpx.Client) -> None:
    check_rig_topology(rig, http)


@pytest.mark.deadline(90)
@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_s02_chat_parity_at_temperature_0(
    rig: Rig, http: httpx.Client, case: Case, stream: bool
) -> None:
    check_chat_parity(rig, http, case, stream=stream)


def check_chat_parity(rig: Rig, http: httpx.Client, case: Case, *, stream: bool) -> None:
    """Byte-identical text and the same finish reason from FastChat's /v1/chat/completions and
    DB-GPT's /api/v1/chat/completions (through the adapter), and the same prompt,
    max_new_tokens, stop set and greedy temperature in the bodies the worker received."""
    reference = _reference(rig, http, case)
    stops = case.stops(reference)
    assert len(stops) <= 4  # DB-GPT's apiserver rejects 5

    mark_fastchat = rig.fastchat_proxy.mark()
    fastchat = post_openai(http, rig.fastchat_chat, _body(rig, case, stops, stream=stream))
    fastchat_body = _one_body(rig.fastchat_proxy, mark_fastchat)
    mark_adapter = rig.adapter_proxy.mark()
    dbgpt = post_openai(http, rig.dbgpt_chat, _body(rig, case, stops, stream=stream))
    adapter_body = _one_body(rig.adapter_proxy, mark_adapter)

    problems = _answers_differ(fastchat, dbgpt)
    problems += _compare_worker_bodies(fastchat_body, adapter_body)
    assert problems == [], "\n".join(problems)
    if stream:
        assert fastchat.done and dbgpt.done
    if case.hit:  # the stop string really cut the answer short
        assert fastchat.finish_reason == "stop", fastchat
        assert len(fastchat.text) < len(reference.replace("\ufffd", "") if stream else reference)
    if case.max_tokens == 1:
        assert fastchat.finish_reason == "length"


@pytest.mark.deadline(120)
def test_s02_count_token_is_asked_when_the_clamp_binds(rig: Rig, http: httpx.Client) -> None:
    """The adapter skips /count_token only when the count cannot change max_new_tokens
    (protocol.translate.prompt_tokens_bound): the cases above, whose bodies match FastChat's.
    With a prompt that leaves less room than max_tokens, it asks the real worker and clamps:
    FastChat sends context - count, the adapter one token less (docs/protocol.md §3.5)."""
    case = Case("clamped", [_user("Permission is hereby granted, free of charge, " * 150)], 900)
    mark_fastchat = rig.fastchat_proxy.mark()
    fastchat = post_openai(http, rig.fastchat_chat, _body(rig, case, [], stream=True))
    fastchat_body = _one_body(rig.fastchat_proxy, mark_fastchat)
    mark_adapter = rig.adapter_proxy.mark()
    dbgpt = post_openai(http, rig.dbgpt_chat, _body(rig, case, [], stream=True))
    adapter_body = _one_body(rig.adapter_proxy, mark_adapter)
    assert not fastchat.errors and not dbgpt.errors, (fastchat, dbgpt)
    assert [r.path for r in rig.adapter_proxy.since(mark_adapter, "/count_token")]
    count = http.post(
        rig.worker.url + "/count_token",
        json={"model": rig.model, "prompt": adapter_body["prompt"]},
        timeout=30,
    ).json()["count"]
    assert fastchat_body["prompt"] == adapter_body["prompt"]
    assert fastchat_body["max_new_tokens"] == 2048 - count < case.max_tokens  # it binds
    assert adapter_body["max_new_tokens"] == 2048 - count - 1


# --- 3. completions parity ---------------------------------------------------------------------

PROMPTS = [
    ("plain", "Once upon a time", 24),
    ("rendered-vicuna", "A chat. USER: Hello! ASSISTANT:", 32),
    ("multiline", "Line one\nLine two\n\nThe end.", 16),
]


@pytest.mark.deadline(60)
@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize(("name", "prompt", "max_tokens"), PROMPTS, ids=[p[0] for p in PROMPTS])
def test_s03_completions_parity(
    rig: Rig, http: httpx.Client, name: str, prompt: str, max_tokens: int, stream: bool
) -> None:
    check_completions_parity(rig, http, prompt, max_tokens, stream=stream)


def check_completions_parity(
    rig: Rig, http: httpx.Client, prompt: str, max_tokens: int, *, stream: bool
) -> None:
    """DB-GPT's /api/v1/completions (the worker gets `prompt`, `chat_model: false`) against
    FastChat's /v1/completions with the same prompt, max_tokens and temperature 0: equal
    text and finish reason; the worker gets the prompt verbatim from both."""
    body = {
        "model": rig.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    mark_fastchat = rig.fastchat_proxy.mark()
    fastchat = post_openai(http, rig.stack.openai_url + "/v1/completions", body)
    fastchat_body = _one_body(rig.fastchat_proxy, mark_fastchat)
    mark_adapter = rig.adapter_proxy.mark()
    dbgpt = post_openai(http, rig.cluster.api_url + "/api/v1/completions", body)
    adapter_body = _one_body(rig.adapter_proxy, mark_adapter)

    problems = _answers_differ(fastchat, dbgpt)
    problems += _compare_worker_bodies(fastchat_body, adapter_body)
    assert problems == [], "\n".join(problems)
    assert adapter_body["prompt"] == prompt
    assert fastchat.text, fastchat
