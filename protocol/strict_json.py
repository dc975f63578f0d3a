"""Request bodies decoded strictly: only JSON every peer can write back out.

Python's ``json.loads`` accepts three things a request body must not carry, each of which used
to surface later as an HTTP 500 or an "internal error" frame instead of a refusal:

- ``NaN``, ``Infinity`` and numbers too large for a float (``1e999`` becomes ``inf``): no JSON
  encoder can write them back, FastChat's sampling rejects them;
- lone surrogates (``"\\ud800"``): legal as a JSON escape, but a string that has no UTF-8
  form, so encoding it for the worker, a log line or a listing fails;
- nesting deep enough to exhaust the interpreter's stack (``RecursionError``).

``loads`` refuses all three with an ``InvalidRequest`` naming the field (a dotted path such as
``messages.0.content``), the same error a body that does not fit its wire model gets.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from protocol.errors import InvalidRequest

__all__ = ["MAX_DEPTH", "loads"]

MAX_DEPTH: Final = 64
"""Deepest nesting of arrays and objects accepted; DB-GPT's bodies nest five levels at most."""


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of the range of a float")
    return value


_decoder = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def loads(raw: bytes | str) -> Any:
    """Decode one JSON body strictly; raise ``InvalidRequest`` naming what is wrong."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the body is not UTF-8: {exc}") from None
    try:
        value = _decoder.decode(text)
    except RecursionError:
        raise InvalidRequest(f"the body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # the cause stays attached: its ``pos`` says where
        raise InvalidRequest(f"the body is not JSON: {exc}") from exc
    check(value)
    return value


def check(value: Any) -> None:
    """Refuse nesting beyond ``MAX_DEPTH`` and strings (keys too) without a UTF-8 form.
    Iterative, so the check itself cannot run out of stack."""
    pending: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, dict | list):
            if len(path) >= MAX_DEPTH:
                raise InvalidRequest(
                    f"nested deeper than {MAX_DEPTH} levels", field=".".join(path[:8]) + "..."
                )
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(key, (*path, key))
                    pending.append((child, (*path, key)))
            else:
                pending.extend((child, (*path, str(i))) for i, child in enumerate(item))


def _check_text(text: str, path: tuple[str, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = ".".join(p.encode("utf-8", "backslashreplace").decode() for p in path)
        bad = text[exc.start : exc.end].encode("unicode_escape").decode()
        raise InvalidRequest(f"a lone surrogate ({bad}) has no UTF-8 form", field=where) from None
