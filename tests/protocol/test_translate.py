"""protocol/translate.py with real templates (tests/protocol/golden/) and the captured payloads."""

from __future__ import annotations

import base64
import contextlib
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol.translate
from protocol.dbgpt import EmbeddingsRequest, FrameEncoder, ModelMessage, PromptRequest
from protocol.errors import (
    ContextOverflow,
    InvalidReply,
    InvalidRequest,
    ProtocolError,
    WorkerError,
)
from protocol.fastchat import Chunk, ConvTemplate, ErrorCode
from protocol.framing import FrameDecoder, encode_frame
from protocol.reasoning import ReasoningRule
from protocol.translate import (
    StreamTranslator,
    build_prompt,
    conversation_turns,
    count_from_reply,
    embeddings_from_reply,
    embeddings_request,
    error_output,
    model_metadata,
    normalize_finish_reason,
    plan_generation,
    request_images,
    translate_reply,
)
from protocol.translate import _plain_fields as _plain_fields
from tests.protocol.helpers import GOLDEN_FILES, GoldenCase, golden_cases, wire_text
from tests.protocol.test_dbgpt import CHAT_8_2, COMPLETION_8_3
from tests.protocol.test_fastchat import ERROR_CHUNK, STREAM_CHUNKS


def template(name: str, version: str = "0.2.36") -> ConvTemplate:
    return ConvTemplate.from_wire(golden_cases(version)[name][0].conv)


def chat(*messages: tuple[str, Any], **extra: Any) -> PromptRequest:
    body = [{"role": role, "content": content} for role, content in messages]
    return PromptRequest.from_wire({"model": "m", "messages": body, "echo": False, **extra})


def text_part(data: Any, kind: str = "text") -> dict[str, Any]:
    return {"type": kind, "object": {"data": data, "format": "text"}}


VICUNA_SYSTEM = template("vicuna_v1.1").system_message


# --- messages → turns ---------------------------------------------------------------------


def test_turns_by_position_with_open_assistant_turn() -> None:
    turns, system = conversation_turns(
        chat(("human", "U1"), ("ai", "A1"), ("human", "U2")).messages
    )
    assert turns == [(0, "U1"), (1, "A1"), (0, "U2"), (1, None)]
    assert system is None


def test_last_system_message_wins_and_view_is_dropped() -> None:
    request = chat(("system", "S1"), ("human", "U1"), ("view", "V"), ("system", "S2"))
    assert conversation_turns(request.messages) == ([(0, "U1"), (1, None)], "S2")


def test_consecutive_human_messages_are_merged() -> None:
    request = chat(("human", "part one"), ("human", "part two"), ("ai", "A"), ("ai", "B"))
    turns, _ = conversation_turns(request.messages)
    assert turns == [(0, "part one\npart two"), (1, "A"), (1, "B"), (1, None)]


def test_media_content_keeps_only_text_parts() -> None:
    content = [
        text_part("Look"),
        text_part("http://x/cat.png", "image"),
        text_part("I reasoned", "thinking"),
        text_part("closely"),
    ]
    turns, _ = conversation_turns(
        chat(("human", content), ("ai", [text_part("", "image")])).messages
    )
    assert turns == [(0, "Look\nclosely"), (1, ""), (1, None)]


def test_text_part_with_non_string_data_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="messages"):
        conversation_turns(chat(("human", [text_part({"x": 1})])).messages)


def test_empty_messages_render_like_fastchat() -> None:
    turns, system = conversation_turns([ModelMessage(role="human", content="")])
    assert (turns, system) == ([(0, ""), (1, None)], None)
    assert conversation_turns([]) == ([(1, None)], None)


# --- prompts with real templates ----------------------------------------------------------


@pytest.mark.parametrize("version", ["0.2.36", "main"])
def test_rendering_leaves_every_template_as_it_was_parsed(version: str) -> None:
    # build_prompt reads the template's own parsed object (raw_view, no copy): a render that
    # changed it would change every later request's prompt.
    request = chat(("system", "S"), ("human", "Q1"), ("ai", "A1"), ("human", "Q2"))
    for name, cases in golden_cases(version).items():
        parsed = ConvTemplate.from_wire(cases[0].conv)
        before = parsed.raw()
        with contextlib.suppress(ProtocolError):
            build_prompt(request, parsed, numbering=version, with_images=True)
        assert parsed.raw() == before, name


def test_vicuna_reference_rendering_4_4() -> None:
    request = chat(("system", "SYS"), ("human", "U1"), ("ai", "A1"), ("human", "U2"))
    assert build_prompt(request, template("vicuna_v1.1")) == (
        "SYS USER: U1 ASSISTANT: A1</s>USER: U2 ASSISTANT:"
    )


def test_vicuna_without_system_message_keeps_the_templates_4_4() -> None:
    request = chat(("human", "Hi"), ("ai", "Hello there."), ("human", "How are you?"))
    assert build_prompt(request, template("vicuna_v1.1")) == (
        f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello there.</s>USER: How are you? ASSISTANT:"
    )


def test_apiserver_split_parts_do_not_shift_sep2() -> None:
    # One OpenAI message with two text parts arrives as two human messages (§8.2).
    request = chat(("human", "Hi"), ("ai", "Hello"), ("human", "part 1"), ("human", "part 2"))
    assert build_prompt(request, template("vicuna_v1.1")) == (
        f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello</s>USER: part 1\npart 2 ASSISTANT:"
    )


def test_chat_body_8_2_with_qwen_template() -> None:
    request = PromptRequest.from_wire(CHAT_8_2)
    assert build_prompt(request, template("qwen-7b-chat", "main"), numbering="main") == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nSay hello world<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def _as_request(case: GoldenCase) -> PromptRequest:
    messages: list[dict[str, Any]] = []
    if case.system_message is not None:
        messages.append({"role": "system", "content": case.system_message})
    for role, content in case.turns[:-1]:  # the open turn is ours to add
        messages.append({"role": ("human", "ai")[role], "content": content})
    return PromptRequest.from_wire({"model": "m", "messages": messages, "echo": False})


@pytest.mark.parametrize("version", list(GOLDEN_FILES))
def test_every_golden_conversation_through_dbgpt_messages(version: str) -> None:
    checked = 0
    for cases in golden_cases(version).values():
        conv = ConvTemplate.from_wire(cases[0].conv)
        for case in cases:
            if not case.turns[:-1] and case.system_message is None:
                continue  # no message at all is a refused request, not a prompt
            assert case.turns[-1] == (1, None)
            assert build_prompt(_as_request(case), conv, numbering=version) == case.prompt, case
            checked += 1
    assert checked > 1500


def test_completion_prompt_is_verbatim_even_with_messages_when_not_chat_model() -> None:
    request = PromptRequest.from_wire(COMPLETION_8_3)
    assert build_prompt(request, template("vicuna_v1.1")) == "Once upon"
    mixed = PromptRequest.from_wire({**CHAT_8_2, "prompt": "raw {x}", "chat_model": False})
    assert build_prompt(mixed, template("vicuna_v1.1")) == "raw {x}"


def test_unrenderable_template_is_a_protocol_error() -> None:
    broken = ConvTemplate.from_wire({**template("vicuna_v1.1").raw(), "sep_style": 99})
    with pytest.raises(ValueError) as caught:  # UnknownSeparatorStyle
        build_prompt(chat(("human", "x")), broken)
    assert "99" in str(caught.value)
    bad_system = ConvTemplate.from_wire({**template("vicuna_v1.1").raw(), "system_template": "{"})
    with pytest.raises(InvalidReply, match="conv"):
        build_prompt(chat(("human", "x")), bad_system)


# --- generation parameters ----------------------------------------------------------------


def plan(request: PromptRequest, conv: ConvTemplate | None = None, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": "tiny-vicuna",
        "prompt": "P",
        "template": conv or template("vicuna_v1.1"),
        "context_length": 2048,
        "prompt_tokens": 13,
        "default_temperature": 0.0,
        **kw,
    }
    return plan_generation(request, **args).params.to_wire()


def test_chat_8_2_gives_fastchat_params() -> None:
    assert plan(PromptRequest.from_wire(CHAT_8_2)) == {
        "model": "tiny-vicuna",
        "prompt": "P",
        "temperature": 0.7,
        "top_p": 0.9,
        "max_new_tokens": 32,
        "stop": ["\n\n", "###"],
        "echo": False,
    }


def test_completion_8_3_gives_fastchat_params() -> None:
    assert plan(PromptRequest.from_wire(COMPLETION_8_3), prompt="Once upon") == {
        "model": "tiny-vicuna",
        "prompt": "Once upon",
        "temperature": 0.8,
        "top_p": 1.0,
        "top_k": -1,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_new_tokens": 16,
        "echo": False,
    }


def test_absent_values_are_omitted_and_temperature_defaults() -> None:
    wire = plan(chat(("human", "x")), default_temperature=0.25)
    assert wire == {
        "model": "tiny-vicuna",
        "prompt": "P",
        "temperature": 0.25,
        "max_new_tokens": 2048 - 13 - 1,
        "echo": False,
    }


def test_stop_union_is_ordered_and_deduplicated() -> None:
    one_shot = template("one_shot")  # stop_str "###"
    assert plan(chat(("human", "x"), stop=["b", "###", "a", "b"]), one_shot)["stop"] == [
        "b",
        "###",
        "a",
    ]
    assert plan(chat(("human", "x"), stop="zzz"), one_shot)["stop"] == ["zzz", "###"]
    assert plan(chat(("human", "x")), one_shot)["stop"] == ["###"]
    list_stop = ConvTemplate.from_wire({**one_shot.raw(), "stop_str": ["<a>", "", "<b>"]})
    assert plan(chat(("human", "x"), stop="<b>"), list_stop)["stop"] == ["<b>", "<a>"]


def test_stop_token_ids_request_else_template() -> None:
    qwen = template("qwen-7b-chat")
    assert qwen.stop_token_ids
    assert plan(chat(("human", "x")), qwen)["stop_token_ids"] == qwen.stop_token_ids
    assert plan(chat(("human", "x"), stop_token_ids=[7]), qwen)["stop_token_ids"] == [7]
    assert "stop_token_ids" not in plan(chat(("human", "x"), stop_token_ids=[]))


@pytest.mark.parametrize(
    ("requested", "prompt_tokens", "expected"),
    [(None, 13, 2034), (100, 13, 100), (5000, 13, 2034), (100, 2046, 1), (None, 2046, 1)],
)
def test_max_new_tokens_clamped_with_one_token_of_slack(
    requested: int | None, prompt_tokens: int, expected: int
) -> None:
    request = chat(("human", "x"), max_new_tokens=requested)
    assert plan(request, prompt_tokens=prompt_tokens)["max_new_tokens"] == expected


@pytest.mark.parametrize("prompt_tokens", [2047, 2048, 6372])
def test_context_overflow_uses_fastchats_wording(prompt_tokens: int) -> None:
    with pytest.raises(ContextOverflow) as caught:
        plan(chat(("human", "x")), prompt_tokens=prompt_tokens)
    assert caught.value.error_code == 40303 == int(ErrorCode.CONTEXT_OVERFLOW)
    assert str(caught.value) == (
        f"This model's maximum context length is 2048 tokens. However, your messages resulted "
        f"in {prompt_tokens} tokens. Please reduce the length of the messages."
    )


def test_echo_only_on_the_completion_path() -> None:
    completion = PromptRequest.from_wire({**COMPLETION_8_3, "echo": True})
    result = plan_generation(
        completion,
        model="m",
        prompt="Once upon",
        template=template("vicuna_v1.1"),
        context_length=2048,
        prompt_tokens=3,
        default_temperature=0.0,
    )
    assert result.params.echo is False and result.echo_prompt == "Once upon"
    chat_with_echo = chat(("human", "x"), echo=True)
    assert (
        plan_generation(
            chat_with_echo,
            model="m",
            prompt="P",
            template=template("vicuna_v1.1"),
            context_length=2048,
            prompt_tokens=3,
            default_temperature=0.0,
        ).echo_prompt
        is None
    )


# --- output stream ------------------------------------------------------------------------


def test_captured_stream_translates_without_a_duplicate_finish() -> None:
    translator = StreamTranslator()
    outputs = [translator.translate(chunk) for chunk in STREAM_CHUNKS]
    wires = [o.to_wire() for o in outputs if o is not None]
    assert [w["text"] for w in wires] == [c["text"] for c in STREAM_CHUNKS]
    assert [w["finish_reason"] for w in wires] == [None, None, None, "length"]
    assert wires[2]["usage"] == {"prompt_tokens": 13, "completion_tokens": 3, "total_tokens": 16}
    assert wires[3]["usage"] is None  # finish-only chunk: usage dropped (§9.3)
    assert all(set(w) == set(wires[0]) and "logprobs" not in w for w in wires)
    assert translator.ended and translator.finish() is None
    assert translator.translate(STREAM_CHUNKS[-1]) is None  # a repeated final payload


def test_finish_chunk_with_new_text_keeps_usage() -> None:
    translator = StreamTranslator()
    translator.translate({"text": "a", "error_code": 0, "usage": STREAM_CHUNKS[0]["usage"]})
    last = translator.translate({**STREAM_CHUNKS[1], "finish_reason": "stop"})
    assert last is not None and last.usage is not None and last.finish_reason == "stop"


def test_replacement_characters_pass_through_and_count_as_no_change() -> None:
    translator = StreamTranslator()
    first = translator.translate({"text": "ab\ufffd", "error_code": 0})
    assert first is not None and first.text == "ab\ufffd"
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    last = translator.translate({"text": "ab", "usage": usage, "finish_reason": "stop"})
    assert last is not None and last.usage is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("", None),
        ("stop", "stop"),
        ("length", "length"),
        ("abort", "stop"),
        ("tool_calls", "stop"),
        (["length", "stop"], "length"),
        ([None, "stop"], None),
        ([], None),
    ],
)
def test_finish_reason_normalised(raw: Any, expected: str | None) -> None:
    assert normalize_finish_reason(raw) == expected
    output = StreamTranslator().translate({"text": "x", "finish_reason": raw})
    assert output is not None and output.finish_reason == expected


def test_error_chunk_is_forwarded_and_ends_the_stream() -> None:
    translator = StreamTranslator()
    assert translator.translate(STREAM_CHUNKS[0]) is not None
    error = translator.translate(ERROR_CHUNK)
    assert error is not None and error.to_wire() == {
        "text": ERROR_CHUNK["text"],
        "error_code": 50001,
        "model_context": None,
        "finish_reason": None,
        "usage": None,
        "metrics": None,
    }
    assert translator.translate(STREAM_CHUNKS[1]) is None
    assert translator.finish() is None


def test_usage_limited_to_the_standard_keys() -> None:
    usage = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3, "cached": 9}
    out = StreamTranslator().translate({"text": "x", "usage": usage})
    assert out is not None and out.to_wire()["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 1,
        "total_tokens": 3,
    }
    mlx = StreamTranslator().translate({"text": "x", "usage": {}})
    assert mlx is not None and mlx.usage is None
    partial = StreamTranslator().translate({"text": "x", "usage": {"prompt_tokens": 4}})
    assert partial is not None and partial.to_wire()["usage"]["total_tokens"] == 4


def test_finish_on_a_stream_without_finish_reason() -> None:
    translator = StreamTranslator()
    translator.translate({"text": "Hello", "error_code": 0, "usage": STREAM_CHUNKS[0]["usage"]})
    closing = translator.finish()  # SGLang / DashInfer: no finish_reason ever
    assert closing is not None
    assert (closing.text, closing.finish_reason, closing.usage) == ("Hello", "stop", None)
    assert translator.finish() is None


def test_finish_on_an_empty_stream_is_an_error() -> None:
    closing = StreamTranslator().finish()
    assert closing is not None and closing.error_code == ErrorCode.INTERNAL_ERROR


def test_echo_prefix_and_model_context() -> None:
    translator = StreamTranslator(echo_prompt="<s>Once upon")
    out = translator.translate(STREAM_CHUNKS[0])
    assert out is not None and out.text == "<s>Once uponProgram"
    assert out.model_context == {"prompt_echo_len_char": 9, "has_format_prompt": True, "echo": True}


def test_malformed_chunk_raises_invalid_reply() -> None:
    with pytest.raises(InvalidReply):
        StreamTranslator().translate({"error_code": 0})


def test_translated_stream_reencodes_and_decodes() -> None:
    translator = StreamTranslator()
    outputs = [translator.translate(c) for c in STREAM_CHUNKS]
    body = b"".join(encode_frame(o.to_wire()) for o in outputs if o is not None)
    assert [d["text"] for d in FrameDecoder().feed(body)] == [c["text"] for c in STREAM_CHUNKS]


def test_translate_reply_keeps_usage() -> None:
    reply = translate_reply(STREAM_CHUNKS[-1])
    assert reply.finish_reason == "length" and reply.usage is not None
    assert translate_reply(ERROR_CHUNK).error_code == 50001
    echoed = translate_reply(STREAM_CHUNKS[-1], echo_prompt="Hi ")
    assert echoed.text == "Hi Program sostricce" and echoed.model_context is not None


def test_error_output() -> None:
    out = error_output(ErrorCode.CONTEXT_OVERFLOW, "too long").to_wire()
    assert (out["text"], out["error_code"], out["finish_reason"]) == ("too long", 40303, None)
    assert type(out["error_code"]) is int
    with pytest.raises(ValueError):
        error_output(0, "not an error")


# --- embeddings, count_token, model_metadata ----------------------------------------------


def test_embeddings_request_and_reply() -> None:
    request = EmbeddingsRequest.from_wire({"model": "m", "input": ["a", "b"], "span_id": "s"})
    assert embeddings_request(request, model="up").to_wire() == {"model": "up", "input": ["a", "b"]}
    reply = {"embedding": [[0.5, -0.25], [1.0, 0.0]], "token_num": 5}
    assert embeddings_from_reply(reply, expected=2) == [[0.5, -0.25], [1.0, 0.0]]


def test_base64_embeddings_are_decoded() -> None:
    vector = base64.b64encode(struct.pack("<3f", 0.5, -2.0, 1.25)).decode()
    reply = {"embedding": [vector], "token_num": 1}
    assert embeddings_from_reply(reply) == [[0.5, -2.0, 1.25]]
    for bad in ("!!!", base64.b64encode(b"12345").decode()):
        with pytest.raises(InvalidReply):
            embeddings_from_reply({"embedding": [bad], "token_num": 1})


def test_embeddings_errors() -> None:
    with pytest.raises(WorkerError) as caught:
        embeddings_from_reply({"text": "boom", "error_code": 50001})
    assert (caught.value.error_code, caught.value.text) == (50001, "boom")
    with pytest.raises(InvalidReply, match="2 vectors for 3 inputs"):
        embeddings_from_reply({"embedding": [[1.0], [2.0]], "token_num": 2}, expected=3)
    with pytest.raises(InvalidReply):
        embeddings_from_reply({"token_num": 2})
    assert issubclass(WorkerError, ProtocolError)


def test_count_from_reply() -> None:
    assert count_from_reply({"count": 13, "error_code": 0}) == 13
    with pytest.raises(WorkerError):
        count_from_reply({"count": 0, "error_code": 50001})
    with pytest.raises(InvalidReply):
        count_from_reply({"error_code": 0})


def test_model_metadata_9_1() -> None:
    expected = {
        "model": "vicuna",
        "context_length": 2048,
        "chat_model": True,
        "metadata": {},
        "ext_metadata": {
            "prompt_roles": ["system", "human", "ai"],
            "prompt_sep": " ",
            "prompt_chat_template": None,
        },
    }
    assert model_metadata("vicuna", 2048, template("vicuna_v1.1")).to_wire() == expected
    no_sep = model_metadata("vicuna", 2048).to_wire()
    assert no_sep["ext_metadata"]["prompt_sep"] == "\n"


# --- images -------------------------------------------------------------------------------


def test_request_images_are_fastchat_image_urls_of_human_messages() -> None:
    def image(data: object, fmt: str) -> dict[str, Any]:
        return {"type": "image", "object": {"data": data, "format": fmt}}

    request = PromptRequest.from_wire(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": [image("http://sys/x.png", "url")]},
                {
                    "role": "human",
                    "content": [
                        image("http://a/x.png", "url@image/png"),
                        image("QUJD", "base64@image/webp"),
                        image("data:image/gif;base64,R0lG", "base64"),
                        image("QUJD", "base64"),
                        image(None, "binary@image/png"),
                        {"type": "text", "object": {"data": "hi", "format": "text"}},
                    ],
                },
            ],
        }
    )
    assert request_images(request) == [
        "http://a/x.png",
        "data:image/webp;base64,QUJD",
        "data:image/gif;base64,R0lG",
        "data:image/jpeg;base64,QUJD",
    ]
    completion = PromptRequest.from_wire({"model": "m", "prompt": "x", "chat_model": False})
    assert request_images(completion) == []


def test_image_placeholders_only_where_fastchat_0_2_36_puts_them() -> None:
    request = PromptRequest.from_wire(
        {
            "model": "m",
            "messages": [
                {
                    "role": "human",
                    "content": [
                        {"type": "image", "object": {"data": "http://a", "format": "url"}},
                        {"type": "text", "object": {"data": "Hi", "format": "text"}},
                    ],
                }
            ],
        }
    )
    vicuna = template("vicuna_v1.1")
    marked = build_prompt(request, vicuna, with_images=True)
    assert "USER: $$<image>$$Hi ASSISTANT:" in marked
    assert "$$<image>$$" not in build_prompt(request, vicuna)
    plain = template("zero_shot")  # ADD_COLON_SINGLE: 0.2.36 marks no images there
    assert "$$<image>$$" not in build_prompt(request, plain, with_images=True)


# --- the per-frame fast path (issue 14): same frames as Chunk.from_wire's ------------------


class GenericChunk(dict[str, Any]):
    """A chunk the translator's fast path never takes (it wants an exact dict): it goes through
    ``Chunk.from_wire`` and the generic encoder, the path every chunk took before issue 14."""


ALMOST_INTS = st.sampled_from([True, False, 3.0, 2.5, "7", None, -1, 2**70])
COUNT = st.integers(min_value=0, max_value=2**40) | ALMOST_INTS
USAGE = st.none() | st.fixed_dictionaries(
    {},  # each key present or not: full, partial and empty ({}: MLX's last chunk) usage
    optional={
        key: COUNT
        for key in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")
    },
)
CHUNK = st.fixed_dictionaries(
    {"text": wire_text() | wire_text() | st.sampled_from([None, 7, b"x", ["a"]])},
    optional={
        "error_code": st.sampled_from([0, 0, 0, 1, 50001, True, False, 0.0, "0", None]),
        "usage": USAGE,
        "finish_reason": st.sampled_from(
            [None, "", "stop", "length", "abort", ["length", None], [], [None], 5]
        ),
        "logprobs": st.none(),
    },
)
RULE = st.none() | st.builds(
    ReasoningRule, prefilled=st.booleans(), anywhere=st.booleans(), keep_thinking=st.booleans()
)


@st.composite
def streams(
    draw: st.DrawFn, chunk: st.SearchStrategy[dict[str, Any]] = CHUNK
) -> list[dict[str, Any]]:
    """A few chunks; often the last one again with a finish reason (usage dropped, §9.3)."""
    chunks = draw(st.lists(chunk, min_size=1, max_size=6))
    if draw(st.booleans()):
        chunks.append({**chunks[-1], "finish_reason": draw(st.sampled_from(["stop", "length"]))})
    return chunks


def _outcome(translator: StreamTranslator, chunk: dict[str, Any], *, fast: bool) -> object:
    """What one chunk gives: the output and its frame bytes, None, or the error raised."""
    try:
        output = translator.translate(chunk if fast else GenericChunk(chunk))
    except ProtocolError as exc:
        return type(exc), str(exc), exc.error_code
    if output is None:
        return None
    frame = output.to_frame() if fast else encode_frame(output.to_wire())
    return output, frame


@settings(max_examples=600)
@given(echo_prompt=st.none() | wire_text(), reasoning=RULE, stream=streams())
def test_fast_path_frames_equal_the_generic_ones_byte_for_byte(
    echo_prompt: str | None, reasoning: ReasoningRule | None, stream: list[dict[str, Any]]
) -> None:
    fast = StreamTranslator(echo_prompt=echo_prompt, reasoning=reasoning)
    generic = StreamTranslator(echo_prompt=echo_prompt, reasoning=reasoning)
    for chunk in stream:
        assert _outcome(fast, chunk, fast=True) == _outcome(generic, chunk, fast=False)
        assert fast.ended == generic.ended
    last_fast, last_generic = fast.finish(), generic.finish()
    assert last_fast == last_generic
    if last_fast is not None and last_generic is not None:
        assert last_fast.to_frame() == encode_frame(last_generic.to_wire())


COMMON_CHUNKS = [
    {"text": "Hello", "error_code": 0, "usage": STREAM_CHUNKS[0]["usage"], "finish_reason": None},
    {"text": "<think>hm</think>Hi", "usage": None},
    {"text": "Hello \ufffd", "error_code": 0, "finish_reason": None, "logprobs": None},
    {"text": "", "finish_reason": ""},
    {"text": "x", "finish_reason": "abort", "usage": {**STREAM_CHUNKS[0]["usage"], "extra": 1.5}},
    {"text": "Hello!", "finish_reason": "length", "usage": STREAM_CHUNKS[0]["usage"]},
]


@pytest.mark.parametrize("reasoning", [None, ReasoningRule(anywhere=True)])
@pytest.mark.parametrize("chunk", COMMON_CHUNKS)
def test_common_chunks_are_not_parsed_by_pydantic(
    chunk: dict[str, Any], reasoning: ReasoningRule | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = StreamTranslator(reasoning=reasoning).translate(GenericChunk(chunk))

    class Refusing(Chunk):
        @classmethod
        def from_wire(cls, data: object) -> Chunk:
            raise AssertionError(f"a common chunk was parsed by pydantic: {data}")

    monkeypatch.setattr(protocol.translate, "Chunk", Refusing)
    assert StreamTranslator(reasoning=reasoning).translate(chunk) == expected


UNCOMMON_CHUNKS = [
    {"text": "a", "error_code": False},  # bools where ints belong: pydantic's coercion decides
    {"text": "a", "usage": {"prompt_tokens": True, "completion_tokens": 1, "total_tokens": 2}},
    {"text": "a", "usage": {"prompt_tokens": 1, "completion_tokens": 1}},  # partial usage
    {"text": "a", "usage": {}},  # MLX's last chunk
    {"text": "a", "error_code": 0.0},
    {"text": "a", "finish_reason": ["length", None]},
    {"text": "boom", "error_code": 50001},
    {"text": 5},
]


@pytest.mark.parametrize("chunk", UNCOMMON_CHUNKS)
def test_uncommon_chunks_go_through_chunk_from_wire(
    chunk: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[object] = []

    class Spying(Chunk):
        @classmethod
        def from_wire(cls, data: object) -> Chunk:
            parsed.append(data)
            return Chunk.from_wire(data)

    monkeypatch.setattr(protocol.translate, "Chunk", Spying)
    with contextlib.suppress(ProtocolError):
        StreamTranslator().translate(chunk)
    assert parsed == [chunk]


# --- StreamTranslator.frame: the common chunk straight to its frame bytes (issue 14) ---------


def _relayed(translator: StreamTranslator, encoder: FrameEncoder, chunk: dict[str, Any]) -> object:
    """A chunk as the relay takes it: ``frame`` first, ``translate`` when it declines."""
    data = translator.frame(chunk, encoder)
    if data is not None:
        return data
    try:
        output = translator.translate(chunk)
    except ProtocolError as exc:
        return type(exc), str(exc), exc.error_code
    return None if output is None else encoder.encode(output)


INT_COUNT = st.integers(min_value=-(2**70), max_value=2**70)
COMMON_CHUNK = st.fixed_dictionaries(
    {"text": wire_text()},
    optional={
        "error_code": st.just(0),
        "usage": st.none()
        | st.fixed_dictionaries(
            {key: INT_COUNT for key in ("prompt_tokens", "completion_tokens", "total_tokens")},
            optional={"cached_tokens": INT_COUNT},
        ),
        "finish_reason": st.sampled_from([None, ""]),
        "logprobs": st.none(),
    },
)


@settings(max_examples=600)
@given(
    echo_prompt=st.none() | st.none() | wire_text(),
    reasoning=RULE,
    stream=streams(COMMON_CHUNK | COMMON_CHUNK | CHUNK),
)
def test_frame_is_translate_then_encode_byte_for_byte(
    echo_prompt: str | None, reasoning: ReasoningRule | None, stream: list[dict[str, Any]]
) -> None:
    lane = StreamTranslator(echo_prompt=echo_prompt, reasoning=reasoning)
    generic = StreamTranslator(echo_prompt=echo_prompt, reasoning=reasoning)
    lane_encoder = FrameEncoder()
    for chunk in stream:
        expected = _outcome(generic, chunk, fast=False)
        common = (
            echo_prompt is None
            and not lane.ended
            and _plain_fields(chunk) is not None
            and not chunk.get("finish_reason")
        )
        data = lane.frame(chunk, lane_encoder) if common else None
        assert (data is not None) == common  # the lane takes exactly the common chunks
        got = data if data is not None else _relayed(lane, lane_encoder, chunk)
        if isinstance(expected, tuple) and len(expected) == 2:  # (output, its frame)
            expected = expected[1]
        assert got == expected
        assert lane.ended == generic.ended
    assert lane.finish() == generic.finish()  # the same state: the same closing frame


def test_frame_declines_without_changing_anything() -> None:
    translator = StreamTranslator(reasoning=ReasoningRule())
    encoder = FrameEncoder()
    assert translator.frame({"text": "<think>a", "finish_reason": "stop"}, encoder) is None
    assert translator.frame({"text": "<think>a", "error_code": 1}, encoder) is None
    assert translator.frame({"text": "<think>a</think>b", "usage": None}, encoder) == (
        b'{"content":[{"object":{"data":"a","format":"text"},"type":"thinking"},'
        b'{"object":{"data":"b","format":"text"},"type":"text"}],"error_code":0,'
        b'"model_context":null,"finish_reason":null,"usage":null,"metrics":null}\0'
    )
