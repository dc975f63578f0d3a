"""The base of every wire model: tolerant parsing in, exact dicts out, one error type.

Pydantic's ``ValidationError`` never leaves ``protocol/``: ``from_wire`` turns it into the
model's own ``InvalidMessage`` subclass (``InvalidRequest`` for bodies DB-GPT sends us,
``InvalidReply`` for answers from FastChat), naming the first offending field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from protocol.errors import InvalidMessage, InvalidReply

if TYPE_CHECKING:
    from typing import Self

__all__ = ["WireModel"]

# Pydantic error types meaning "right type, value out of range" (FastChat's 40302).
_OUT_OF_RANGE = frozenset(
    {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short"}
)
_PARAM_OUT_OF_RANGE = 40302


class WireModel(BaseModel):
    """Unknown keys are ignored on input (every peer version adds some); ``to_wire`` is
    defined per model because each side has its own rule for nulls."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    invalid: ClassVar[type[InvalidMessage]] = InvalidReply

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Self:
        """``cls(**values)`` at half its cost: pydantic's validator called directly, without the
        keyword plumbing of ``__init__`` and ``model_validate`` (measurable on the relay's
        per-frame output, issue 14). For values the program built itself: a ``ValidationError``
        here is a bug, not bad input, so it is not translated."""
        model: Self = cls.__pydantic_validator__.validate_python(values)
        return model

    @classmethod
    def from_wire(cls, data: object) -> Self:
        """Validate a decoded JSON value; raise ``cls.invalid`` naming the first bad field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _to_invalid(cls.invalid, exc) from None


def _to_invalid(kind: type[InvalidMessage], exc: ValidationError) -> InvalidMessage:
    first: Any = exc.errors(include_url=False)[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, kind):  # raised by one of our own validators: keep it
        return cause
    if isinstance(cause, InvalidMessage):
        return kind(cause.reason, field=cause.field, error_code=cause.error_code)
    field = ".".join(str(part) for part in first["loc"])
    code = _PARAM_OUT_OF_RANGE if first["type"] in _OUT_OF_RANGE else None
    return kind(str(first["msg"]), field=field, error_code=code)
