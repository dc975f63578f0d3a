"""protocol/strict_json.py: request bodies decoded strictly, each refusal naming the field."""

from __future__ import annotations

import json

import pytest

from protocol.errors import InvalidRequest
from protocol.strict_json import MAX_DEPTH, check, loads


def test_ordinary_bodies_decode_as_json_does() -> None:
    body = '{"model": "m", "messages": [{"role": "human", "content": "h\\u00e9 \\ud83d\\ude00"}]}'
    assert loads(body) == json.loads(body)
    assert loads(body.encode()) == json.loads(body)
    assert loads("[1, 2.5, -3e10, true, null]") == [1, 2.5, -3e10, True, None]


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
def test_non_finite_numbers_are_refused(number: str) -> None:
    with pytest.raises(InvalidRequest, match="not JSON") as caught:
        loads(f'{{"temperature": {number}}}')
    assert caught.value.error_code == 40001


def test_a_lone_surrogate_is_refused_naming_its_field() -> None:
    with pytest.raises(InvalidRequest, match=r"lone surrogate \(\\ud800\)") as caught:
        loads('{"messages": [{"content": "a\\ud800"}]}')
    assert caught.value.field == "messages.0.content"
    with pytest.raises(InvalidRequest) as in_key:
        loads('{"bad\\udc00key": 1}')
    assert in_key.value.field == "bad\\udc00key"


def test_nesting_is_bounded_and_the_check_itself_cannot_overflow() -> None:
    assert loads("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    with pytest.raises(InvalidRequest, match=f"deeper than {MAX_DEPTH}"):
        loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    with pytest.raises(InvalidRequest, match="nest"):
        loads("[" * 100_000 + "]" * 100_000)  # RecursionError inside the decoder
    deep: list[object] = []
    for _ in range(10_000):  # built in memory: only the iterative check sees it
        deep = [deep]
    with pytest.raises(InvalidRequest, match="deeper"):
        check(deep)


def test_bytes_that_are_not_utf8_or_not_json_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="not UTF-8"):
        loads(b'{"prompt": "\xff"}')
    with pytest.raises(InvalidRequest, match="not JSON"):
        loads(b"{")
