"""The reference worker checked against FastChat's wire (docs/protocol.md §1)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapter.tools.reference_worker import (
    ReferenceWorkerConfig,
    add_reference_worker_arguments,
    config_from_args,
    create_app,
    vicuna_v1_1_template,
)
from adapter.tools.scripted_model import EOS, SERVER_ERROR_MSG, ScriptedModel, ScriptedReply
from tests.adapter.helpers import within
from tests.support.servers import LoopbackServer
from tests.support.worker_client import (
    connect,
    queue_length,
    split_frames,
    stream_raw,
    wait_for_queue_length,
)

MODEL = ScriptedModel()
PROMPT = "USER: name four letters ASSISTANT:"
CHUNK_KEYS = ["text", "error_code", "usage", "finish_reason", "logprobs"]
CAPTURED_VICUNA = (  # docs/protocol.md §1.9, 372 bytes
    b'{"conv":{"name":"vicuna_v1.1","system_template":"{system_message}","system_message":'
    b'"A chat between a curious user and an artificial intelligence assistant. The assistant'
    b' gives helpful, detailed, and polite answers to the user\'s questions.","roles":'
    b'["USER","ASSISTANT"],"messages":[],"offset":0,"sep_style":2,"sep":" ","sep2":"</s>",'
    b'"stop_str":null,"stop_token_ids":null}}'
)
ROUTES = [
    "/worker_generate_stream",
    "/worker_generate",
    "/worker_get_embeddings",
    "/worker_get_status",
    "/count_token",
    "/worker_get_conv_template",
    "/model_details",
]

StartWorker = Callable[..., str]


@pytest.fixture
def start_worker(serve_app: Callable[..., LoopbackServer]) -> StartWorker:
    """``start_worker(**config)`` serves a reference worker and returns its URL."""
    return lambda **config: serve_app(create_app(ReferenceWorkerConfig(**config))).url


@pytest.fixture(scope="module")
def default_worker() -> Iterator[str]:
    """One worker with the default config for the whole module: tests leave its queue empty."""
    with LoopbackServer(create_app()) as server:
        yield server.url


@pytest.fixture
async def client(default_worker: str) -> AsyncIterator[httpx.AsyncClient]:
    async with connect(default_worker) as client:
        yield client


async def frames_for(client: httpx.AsyncClient, **body: Any) -> list[dict[str, Any]]:
    response, raw = await stream_raw(client, {"prompt": PROMPT, **body})
    assert response.status_code == 200
    return split_frames(raw)


def reply_text(count: int, prompt: str = PROMPT) -> str:
    return " ".join(MODEL.reply(prompt, count))


# -- framing and chunk semantics ---------------------------------------------------------------


async def test_stream_is_nul_framed_json_dumps_without_content_type(
    client: httpx.AsyncClient,
) -> None:
    response, raw = await stream_raw(client, {"prompt": PROMPT, "max_new_tokens": 4, "echo": False})
    assert response.status_code == 200
    assert "content-type" not in response.headers
    assert response.headers["transfer-encoding"] == "chunked"
    frames = split_frames(raw)
    # Python's json.dumps defaults byte for byte: ", " and ": " separators.
    assert raw == b"".join(json.dumps(frame).encode() + b"\0" for frame in frames)
    assert all(list(frame) == CHUNK_KEYS for frame in frames)
    assert all(
        list(f["usage"]) == ["prompt_tokens", "completion_tokens", "total_tokens"] for f in frames
    )


async def test_text_is_cumulative_and_the_final_chunk_repeats_it(
    client: httpx.AsyncClient,
) -> None:
    frames = await frames_for(client, max_new_tokens=4, echo=False)
    words = MODEL.reply(PROMPT, 4)
    assert [f["text"] for f in frames] == [
        words[0],
        " ".join(words[:3]),
        " ".join(words),
        " ".join(words),
    ]
    assert [f["finish_reason"] for f in frames] == [None, None, None, "length"]
    assert frames[-1]["usage"] == frames[-2]["usage"]


@pytest.mark.parametrize(("max_new_tokens", "chunks"), [(1, 2), (2, 3), (12, 8), (256, 130)])
async def test_chunk_count_matches_fastchat(
    client: httpx.AsyncClient, max_new_tokens: int, chunks: int
) -> None:
    frames = await frames_for(client, max_new_tokens=max_new_tokens, echo=False)
    assert len(frames) == chunks  # measured on fschat 0.2.36 (docs/protocol.md §1.4)


async def test_chunks_go_out_at_index_zero_every_interval_and_at_the_last_index(
    client: httpx.AsyncClient,
) -> None:
    frames = await frames_for(client, max_new_tokens=12, echo=False)
    completion = [f["usage"]["completion_tokens"] for f in frames]
    assert completion == [0, 2, 4, 6, 8, 10, 11, 11]


async def test_stream_interval_is_configurable(start_worker: StartWorker) -> None:
    async with connect(start_worker(stream_interval=5)) as client:
        frames = await frames_for(client, max_new_tokens=12, echo=False)
    assert [f["usage"]["completion_tokens"] for f in frames] == [0, 5, 10, 11, 11]


async def test_usage_counts_bos_and_reports_one_completion_token_short(
    client: httpx.AsyncClient,
) -> None:
    final = (await frames_for(client, max_new_tokens=7, echo=False))[-1]
    prompt_tokens = MODEL.count_tokens(PROMPT)
    assert final["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 6,  # 7 tokens generated, FastChat reports N - 1
        "total_tokens": prompt_tokens + 6,
    }


async def test_echo_defaults_to_true_and_repeats_the_redecoded_prompt(
    client: httpx.AsyncClient,
) -> None:
    prompt = "USER:  hi\n<s>there</s> ASSISTANT:"
    echoed = await frames_for(client, prompt=prompt, max_new_tokens=3)
    plain = await frames_for(client, prompt=prompt, max_new_tokens=3, echo=False)
    # Whitespace collapses and special tokens vanish, as in FastChat's re-decoding.
    assert echoed[-1]["text"] == "USER: hi there ASSISTANT: " + reply_text(3, prompt)
    assert plain[-1]["text"] == reply_text(3, prompt)


async def test_prompt_is_left_truncated_to_fit_the_context(start_worker: StartWorker) -> None:
    words = [f"w{i}" for i in range(30)]
    prompt = " ".join(words)
    async with connect(start_worker(context_length=16)) as client:
        final = (await frames_for(client, prompt=prompt, max_new_tokens=4))[-1]
    kept = 16 - 4 - 1  # context - max_new_tokens - 1, BOS dropped first
    assert final["usage"]["prompt_tokens"] == kept
    assert final["text"] == " ".join(words[-kept:]) + " " + reply_text(4, prompt)


# -- stop strings and stop tokens --------------------------------------------------------------


async def test_stop_string_cuts_the_text_and_keeps_preceding_whitespace(
    client: httpx.AsyncClient,
) -> None:
    words = MODEL.reply(PROMPT, 6)
    frames = await frames_for(client, max_new_tokens=6, echo=False, stop=words[2])
    assert frames[-1]["text"] == f"{words[0]} {words[1]} "
    assert frames[-1]["finish_reason"] == "stop"
    assert frames[-1]["usage"]["completion_tokens"] == 2
    assert frames[-2]["text"] == frames[-1]["text"]


async def test_stop_list_first_string_found_wins(client: httpx.AsyncClient) -> None:
    words = MODEL.reply(PROMPT, 6)
    frames = await frames_for(client, max_new_tokens=6, echo=False, stop=["nowhere", words[1]])
    assert frames[-1]["text"] == f"{words[0]} "
    assert frames[-1]["finish_reason"] == "stop"


async def test_chunks_are_withheld_while_the_text_ends_with_a_stop_prefix(
    client: httpx.AsyncClient,
) -> None:
    words = MODEL.reply(PROMPT, 6)
    frames = await frames_for(client, max_new_tokens=6, echo=False, stop=f"{words[2]} {words[3]}")
    # At index 2 the text ends with words[2], a prefix of the stop string: nothing goes out.
    # At index 4 the whole stop string is there: the text is cut before it.
    assert [f["usage"]["completion_tokens"] for f in frames] == [0, 4, 4]
    cut = f"{words[0]} {words[1]} "
    assert [f["text"] for f in frames] == [words[0], cut, cut]
    assert all(words[2] not in f["text"] for f in frames)


async def test_a_withheld_tail_still_reaches_the_final_chunk(client: httpx.AsyncClient) -> None:
    words = MODEL.reply(PROMPT, 3)
    frames = await frames_for(client, max_new_tokens=3, echo=False, stop=f"{words[2]} never")
    assert [f["usage"]["completion_tokens"] for f in frames] == [0, 2]
    assert frames[-1] == {**frames[-1], "text": " ".join(words), "finish_reason": "length"}


async def test_a_stop_string_only_in_the_echoed_prompt_does_not_stop(
    client: httpx.AsyncClient,
) -> None:
    frames = await frames_for(client, max_new_tokens=3, stop="ASSISTANT:")
    assert frames[-1]["finish_reason"] == "length"


async def test_stop_token_id_stops_after_the_token_and_keeps_its_text(
    client: httpx.AsyncClient,
) -> None:
    words = MODEL.reply(PROMPT, 6)
    stop_id = MODEL.token_id(words[1])
    frames = await frames_for(client, max_new_tokens=6, echo=False, stop_token_ids=[stop_id])
    assert frames[-1]["text"] == f"{words[0]} {words[1]}"
    assert frames[-1]["finish_reason"] == "stop"
    assert frames[-1]["usage"]["completion_tokens"] == 1


async def test_eos_ends_the_turn_invisibly(start_worker: StartWorker) -> None:
    async with connect(start_worker(eos_after=3)) as client:
        frames = await frames_for(client, max_new_tokens=10, echo=False)
    assert ScriptedModel(eos_after=3).reply(PROMPT, 10)[-1] == EOS
    assert frames[-1]["text"] == reply_text(3)
    assert frames[-1]["finish_reason"] == "stop"
    assert frames[-1]["usage"]["completion_tokens"] == 3


# -- logprobs ----------------------------------------------------------------------------------


async def test_logprobs_cover_the_output_tokens(client: httpx.AsyncClient) -> None:
    logprobs = (await frames_for(client, max_new_tokens=3, echo=False, logprobs=0))[-1]["logprobs"]
    words = MODEL.reply(PROMPT, 3)
    assert list(logprobs) == ["text_offset", "tokens", "token_logprobs", "top_logprobs"]
    assert logprobs["tokens"] == words
    offsets = [0, len(words[0]), len(words[0]) + len(words[1])]
    assert logprobs["text_offset"] == offsets
    assert all(isinstance(v, float) and v < 0 for v in logprobs["token_logprobs"])
    assert logprobs["top_logprobs"] == [{}, {}, {}]


async def test_echoed_logprobs_start_with_bos_and_no_value(client: httpx.AsyncClient) -> None:
    logprobs = (await frames_for(client, max_new_tokens=2, logprobs=1))[-1]["logprobs"]
    assert logprobs["tokens"][0] == "<s>"
    assert logprobs["token_logprobs"][0] is None
    assert len(logprobs["tokens"]) == MODEL.count_tokens(PROMPT) + 2


# -- errors ------------------------------------------------------------------------------------


async def test_invalid_stop_type_is_an_in_band_error(client: httpx.AsyncClient) -> None:
    frames = await frames_for(client, stop=5)
    expected = {"text": f"{SERVER_ERROR_MSG}\n\n(Invalid stop field type.)", "error_code": 50001}
    assert frames == [expected]
    response = await client.post("/worker_generate", json={"prompt": PROMPT, "stop": 5})
    assert (response.status_code, response.json()) == (200, expected)


@pytest.mark.parametrize(
    "body",
    [
        {"max_new_tokens": 4},
        {"prompt": PROMPT, "max_new_tokens": 0},
        {"prompt": PROMPT, "temperature": None},
    ],
    ids=["no-prompt", "zero-max-new-tokens", "null-temperature"],
)
async def test_requests_that_crash_fastchat_break_the_stream_but_free_the_slot(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        await stream_raw(client, body)
    response = await client.post("/worker_generate", json=body)
    assert (response.status_code, response.text) == (500, "Internal Server Error")
    await wait_for_queue_length(client, 0)


@pytest.mark.parametrize("path", ROUTES)
async def test_every_route_is_post_only(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert (response.status_code, response.json()) == (405, {"detail": "Method Not Allowed"})


async def test_unknown_path_is_404_and_invalid_json_is_500(client: httpx.AsyncClient) -> None:
    assert (await client.post("/nope", json={})).status_code == 404
    for path in ["/worker_generate_stream", "/worker_generate", "/count_token"]:
        response = await client.post(path, content=b"{not json")
        assert (response.status_code, response.text) == (500, "Internal Server Error")
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert await queue_length(client) == 0


# -- /worker_generate --------------------------------------------------------------------------


async def test_generate_returns_the_last_stream_chunk_as_compact_json(
    client: httpx.AsyncClient,
) -> None:
    body = {"prompt": PROMPT, "max_new_tokens": 5}
    response = await client.post("/worker_generate", json=body)
    assert response.headers["content-type"] == "application/json"
    final = (await frames_for(client, max_new_tokens=5))[-1]
    assert response.content == json.dumps(final, separators=(",", ":")).encode()


# -- concurrency -------------------------------------------------------------------------------


async def test_queue_length_counts_slots_in_use_plus_waiters(start_worker: StartWorker) -> None:
    url = start_worker(limit_worker_concurrency=2, tokens_per_second=10)
    body = {"prompt": PROMPT, "max_new_tokens": 100}  # ten seconds each unless cut short
    async with connect(url) as client:
        assert await queue_length(client) == 0
        stream = "/worker_generate_stream"
        async with (
            client.stream("POST", stream, json=body) as first,
            client.stream("POST", stream, json=body) as second,
        ):
            third = asyncio.create_task(
                client.send(client.build_request("POST", stream, json=body), stream=True)
            )
            await wait_for_queue_length(client, 3)
            await asyncio.sleep(0.2)
            assert not third.done(), "a waiter got its headers while both slots were held"
            await first.aclose()  # the client goes away: its slot passes to the waiter
            third_response = await within(10.0, third, "the waiter, once a slot was freed")
            await wait_for_queue_length(client, 2)
            assert second.status_code == third_response.status_code == 200
            await third_response.aclose()
        await wait_for_queue_length(client, 0)


async def test_queue_length_returns_to_zero_after_completion(start_worker: StartWorker) -> None:
    url = start_worker(tokens_per_second=200)
    async with connect(url) as client:
        body = {"prompt": PROMPT, "max_new_tokens": 20}
        streams = [stream_raw(client, {**body, "prompt": f"{PROMPT} {i}"}) for i in range(8)]
        results = await asyncio.gather(*streams)
        assert all(split_frames(raw)[-1]["finish_reason"] == "length" for _, raw in results)
        await wait_for_queue_length(client, 0)


@pytest.mark.parametrize("config", [{"tokens_per_second": 5}, {"first_token_delay": 30}])
async def test_a_client_leaving_mid_stream_frees_its_slot_at_once(
    start_worker: StartWorker, config: dict[str, float]
) -> None:
    async with connect(start_worker(**config)) as client:
        body = {"prompt": PROMPT, "max_new_tokens": 100}
        async with client.stream("POST", "/worker_generate_stream", json=body) as response:
            assert response.status_code == 200
            await wait_for_queue_length(client, 1)
        await wait_for_queue_length(client, 0, timeout=1.0)


async def test_first_token_delay_and_token_rate_pace_the_stream(start_worker: StartWorker) -> None:
    url = start_worker(first_token_delay=0.3, tokens_per_second=20)
    body = {"prompt": PROMPT, "max_new_tokens": 5}
    async with connect(url) as client:
        started = time.monotonic()
        async with client.stream("POST", "/worker_generate_stream", json=body) as response:
            first_byte_after = None
            async for _ in response.aiter_bytes():
                first_byte_after = first_byte_after or time.monotonic() - started
        total = time.monotonic() - started
    assert (first_byte_after or 0) >= 0.3
    assert total >= 0.3 + 4 / 20
    # The delay holds back the first chunk, not the headers: with a first token 30 s away,
    # the headers still come (a guard well under 30 s, not a measurement).
    async with connect(start_worker(first_token_delay=30)) as client:
        request = client.build_request("POST", "/worker_generate_stream", json=body)
        response = await within(10.0, client.send(request, stream=True), "the headers")
        assert response.status_code == 200
        await response.aclose()


# -- scripted replies --------------------------------------------------------------------------

SCRIPTED = (
    ScriptedReply(match=r"USER: how many ships\b", reply="SELECT count(*) FROM ships"),
    ScriptedReply(match="riddle", think="no houses", reply="A map.", first_token_delay=0.3),
)


async def test_a_scripted_reply_streams_like_any_reply_and_ends_with_stop(
    start_worker: StartWorker,
) -> None:
    async with connect(start_worker(replies=SCRIPTED)) as client:
        body = {"prompt": "USER: how many ships? ASSISTANT:", "max_new_tokens": 50, "echo": False}
        response, raw = await stream_raw(client, body)
    assert response.status_code == 200
    frames = split_frames(raw)
    assert [f["text"] for f in frames] == [
        "SELECT",
        "SELECT count(*) FROM",
        "SELECT count(*) FROM ships",
        "SELECT count(*) FROM ships",
    ]
    assert [f["finish_reason"] for f in frames] == [None, None, None, "stop"]
    assert frames[-1]["usage"]["completion_tokens"] == 4  # 4 words + EOS, one short


async def test_a_scripted_think_block_and_its_own_pace(start_worker: StartWorker) -> None:
    async with connect(start_worker(replies=SCRIPTED)) as client:
        started = time.monotonic()
        reply = await client.post("/worker_generate", json={"prompt": "a riddle", "echo": False})
        elapsed = time.monotonic() - started
        other = await client.post("/worker_generate", json={"prompt": "plain", "echo": False})
    assert reply.json()["text"] == "<think> no houses </think> A map."
    assert reply.json()["finish_reason"] == "stop"
    assert elapsed >= 0.3  # the reply's first_token_delay; the worker's own is 0
    assert other.json()["text"] == " ".join(MODEL.reply("plain", 256))


def test_cli_reads_a_replies_file(tmp_path: Path) -> None:
    path = tmp_path / "replies.toml"
    path.write_text('[[reply]]\nmatch = "hi"\nreply = "hello there"\n')
    parser = argparse.ArgumentParser()
    add_reference_worker_arguments(parser)
    config = config_from_args(parser.parse_args(["--replies", str(path)]))
    assert config.replies == (ScriptedReply(match="hi", reply="hello there"),)
    assert config.model.reply("hi", 5) == ["hello", "there", EOS]


def test_cli_refuses_a_bad_replies_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "replies.toml"
    path.write_text('[[reply]]\nmatch = "("\nreply = "x"\n')
    parser = argparse.ArgumentParser()
    add_reference_worker_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--replies", str(path)])
    assert "not a regular expression" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--replies", str(tmp_path / "missing.toml")])


# -- the other routes --------------------------------------------------------------------------


async def test_status(start_worker: StartWorker) -> None:
    async with connect(start_worker(model_names=("a", "b"))) as client:
        response = await client.post("/worker_get_status")
    assert response.json() == {"model_names": ["a", "b"], "speed": 1, "queue_length": 0}


async def test_conv_template_is_the_captured_vicuna_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/worker_get_conv_template", json={"model": "x"})
    assert response.content == CAPTURED_VICUNA
    assert len(response.content) == 372


async def test_conv_template_is_configurable(start_worker: StartWorker) -> None:
    template = {**vicuna_v1_1_template(), "name": "one_shot", "stop_str": "###"}
    async with connect(start_worker(conv_template=template)) as client:
        response = await client.post("/worker_get_conv_template")
    assert response.json() == {"conv": template}


async def test_model_details_and_count_token(start_worker: StartWorker) -> None:
    async with connect(start_worker(context_length=4096)) as client:
        details = await client.post("/model_details", json={"model": "x"})
        counts = [
            (await client.post("/count_token", json={"prompt": p})).json() for p in ["", "a b c"]
        ]
        missing = await client.post("/count_token", json={})
    assert details.json() == {"context_length": 4096}
    assert counts == [{"count": 1, "error_code": 0}, {"count": 4, "error_code": 0}]
    assert missing.status_code == 500


async def test_embeddings_are_deterministic_unit_vectors(client: httpx.AsyncClient) -> None:
    texts = ["hello world", "another text here"]
    response = await client.post("/worker_get_embeddings", json={"model": "x", "input": texts})
    reply = response.json()
    assert list(reply) == ["embedding", "token_num"]
    assert reply["token_num"] == 3 + 4
    assert reply["embedding"] == [MODEL.embed(t, 16) for t in texts]
    for vector in reply["embedding"]:
        assert len(vector) == 16
        assert abs(sum(v * v for v in vector) - 1) < 1e-5


async def test_embeddings_in_base64_are_little_endian_float32(client: httpx.AsyncClient) -> None:
    body = {"input": ["hello"], "encoding_format": "base64"}
    encoded = (await client.post("/worker_get_embeddings", json=body)).json()["embedding"][0]
    assert list(struct.unpack("<16f", base64.b64decode(encoded))) == MODEL.embed("hello", 16)


@pytest.mark.parametrize(
    "body", [{"input": []}, {"input": "bare"}, {}], ids=["empty", "str", "none"]
)
async def test_bad_embeddings_input_is_500_without_a_leak(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    response = await client.post("/worker_get_embeddings", json=body)
    assert response.status_code == 500
    assert await queue_length(client) == 0


async def test_a_single_model_worker_ignores_the_model_field(client: httpx.AsyncClient) -> None:
    frames = await frames_for(client, model="no-such-model", max_new_tokens=1)
    assert frames[-1]["finish_reason"] == "length"


async def test_routing_by_model_refuses_unknown_models(start_worker: StartWorker) -> None:
    url = start_worker(model_names=("a", "b"), route_by_model=True)
    async with connect(url) as client:
        good = await client.post("/worker_generate", json={"model": "b", "prompt": "x"})
        unknown = await client.post("/worker_generate", json={"model": "c", "prompt": "x"})
        missing = await client.post("/model_details", json={})
        details = await client.post("/model_details", json={"model": "a"})
        assert await queue_length(client) == 0
    assert good.status_code == details.status_code == 200
    assert unknown.status_code == missing.status_code == 500


# -- configuration -----------------------------------------------------------------------------


def test_cli_options_build_the_config(tmp_path: Path) -> None:
    template = {**vicuna_v1_1_template(), "name": "custom"}
    (tmp_path / "conv.json").write_text(json.dumps({"conv": template}))
    parser = argparse.ArgumentParser()
    add_reference_worker_arguments(parser)
    argv = ["--port", "9", "--model-names", "a,b", "--tokens-per-second", "12.5"]
    argv += ["--limit-worker-concurrency", "3", "--conv-template-file", str(tmp_path / "conv.json")]
    ns = parser.parse_args(argv)
    assert (ns.host, ns.port) == ("127.0.0.1", 9)
    config = config_from_args(ns)
    assert config == ReferenceWorkerConfig(
        model_names=("a", "b"),
        tokens_per_second=12.5,
        limit_worker_concurrency=3,
        conv_template=template,
    )
    assert config_from_args(parser.parse_args([])) == ReferenceWorkerConfig()


def test_a_scripted_answer_in_order(tmp_path: Path) -> None:
    """--script with --in-order: every reply is the script from its first word (the reasoning
    interop tests drive DB-GPT with think blocks this way)."""
    parser = argparse.ArgumentParser()
    add_reference_worker_arguments(parser)
    ns = parser.parse_args(
        ["--script", "<think> {a} </think> 42", "--in-order", "--eos-after", "4"]
    )
    model = config_from_args(ns).model
    for prompt in ("one prompt", "another"):
        assert model.decode(model.reply(prompt, 10)) == "<think> {a} </think> 42"


@pytest.mark.parametrize(
    "settings",
    [{"model_names": ()}, {"limit_worker_concurrency": 0}, {"stream_interval": 0},
     {"tokens_per_second": -1}, {"script": ("a", "a")}, {"script": ("two words",)}],
)  # fmt: skip
def test_invalid_config_is_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ReferenceWorkerConfig(**settings)
