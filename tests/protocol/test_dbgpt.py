"""protocol/dbgpt.py against the DB-GPT payloads captured in docs/protocol.md §5–§9."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol.dbgpt
from protocol.dbgpt import (
    CountTokenRequest,
    EmbeddingsRequest,
    ExtMetadata,
    FrameEncoder,
    GrowingTextEscaper,
    ModelInstance,
    ModelMetadata,
    ModelMetadataRequest,
    ModelOutput,
    PromptRequest,
    SupportedModel,
    Usage,
    WorkerApplyOutput,
    WorkerApplyRequest,
    WorkerSupportedModel,
    WorkerType,
    parse_worker_key,
    worker_key,
)
from protocol.errors import InvalidMessage, InvalidReply, InvalidRequest
from protocol.framing import encode_frame
from tests.protocol.helpers import wire_text

# §5.5: what DB-GPT's own registry client sends to register and to heartbeat.
INSTANCE_5_5 = json.loads(
    '{"model_name":"cap@llm","host":"127.0.0.1","port":25033,"weight":1.0,"check_healthy":true,'
    '"healthy":false,"enabled":true,"prompt_template":null,"last_heartbeat":null,'
    '"remove_from_registry":false}'
)

# §8.2: the worker body DB-GPT's apiserver sends for a chat.
CHAT_8_2 = json.loads("""
{"model":"stub",
 "messages":[{"role":"system","content":"You are terse.","round_index":0},
             {"role":"human","content":"Hi","round_index":0},
             {"role":"ai","content":"Hello.","round_index":0},
             {"role":"human","content":"Say hello world","round_index":0}],
 "echo":false,"temperature":0.7,"top_p":0.9,"max_new_tokens":32,"stop":["\\n\\n","###"],"user":"u1",
 "span_id":"77023fa1d96b0b4ff8a128354cd4c8eb:06ac6ffc49e6ab54"}
""")

# §8.3: completions, with explicit nulls.
COMPLETION_8_3 = json.loads(
    '{"model":"stub","prompt":"Once upon","chat_model":false,"temperature":0.8,'
    '"max_new_tokens":16,"stop":null,"top_p":1.0,"top_k":-1,"echo":false,'
    '"presence_penalty":0.0,"frequency_penalty":0.0,"user":null,"span_id":"abc:def"}'
)
EMBEDDINGS_8_3 = {"input": ["a", "b"], "model": "m", "span_id": "abc:def"}
RELEVANCE_8_3 = {
    "input": ["doc1", "doc2"],
    "model": "m",
    "query": "q",
    "worker_type": "reranker",
    "span_id": "abc:def",
}

# §7.3: the ModelOutput form we emit.
OUTPUT_7_3 = json.loads(
    '{"text": "<cumulative>", "error_code": 0, "incremental": false, "model_context": null,'
    ' "finish_reason": null, "usage": {"prompt_tokens": 13, "completion_tokens": 3,'
    ' "total_tokens": 16}, "metrics": null}'
)


# --- controller: instances and keys -------------------------------------------------------


def test_model_instance_round_trip_5_5_exact_keys_in_order() -> None:
    wire = ModelInstance.from_wire(INSTANCE_5_5).to_wire()
    assert wire == INSTANCE_5_5
    assert list(wire) == list(INSTANCE_5_5)
    assert json.dumps(wire) == json.dumps(INSTANCE_5_5)  # 1.0 stays a float, nulls stay


def test_model_instance_defaults_give_the_registry_client_body() -> None:
    built = ModelInstance(model_name="cap@llm", host="127.0.0.1", port=25033)
    assert built.to_wire() == INSTANCE_5_5


def test_model_instance_listing_drops_unknown_keys() -> None:
    listed = {
        **INSTANCE_5_5,
        "healthy": True,
        "last_heartbeat": "2026-11-21T22:15:59.304056",
        "queue_length": 3,
        "foo": "bar",
    }
    wire = ModelInstance.from_wire(listed).to_wire()
    assert set(wire) == set(INSTANCE_5_5)
    assert wire["last_heartbeat"] == "2026-11-21T22:15:59.304056"


def test_model_instance_delete_params() -> None:
    instance = ModelInstance.from_wire(INSTANCE_5_5)
    assert instance.delete_params() == {
        "model_name": "cap@llm",
        "host": "127.0.0.1",
        "port": "25033",
        "remove_from_registry": "true",
    }
    assert instance.delete_params(remove_from_registry=False)["remove_from_registry"] == "false"


def test_model_instance_needs_host_and_port() -> None:
    with pytest.raises(InvalidReply, match="port"):
        ModelInstance.from_wire({"model_name": "x@llm", "host": "h"})


def test_worker_keys() -> None:
    assert worker_key("vicuna", WorkerType.LLM) == "vicuna@llm"
    assert worker_key("m", WorkerType.TEXT2VEC) == "m@text2vec"
    assert parse_worker_key("m@reranker") == ("m", WorkerType.RERANKER)
    assert parse_worker_key(" cap@llm ") == ("cap", WorkerType.LLM)


@pytest.mark.parametrize("name", ["a@b", "", "  "])
def test_worker_key_rejects_bad_names(name: str) -> None:
    with pytest.raises(InvalidMessage):
        worker_key(name, WorkerType.LLM)


@pytest.mark.parametrize("key", ["cap", "cap@", "@llm", "cap@gpu", "a@b@llm", "WorkerManager"])
def test_parse_worker_key_rejects_malformed_keys(key: str) -> None:
    with pytest.raises(InvalidMessage):
        parse_worker_key(key)


def test_service_entry_key_parses_as_bad_type() -> None:
    with pytest.raises(InvalidMessage):  # WorkerManager@service is not a model
        parse_worker_key("WorkerManager@service")


# --- prompt requests ----------------------------------------------------------------------


def test_prompt_request_from_the_apiserver_chat_8_2() -> None:
    request = PromptRequest.from_wire(CHAT_8_2)
    assert [m.role for m in request.messages] == ["system", "human", "ai", "human"]
    assert request.messages[3].content == "Say hello world"
    assert (request.temperature, request.top_p, request.max_new_tokens) == (0.7, 0.9, 32)
    assert request.stop == ["\n\n", "###"]
    assert (request.echo, request.user, request.prompt) == (False, "u1", None)
    assert not request.is_completion


def test_prompt_request_from_the_apiserver_completion_8_3_with_nulls() -> None:
    request = PromptRequest.from_wire(COMPLETION_8_3)
    assert (request.prompt, request.chat_model, request.stop, request.user) == (
        "Once upon",
        False,
        None,
        None,
    )
    assert (request.top_k, request.presence_penalty, request.echo) == (-1, 0.0, False)
    assert request.is_completion


def test_prompt_request_defaults_and_unknown_keys() -> None:
    request = PromptRequest.from_wire(
        {"model": "m", "prompt": "x", "seed": 5, "n": 2, "stop_token_ids": None, "echo": None}
    )
    assert request.echo is True  # DB-GPT's default
    assert request.stop_token_ids == []
    assert (request.version, request.chat_model, request.metrics) == ("v2", True, False)
    assert request.is_completion  # prompt and no messages


def test_prompt_request_with_media_content() -> None:
    body = {
        "model": "m",
        "messages": [
            {
                "role": "human",
                "content": [
                    {"type": "text", "object": {"data": "Look", "format": "text"}},
                    {"type": "image", "object": {"data": "http://x/a.png", "format": "url"}},
                ],
            },
            {"role": "ai", "content": {"type": "text", "object": {"data": "A cat"}}},
            {"role": "view", "content": "ui only"},
        ],
        "context_len": 4096,
        "context": {"k": 1},
    }
    request = PromptRequest.from_wire(body)
    first = request.messages[0].content
    assert isinstance(first, list)
    assert [part.type for part in first] == ["text", "image"]
    second = request.messages[1].content
    assert isinstance(second, list)  # a single part object becomes a one-part list
    assert second[0].object.data == "A cat"
    assert request.messages[2].role == "view"


def test_chat_model_false_with_messages_and_prompt_is_a_completion() -> None:
    body = {"model": "m", "prompt": "raw", "chat_model": False, "messages": CHAT_8_2["messages"]}
    assert PromptRequest.from_wire(body).is_completion
    assert not PromptRequest.from_wire({**body, "chat_model": True}).is_completion


@pytest.mark.parametrize(
    ("patch", "field", "code"),
    [
        ({"messages": [], "prompt": None}, "messages", 40001),
        ({"messages": None}, "messages", 40001),
        ({"max_new_tokens": 0}, "max_new_tokens", 40302),
        ({"max_new_tokens": -5}, "max_new_tokens", 40302),
        ({"max_new_tokens": 8.0}, "max_new_tokens", 40001),
        ({"max_new_tokens": "8"}, "max_new_tokens", 40001),
        ({"max_new_tokens": True}, "max_new_tokens", 40001),
        ({"top_k": 1.5}, "top_k", 40001),
        ({"stop_token_ids": [2, "3"]}, "stop_token_ids.1", 40001),
        ({"stop": ""}, "stop", 40001),
        ({"stop": ["###", ""]}, "stop", 40001),
        ({"stop": 5}, "stop", 40001),
        ({"echo": "yes"}, "echo", 40001),
        ({"temperature": "hot"}, "temperature", 40001),
        ({"model": None}, "model", 40001),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", 40001),
        ({"messages": [{"role": "human", "content": 5}]}, "messages.0.content", 40001),
        ({"messages": "Hi"}, "messages", 40001),
    ],
)
def test_prompt_request_rejects_what_would_leak_a_slot(
    patch: dict[str, Any], field: str, code: int
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        PromptRequest.from_wire({**CHAT_8_2, **patch, "prompt": patch.get("prompt")})
    assert caught.value.field.startswith(field)
    assert caught.value.error_code == code
    assert str(caught.value).startswith(field)


def test_prompt_request_rejects_non_objects() -> None:
    with pytest.raises(InvalidRequest):
        PromptRequest.from_wire([CHAT_8_2])


# --- other requests -----------------------------------------------------------------------


def test_embeddings_requests_8_3() -> None:
    plain = EmbeddingsRequest.from_wire(EMBEDDINGS_8_3)
    assert (plain.input, plain.worker_type, plain.is_rerank) == (
        ["a", "b"],
        WorkerType.TEXT2VEC,
        False,
    )
    rerank = EmbeddingsRequest.from_wire(RELEVANCE_8_3)
    assert (rerank.query, rerank.worker_type, rerank.is_rerank) == ("q", WorkerType.RERANKER, True)
    assert EmbeddingsRequest.from_wire({**EMBEDDINGS_8_3, "query": "q"}).is_rerank


@pytest.mark.parametrize("bad_input", [[], "a", None, [[1, 2]], [1]])
def test_embeddings_request_needs_a_non_empty_list_of_strings(bad_input: Any) -> None:
    with pytest.raises(InvalidRequest, match="input"):
        EmbeddingsRequest.from_wire({**EMBEDDINGS_8_3, "input": bad_input})


def test_count_token_request_model_is_optional() -> None:
    assert CountTokenRequest.from_wire({"prompt": "hi"}).model is None  # DB-GPT's own client
    assert CountTokenRequest.from_wire({"prompt": "hi", "model": "m"}).model == "m"
    with pytest.raises(InvalidRequest, match="prompt"):
        CountTokenRequest.from_wire({"model": "m"})


def test_model_metadata_request() -> None:
    assert ModelMetadataRequest.from_wire({"model": "m", "extra": 1}).model == "m"


def test_worker_apply_request_8_8() -> None:
    body: dict[str, Any] = {
        "model": "stub",
        "apply_type": "restart",
        "worker_type": "llm",
        "params": {},
        "apply_user": None,
    }
    request = WorkerApplyRequest.from_wire(body)
    assert request.model_dump() == body


# --- replies ------------------------------------------------------------------------------


def test_model_output_round_trip_7_3_without_incremental() -> None:
    # §7.3 notes that dropping `incremental` extends the readable range down to 0.4.2.
    wire = ModelOutput.from_wire(OUTPUT_7_3).to_wire()
    assert wire == {key: value for key, value in OUTPUT_7_3.items() if key != "incremental"}
    assert list(wire) == [
        "text",
        "error_code",
        "model_context",
        "finish_reason",
        "usage",
        "metrics",
    ]


def test_model_output_never_carries_content_or_fastchat_extras() -> None:
    raw = {**OUTPUT_7_3, "logprobs": None, "cumulative_logprob": [1.0], "content": "x"}
    wire = ModelOutput.from_wire(raw).to_wire()
    assert "content" not in wire and "logprobs" not in wire and "cumulative_logprob" not in wire
    assert "incremental" not in wire


def test_model_output_refuses_other_finish_reasons() -> None:
    with pytest.raises(InvalidReply, match="finish_reason"):
        ModelOutput.from_wire({**OUTPUT_7_3, "finish_reason": "abort"})


def test_model_metadata_exact_key_set() -> None:
    metadata = ModelMetadata(model="m", context_length=2048)
    assert metadata.to_wire() == {
        "model": "m",
        "context_length": 2048,
        "chat_model": True,
        "metadata": {},
        "ext_metadata": {
            "prompt_roles": ["system", "human", "ai"],
            "prompt_sep": "\n",
            "prompt_chat_template": None,
        },
    }
    again = ModelMetadata.from_wire({**metadata.to_wire(), "label": "x", "function_calling": 0})
    assert again.to_wire() == metadata.to_wire()  # 0.7+ keys are read, never written
    assert ExtMetadata().to_wire() == metadata.to_wire()["ext_metadata"]


def test_supported_models_legacy_keys_9_1() -> None:
    listing: list[dict[str, Any]] = [
        {
            "host": "127.0.0.1",
            "port": 8100,
            "models": [
                {
                    "model": "vicuna",
                    "path": None,
                    "worker_type": "llm",
                    "path_exist": False,
                    "proxy": False,
                    "enabled": True,
                    "params": [],
                }
            ],
        }
    ]
    parsed = [WorkerSupportedModel.from_wire(item) for item in listing]
    assert [item.to_wire() for item in parsed] == listing
    built = WorkerSupportedModel(
        host="127.0.0.1", port=8100, models=[SupportedModel(model="vicuna")]
    )
    assert [built.to_wire()] == listing
    with_07_keys = {**listing[0]["models"][0], "provider": "hf", "description": "d"}
    assert SupportedModel.from_wire(with_07_keys).to_wire() == listing[0]["models"][0]


def test_worker_apply_output() -> None:
    reply = WorkerApplyOutput(message="not supported", success=False, timecost=0)
    assert reply.to_wire() == {"message": "not supported", "success": False, "timecost": 0}
    assert WorkerApplyOutput.from_wire(reply.to_wire()) == reply


def test_usage_exact_keys() -> None:
    usage = Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    assert usage.to_wire() == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


# --- ModelOutput.to_frame: the relay's per-frame encoding (issue 14) ----------------------

COUNTS = st.integers(min_value=-(2**70), max_value=2**70)
USAGES = st.none() | st.builds(
    Usage, prompt_tokens=COUNTS, completion_tokens=COUNTS, total_tokens=COUNTS
)
EXTRAS = st.dictionaries(
    st.text(max_size=4), st.integers() | st.booleans() | wire_text(), max_size=3
)


def outputs(*, common: bool) -> st.SearchStrategy[ModelOutput]:
    """ModelOutputs of every shape, or (``common``) of the shape relayed frames have: no
    model_context or metrics, and text with a UTF-8 form."""
    text = wire_text().filter(_has_utf8) if common else wire_text()
    return st.builds(
        ModelOutput,
        text=text,
        error_code=st.sampled_from([0, 0, 1, 50001, -1, 2**70]),
        model_context=st.none() if common else st.none() | EXTRAS,
        finish_reason=st.sampled_from([None, "stop", "length"]),
        usage=USAGES,
        metrics=st.none() if common else st.none() | EXTRAS,
        thinking=st.none() | text,
    )


def _has_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=400)
@given(outputs(common=False))
def test_to_frame_is_the_generic_encoding_byte_for_byte(output: ModelOutput) -> None:
    assert output.to_frame() == encode_frame(output.to_wire())


@settings(max_examples=200)
@given(outputs(common=True))
def test_to_frame_writes_common_frames_itself(output: ModelOutput) -> None:
    expected = encode_frame(output.to_wire())

    def generic(obj: dict[str, Any]) -> bytes:
        raise AssertionError(f"a common frame took the generic path: {obj}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protocol.dbgpt, "encode_frame", generic)
        assert output.to_frame() == expected


@pytest.mark.parametrize("text", ["\ud83d", "a\udc00b", "é\ud800"])
@pytest.mark.parametrize("thinking", [None, "ok", "\udfff"])
def test_to_frame_of_lone_surrogates_falls_back_to_ascii_escapes(
    text: str, thinking: str | None
) -> None:
    output = ModelOutput(text=text, error_code=0, thinking=thinking)
    frame = output.to_frame()
    assert frame == encode_frame(output.to_wire())
    assert frame.isascii() and b"\\ud" in frame.lower()


# --- FrameEncoder: a stream's frames, its growing texts escaped by their new part only -------


@settings(max_examples=300)
@given(
    st.lists(st.tuples(wire_text(), wire_text(), st.booleans()), max_size=8),
    st.sampled_from([None, "stop", "length"]),
)
def test_a_streams_frames_are_each_the_generic_encoding(
    steps: list[tuple[str, str, bool]], finish: str | None
) -> None:
    # Texts that grow as streams do (each a continuation of the last), now and then one that
    # does not (a rewritten character, an unrelated text), thinking beside them or not.
    encoder = FrameEncoder()
    text = thinking = ""
    for added, added_thinking, restart in steps:
        text = added if restart else text + added
        thinking = thinking + added_thinking
        output = ModelOutput(
            text=text,
            error_code=0,
            finish_reason=finish,
            thinking=thinking if added_thinking else None,
        )
        assert encoder.encode(output) == encode_frame(output.to_wire())


def test_a_growing_text_is_escaped_by_its_new_part_only(monkeypatch: pytest.MonkeyPatch) -> None:
    escaped: list[str] = []
    real = protocol.dbgpt.encode_basestring

    def recorded(text: str) -> str:
        escaped.append(text)
        return real(text)

    monkeypatch.setattr(protocol.dbgpt, "encode_basestring", recorded)
    escaper = GrowingTextEscaper()
    assert escaper('say "hi"') == real('say "hi"')
    assert escaper('say "hi"\n\u00e9') == real('say "hi"\n\u00e9')
    assert escaper("other") == real("other")
    assert escaped == ['say "hi"', "\n\u00e9", "other"]
