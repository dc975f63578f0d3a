"""protocol/reasoning.py and the split frames it gives (docs/protocol.md §7.4)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter.tools.reference_worker import vicuna_v1_1_template
from protocol.dbgpt import ModelOutput, PromptRequest
from protocol.fastchat import ConvTemplate
from protocol.framing import encode_frame
from protocol.reasoning import (
    ReasoningParser,
    ReasoningRule,
    Split,
    is_reasoning_model,
    split_reasoning,
)
from protocol.translate import StreamTranslator, plan_generation, translate_reply

# The three tag shapes of the issue, each a full cumulative text and the split DB-GPT's own
# non-stream parser (parse_chat_message) gives for it.
BOTH_TAGS = ("<think>\nLet me see: {a: 1}.\n</think>\n\nThe answer is 42.", False)
END_TAG_ONLY = ("Let me see: {a: 1}.\n</think>\n\nThe answer is 42.", True)  # prompt pre-fills
START_TAG_ONLY = ("<think>\nLet me see: {a: 1}. Still", False)  # cut while thinking
SHAPES = {"both tags": BOTH_TAGS, "end tag only": END_TAG_ONLY, "start tag only": START_TAG_ONLY}
FINAL = {
    "both tags": Split("Let me see: {a: 1}.", "The answer is 42."),
    "end tag only": Split("Let me see: {a: 1}.", "The answer is 42."),
    "start tag only": Split("Let me see: {a: 1}. Still", ""),
}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("deepseek-r1-distill-qwen-7b", True),
        ("DeepSeek-Reasoner", True),
        ("deepseek-reasoning", True),
        ("QwQ-32B", True),
        ("Qwen3-8B", True),
        ("deepseek-v3", False),  # deepseek alone is not enough
        ("r1-mini", False),
        ("qwen2.5-7b-instruct", False),
        ("tiny-vicuna", False),
    ],
)
def test_reasoning_model_names_follow_dbgpt(name: str, expected: bool) -> None:
    assert is_reasoning_model(name) is expected


@pytest.mark.parametrize("shape", SHAPES)
def test_final_split_matches_dbgpt_parser(shape: str) -> None:
    text, prefilled = SHAPES[shape]
    assert split_reasoning(text, prefilled=prefilled) == FINAL[shape]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("anywhere", [False, True])
def test_stream_of_every_prefix_only_grows(shape: str, anywhere: bool) -> None:
    """Fed one character at a time (every partial tag shows up at the end once), each frame's
    thinking and answer extend the previous frame's: the apiserver's length deltas stay true."""
    text, prefilled = SHAPES[shape]
    parser = ReasoningParser(ReasoningRule(prefilled=prefilled, anywhere=anywhere))
    previous = Split(None, "")
    for end in range(1, len(text) + 1):
        split = parser.feed(text[:end])
        if previous.thinking is not None:
            assert split.thinking is not None
            assert split.thinking.startswith(previous.thinking), text[:end]
        assert split.answer.startswith(previous.answer), text[:end]
        assert "<" not in (split.thinking or "") + split.answer, text[:end]
        previous = split
    assert previous == FINAL[shape]


def test_partial_closing_tag_is_held_back() -> None:
    assert split_reasoning("<think>abc</thi") == Split("abc", "")
    assert split_reasoning("<think>abc</think") == Split("abc", "")
    assert split_reasoning("<think>a</b") == Split("a</b", "")  # not a prefix of </think>


def test_partial_opening_tag_at_the_start_is_held_back() -> None:
    assert split_reasoning("  <thi") == Split(None, "")
    assert split_reasoning("<tab") == Split(None, "<tab")
    assert split_reasoning("Hello <thi", anywhere=True) == Split(None, "Hello ")
    assert split_reasoning("Hello <thi") == Split(None, "Hello <thi")


def test_block_after_answer_text_only_where_anywhere() -> None:
    text = "Sure. <think>hmm</think> Done."
    assert split_reasoning(text) == Split(None, text)
    assert split_reasoning(text, anywhere=True) == Split("hmm", "Sure.  Done.")


def test_text_without_a_block_is_untouched() -> None:
    for text in ("", "  plain answer with {json}", "a < b > c"):
        assert split_reasoning(text, anywhere=True) == Split(None, text)


def test_a_rewritten_last_character_is_growth_not_shrinkage() -> None:
    """HF workers end with U+FFFD for an incomplete UTF-8 sequence and replace it later; DB-GPT
    drops U+FFFD before taking lengths, so the new value wins."""
    parser = ReasoningParser(ReasoningRule())
    assert parser.feed("<think>caf\ufffd\ufffd").thinking == "caf\ufffd\ufffd"
    assert parser.feed("<think>caf\u00e9").thinking == "caf\u00e9"


def test_a_shrinking_reparse_keeps_the_previous_value() -> None:
    parser = ReasoningParser(ReasoningRule())
    parser.feed("<think>long reasoning</think>answer")
    # A worker whose text went backwards (never FastChat's HF worker): nothing shrinks.
    assert parser.feed("<think>long</think>") == Split("long reasoning", "answer")


@pytest.mark.parametrize(
    ("mode", "model", "prompt", "completion", "expected"),
    [
        ("pass", "qwq-32b", "USER: hi ASSISTANT:", False, None),
        ("split", "qwq-32b", "hi", True, None),  # the raw-completion path is never split
        ("auto", "tiny-vicuna", "USER: hi ASSISTANT:", False, ReasoningRule()),
        ("auto", "QwQ-32B", "USER: hi ASSISTANT:", False, ReasoningRule(anywhere=True)),
        ("auto", "m", "ASSISTANT: <think>\n", False, ReasoningRule(prefilled=True)),
        ("split", "tiny-vicuna", "x", False, ReasoningRule(anywhere=True)),
        ("strip", "m", "x", False, ReasoningRule(anywhere=True, keep_thinking=False)),
    ],
)
def test_rule_for_request(
    mode: Any, model: str, prompt: str, completion: bool, expected: ReasoningRule | None
) -> None:
    got = ReasoningRule.for_request(mode, model=model, prompt=prompt, completion=completion)
    assert got == expected


def test_strip_keeps_the_legacy_text_form() -> None:
    parser = ReasoningParser(ReasoningRule(keep_thinking=False))
    assert parser.feed(BOTH_TAGS[0]) == Split(None, "The answer is 42.")


# --- frames on the wire -------------------------------------------------------------------


def test_split_frame_bytes_are_dbgpt_content_list() -> None:
    """The exact frame: content list in DB-GPT's own asdict order, no ``text`` key, no
    ``thinking`` key; DB-GPT 0.7.1+ parses it with ModelOutput(**data)."""
    output = ModelOutput(text="42", error_code=0, thinking="{x}", finish_reason="stop")
    assert encode_frame(output.to_wire()) == (
        b'{"content":[{"object":{"data":"{x}","format":"text"},"type":"thinking"},'
        b'{"object":{"data":"42","format":"text"},"type":"text"}],"error_code":0,'
        b'"model_context":null,"finish_reason":"stop","usage":null,"metrics":null}\0'
    )


def test_frame_without_thinking_keeps_text_form() -> None:
    wire = ModelOutput(text="plain", error_code=0).to_wire()
    assert wire["text"] == "plain" and "content" not in wire and "thinking" not in wire


def _chunk(text: str, finish: str | None = None, error_code: int = 0) -> dict[str, Any]:
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    return {"text": text, "error_code": error_code, "usage": usage, "finish_reason": finish}


def test_stream_translator_splits_every_frame_and_keeps_error_frames() -> None:
    translator = StreamTranslator(reasoning=ReasoningRule())
    first = translator.translate(_chunk("<think> {a"))
    assert first is not None and first.to_wire()["content"][0]["object"]["data"] == "{a"
    last = translator.translate(_chunk("<think> {a} </think> B", finish="stop"))
    assert last is not None and (last.thinking, last.text) == ("{a}", "B")

    failing = StreamTranslator(reasoning=ReasoningRule())
    error = failing.translate(_chunk("boom", error_code=50001))
    assert error is not None and error.to_wire() == {
        "text": "boom",
        "error_code": 50001,
        "model_context": None,
        "finish_reason": None,
        "usage": None,
        "metrics": None,
    }


def test_closing_frame_of_a_stream_without_finish_reason_is_split() -> None:
    translator = StreamTranslator(reasoning=ReasoningRule())
    translator.translate(_chunk("<think> r </think> a"))
    final = translator.finish()
    assert final is not None and (final.thinking, final.text) == ("r", "a")


def test_generate_reply_is_split_like_the_last_frame() -> None:
    output = translate_reply(_chunk(BOTH_TAGS[0], finish="stop"), reasoning=ReasoningRule())
    assert (output.thinking, output.text) == ("Let me see: {a: 1}.", "The answer is 42.")


def test_plan_carries_the_rule_for_the_worker_model() -> None:
    request = PromptRequest.from_wire(
        {"model": "qwq-32b", "messages": [{"role": "human", "content": "hi"}]}
    )
    conv = ConvTemplate.from_wire(vicuna_v1_1_template())
    plan = plan_generation(
        request,
        model="qwq-32b",
        prompt="USER: hi ASSISTANT:",
        template=conv,
        context_length=100,
        prompt_tokens=5,
        default_temperature=0.0,
        reasoning="auto",
    )
    assert plan.reasoning == ReasoningRule(anywhere=True)


# --- the parser's shortcut: a stream that cannot start a block is passed through ----------------

PIECES = st.sampled_from(
    ["<think>", "</think>", "<", "<th", "ink>", "</th", " ", "\n", "\u3000", "\ufffd", "a", "Hi "]
) | st.text(max_size=4)


def _every_split(parser: ReasoningParser, texts: list[str]) -> list[tuple[str | None, str]]:
    return [(split.thinking, split.answer) for split in map(parser.feed, texts)]


@settings(max_examples=400)
@given(
    st.lists(PIECES, max_size=12),
    st.sampled_from(
        [
            ReasoningRule(),
            ReasoningRule(keep_thinking=False),
            ReasoningRule(anywhere=True),
            ReasoningRule(prefilled=True),
        ]
    ),
    st.booleans(),
)
def test_the_parser_shortcut_splits_every_stream_as_the_full_parse_does(
    pieces: list[str], rule: ReasoningRule, rewrite_last: bool
) -> None:
    # Cumulative texts, sometimes with a last character rewritten (a U+FFFD that becomes a
    # real character), fed to the parser and to one whose shortcut is off.
    texts = ["".join(pieces[:n]) for n in range(1, len(pieces) + 1)]
    if rewrite_last and texts and texts[-1]:
        texts.append(texts[-1][:-1] + "x")
    full_parse = ReasoningParser(rule)
    full_parse._undecided = False  # never decides the stream is plain: parses every frame
    assert _every_split(ReasoningParser(rule), texts) == _every_split(full_parse, texts)


def test_a_plain_stream_is_decided_after_its_first_visible_character() -> None:
    parser = ReasoningParser(ReasoningRule())
    parser.feed("  <th")
    assert not parser._plain  # may still become <think>
    parser.feed("  <tho")
    assert parser._plain
