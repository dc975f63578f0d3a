"""protocol/fastchat.py against the FastChat payloads captured in docs/protocol.md §1–§3."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from protocol.errors import InvalidReply
from protocol.fastchat import (
    Chunk,
    ChunkUsage,
    ConvTemplate,
    ConvTemplateReply,
    CountTokenReply,
    CountTokenRequest,
    EmbeddingsRequest,
    EmbeddingsResponse,
    ErrorCode,
    GenerationParams,
    GetWorkerAddress,
    ListModelsReply,
    ModelDetailsReply,
    WorkerAddressReply,
    WorkerStatus,
)
from tests.protocol.helpers import GOLDEN_FILES, golden_cases

# §1.3: the captured stream body for max_new_tokens 4, echo false (one object per line).
STREAM_1_3 = """\
{"text": "Program", "error_code": 0, "usage": {"prompt_tokens": 13, "completion_tokens": 0, "total_tokens": 13}, "finish_reason": null, "logprobs": null}
{"text": "Program sostric", "error_code": 0, "usage": {"prompt_tokens": 13, "completion_tokens": 2, "total_tokens": 15}, "finish_reason": null, "logprobs": null}
{"text": "Program sostricce", "error_code": 0, "usage": {"prompt_tokens": 13, "completion_tokens": 3, "total_tokens": 16}, "finish_reason": null, "logprobs": null}
{"text": "Program sostricce", "error_code": 0, "usage": {"prompt_tokens": 13, "completion_tokens": 3, "total_tokens": 16}, "finish_reason": "length", "logprobs": null}
"""  # noqa: E501
STREAM_CHUNKS: list[dict[str, Any]] = [json.loads(line) for line in STREAM_1_3.splitlines()]

# §1.5: the in-band error chunk.
ERROR_CHUNK = {
    "text": "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
    "\n\n(boom)",
    "error_code": 50001,
}

# §1.9: the captured Vicuna template (0.2.36).
VICUNA_REPLY = json.loads(
    '{"conv":{"name":"vicuna_v1.1","system_template":"{system_message}","system_message":"A chat '
    "between a curious user and an artificial intelligence assistant. The assistant gives "
    'helpful, detailed, and polite answers to the user\'s questions.","roles":["USER",'
    '"ASSISTANT"],"messages":[],"offset":0,"sep_style":2,"sep":" ","sep2":"</s>","stop_str":'
    'null,"stop_token_ids":null}}'
)

# §3.3: gen_params FastChat's own openai_api_server sent to the worker.
GEN_PARAMS_3_3 = json.loads(
    '{"model":"tiny-vicuna","prompt":"You are terse. USER: Hello! ASSISTANT:","temperature":0.0,'
    '"logprobs":null,"top_p":1.0,"top_k":-1,"presence_penalty":0.0,"frequency_penalty":0.0,'
    '"max_new_tokens":8,"echo":false,"stop_token_ids":null,"stop":[]}'
)


def without_nulls(obj: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in obj.items() if value is not None}


# --- ErrorCode ----------------------------------------------------------------------------


def test_error_code_table_is_complete() -> None:
    assert {code.name: int(code) for code in ErrorCode} == {
        "VALIDATION_TYPE_ERROR": 40001,
        "INVALID_AUTH_KEY": 40101,
        "INCORRECT_AUTH_KEY": 40102,
        "NO_PERMISSION": 40103,
        "INVALID_MODEL": 40301,
        "PARAM_OUT_OF_RANGE": 40302,
        "CONTEXT_OVERFLOW": 40303,
        "RATE_LIMIT": 42901,
        "QUOTA_EXCEEDED": 42902,
        "ENGINE_OVERLOADED": 42903,
        "INTERNAL_ERROR": 50001,
        "CUDA_OUT_OF_MEMORY": 50002,
        "GRADIO_REQUEST_ERROR": 50003,
        "GRADIO_STREAM_UNKNOWN_ERROR": 50004,
        "CONTROLLER_NO_WORKER": 50005,
        "CONTROLLER_WORKER_TIMEOUT": 50006,
    }


# --- generation parameters ----------------------------------------------------------------


def test_generation_params_round_trip_3_3_without_nulls() -> None:
    params = GenerationParams.from_wire(GEN_PARAMS_3_3)
    assert params.to_wire() == without_nulls(GEN_PARAMS_3_3)
    assert list(params.to_wire()) == [  # model first, nulls gone, empty stop list kept
        "model",
        "prompt",
        "temperature",
        "top_p",
        "top_k",
        "presence_penalty",
        "frequency_penalty",
        "max_new_tokens",
        "stop",
        "echo",
    ]


def test_generation_params_never_serialise_null_and_always_echo() -> None:
    wire = GenerationParams(model="m", prompt="p", max_new_tokens=4).to_wire()
    assert wire == {"model": "m", "prompt": "p", "max_new_tokens": 4, "echo": False}


@pytest.mark.parametrize(
    "bad",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": -1},
        {"max_new_tokens": 4.0},
        {"max_new_tokens": "4"},
        {"max_new_tokens": True},
        {"top_k": 1.5},
        {"echo": "false"},
        {"stop_token_ids": [2.0]},
        {"seed": 5},  # unknown keys are our bug, not something to send
    ],
)
def test_generation_params_refuse_what_crashes_a_worker(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        GenerationParams.model_validate({"model": "m", "prompt": "p", "max_new_tokens": 4, **bad})


def test_generation_params_require_prompt_and_model() -> None:
    with pytest.raises(ValidationError):
        GenerationParams.model_validate({"model": "m", "max_new_tokens": 4})
    with pytest.raises(ValidationError):
        GenerationParams.model_validate({"prompt": "p", "max_new_tokens": 4})


# --- stream chunks ------------------------------------------------------------------------


def test_chunks_of_the_captured_stream_parse() -> None:
    chunks = [Chunk.from_wire(raw) for raw in STREAM_CHUNKS]
    assert [c.text for c in chunks] == [
        "Program",
        "Program sostric",
        "Program sostricce",
        "Program sostricce",
    ]
    assert [c.finish_reason for c in chunks] == [None, None, None, "length"]
    assert chunks[-1].usage == ChunkUsage(prompt_tokens=13, completion_tokens=3, total_tokens=16)
    assert all(c.error_code == 0 for c in chunks)


def test_error_chunk_parses_without_usage_or_finish_reason() -> None:
    chunk = Chunk.from_wire(ERROR_CHUNK)
    assert (chunk.error_code, chunk.usage, chunk.finish_reason) == (50001, None, None)
    assert chunk.text.endswith("(boom)")


@pytest.mark.parametrize(
    ("raw", "finish"),
    [
        ({"text": "x", "error_code": 0, "finish_reason": "abort"}, "abort"),  # vLLM, LightLLM
        ({"text": "x", "error_code": 0, "finish_reason": ["stop", None]}, ["stop", None]),  # n>1
        ({"text": "x", "error_code": 0, "cumulative_logprob": [-1.5]}, None),  # vLLM extras
        ({"text": "x", "error_code": 0, "cumulative_logprob": -1.5, "usage": {}}, None),  # MLX
        ({"text": "x"}, None),  # no error_code at all: tolerated as 0
    ],
)
def test_chunks_of_other_worker_types_parse(raw: dict[str, Any], finish: object) -> None:
    assert Chunk.from_wire(raw).finish_reason == finish


@pytest.mark.parametrize(
    "raw", [{}, {"text": None}, {"text": 3}, {"text": "x", "error_code": "bad"}, [1]]
)
def test_malformed_chunks_raise_invalid_reply(raw: Any) -> None:
    with pytest.raises(InvalidReply):
        Chunk.from_wire(raw)


# --- status, template, small replies ------------------------------------------------------


def test_worker_status_round_trip() -> None:
    raw = {"model_names": ["tiny-vicuna"], "speed": 1, "queue_length": 3}
    status = WorkerStatus.from_wire(raw)
    assert status.model_dump() == raw
    assert isinstance(status.model_dump()["speed"], int)


def test_conv_template_from_the_captured_reply() -> None:
    template = ConvTemplateReply.from_wire(VICUNA_REPLY).conv
    assert template.raw() == VICUNA_REPLY["conv"]
    assert list(template.raw()) == list(VICUNA_REPLY["conv"])  # order preserved
    assert (template.sep_style, template.sep, template.sep2) == (2, " ", "</s>")
    assert template.stop_strings == []
    assert not template.has_main_fields


def test_conv_template_raw_is_a_copy() -> None:
    template = ConvTemplate.from_wire(VICUNA_REPLY["conv"])
    template.raw()["roles"].append("X")
    assert template.raw()["roles"] == ["USER", "ASSISTANT"]


def test_conv_template_raw_view_is_the_parsed_object_read_only() -> None:
    template = ConvTemplate.from_wire(VICUNA_REPLY["conv"])
    view = template.raw_view()
    assert view == VICUNA_REPLY["conv"]
    with pytest.raises(TypeError):
        view["roles"] = []  # type: ignore[index]


def test_conv_template_tolerates_main_fields_and_unknown_keys() -> None:
    conv = {
        **VICUNA_REPLY["conv"],
        "system_message_vision": "",
        "max_image_size_mb": None,
        "future_key": 1,
    }
    template = ConvTemplate.from_wire(conv)
    assert template.has_main_fields
    assert template.raw() == conv  # the raw dict keeps everything, unknown keys included


@pytest.mark.parametrize("version", list(GOLDEN_FILES))
def test_every_golden_template_parses(version: str) -> None:
    for name, cases in golden_cases(version).items():
        template = ConvTemplate.from_wire(cases[0].conv)
        assert template.name == name
        assert template.raw() == cases[0].conv
        assert template.has_main_fields is (version == "main")
        stop = cases[0].conv["stop_str"]
        assert template.stop_strings == ([] if stop is None else [stop] if isinstance(stop, str)
                                         else stop)  # fmt: skip


def test_conv_template_with_a_null_style_parses_for_the_renderer_to_report() -> None:
    assert ConvTemplate.from_wire({**VICUNA_REPLY["conv"], "sep_style": None}).sep_style is None


def test_embeddings_request_and_replies() -> None:
    request = EmbeddingsRequest(model="m", input=["a", "b"])
    assert request.to_wire() == {"model": "m", "input": ["a", "b"]}  # encoding_format omitted
    with pytest.raises(ValidationError):
        EmbeddingsRequest(model="m", input=[])  # 500 and a leaked slot on the worker
    ok = EmbeddingsResponse.from_wire({"embedding": [[0.5, -0.25]], "token_num": 3})
    assert (ok.embedding, ok.token_num, ok.error_code) == ([[0.5, -0.25]], 3, 0)
    b64 = EmbeddingsResponse.from_wire({"embedding": ["AAAAPw=="], "token_num": 1})
    assert b64.embedding == ["AAAAPw=="]
    error = EmbeddingsResponse.from_wire({"text": "boom", "error_code": 50001})
    assert (error.embedding, error.text, error.error_code) == (None, "boom", 50001)


def test_count_token_and_model_details() -> None:
    assert CountTokenRequest(model="m", prompt="").to_wire() == {"model": "m", "prompt": ""}
    assert CountTokenReply.from_wire({"count": 13, "error_code": 0}).count == 13
    assert ModelDetailsReply.from_wire({"context_length": 2048}).context_length == 2048
    with pytest.raises(InvalidReply, match="context_length"):
        ModelDetailsReply.from_wire({"context_length": 0})


# --- controller (§1.10, §2) ---------------------------------------------------------------


def test_controller_replies() -> None:
    assert ListModelsReply.from_wire({"models": ["b", "a"]}).models == ["b", "a"]
    assert GetWorkerAddress(model="a").to_wire() == {"model": "a"}
    assert WorkerAddressReply.from_wire({"address": ""}).address == ""
    with pytest.raises(InvalidReply, match="models"):
        ListModelsReply.from_wire({})
    with pytest.raises(InvalidReply, match="valid dictionary"):
        ListModelsReply.from_wire(None)
