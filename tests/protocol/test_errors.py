"""protocol/errors.py: one hierarchy, each error carrying the code to report it with."""

from __future__ import annotations

import pytest

from protocol import errors
from protocol.errors import (
    ContextOverflow,
    FramingError,
    InvalidMessage,
    InvalidReply,
    InvalidRequest,
    ProtocolError,
    UnknownSeparatorStyle,
    WorkerError,
)
from protocol.fastchat import ErrorCode


def test_every_error_is_a_protocol_error_and_a_value_error() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, ProtocolError) and issubclass(cls, ValueError), name
    assert issubclass(InvalidRequest, InvalidMessage) and issubclass(InvalidReply, InvalidMessage)


def test_codes_agree_with_fastchats_table() -> None:
    assert ProtocolError("x").error_code == ErrorCode.INTERNAL_ERROR
    assert InvalidReply("x").error_code == ErrorCode.INTERNAL_ERROR
    assert InvalidRequest("x").error_code == ErrorCode.VALIDATION_TYPE_ERROR
    assert InvalidRequest("x", error_code=40302).error_code == ErrorCode.PARAM_OUT_OF_RANGE
    overflow = ContextOverflow(context_length=2048, prompt_tokens=6372)
    assert overflow.error_code == ErrorCode.CONTEXT_OVERFLOW


def test_context_overflow_wording_is_fastchats() -> None:
    overflow = ContextOverflow(context_length=2048, prompt_tokens=6372)
    assert str(overflow) == (
        "This model's maximum context length is 2048 tokens. However, your messages resulted in "
        "6372 tokens. Please reduce the length of the messages."
    )
    assert (overflow.context_length, overflow.prompt_tokens) == (2048, 6372)


def test_attributes_and_messages() -> None:
    framing = FramingError("frame is a JSON list, not an object", offset=42)
    assert framing.offset == 42 and str(framing).endswith("(frame at stream offset 42)")
    invalid = InvalidRequest("must be positive", field="max_new_tokens")
    assert (invalid.field, invalid.reason) == ("max_new_tokens", "must be positive")
    assert str(invalid) == "max_new_tokens: must be positive"
    assert str(InvalidReply("empty body")) == "empty body"
    worker = WorkerError("boom", error_code=50002)
    assert (worker.text, worker.error_code, str(worker)) == ("boom", 50002, "boom")


def test_unknown_separator_style_message() -> None:
    error = UnknownSeparatorStyle(99, "vicuna_v1.1", "0.2.36", detail="valid ints are 1..19")
    assert str(error) == (
        "unknown sep_style 99 in conversation template 'vicuna_v1.1' (FastChat 0.2.36 "
        "numbering): valid ints are 1..19"
    )
    assert (error.value, error.template, error.numbering) == (99, "vicuna_v1.1", "0.2.36")
    with pytest.raises(ProtocolError):
        raise UnknownSeparatorStyle(None, None, "main")
