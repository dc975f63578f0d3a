"""adapter/errors.py: one tree, and the in-band code each error is reported with."""

from __future__ import annotations

import pytest

from adapter.errors import (
    UPSTREAM_REASONS,
    AdapterError,
    ControllerError,
    NoWorker,
    Refused,
    RequestFailed,
    UpstreamError,
)
from protocol.fastchat import ErrorCode
from protocol.translate import error_output


def test_every_adapter_error_is_one_tree() -> None:
    for cls in (UpstreamError, NoWorker, ControllerError, RequestFailed, Refused):
        assert issubclass(cls, AdapterError)


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("unreachable", ErrorCode.CONTROLLER_NO_WORKER),
        ("idle_timeout", ErrorCode.CONTROLLER_WORKER_TIMEOUT),
        ("http_status", ErrorCode.INTERNAL_ERROR),
        ("broken_stream", ErrorCode.INTERNAL_ERROR),
        ("malformed", ErrorCode.INTERNAL_ERROR),
        ("in_band", ErrorCode.INTERNAL_ERROR),
    ],
)
def test_upstream_reasons_map_to_fastchat_codes(reason: str, code: int) -> None:
    error = UpstreamError("http://w", reason, "detail")  # type: ignore[arg-type]
    assert error.error_code == code
    assert str(error) == f"FastChat worker http://w: {reason}: detail"


def test_the_reasons_literal_lists_every_reason_once() -> None:
    assert sorted(UPSTREAM_REASONS) == sorted(set(UPSTREAM_REASONS))
    assert len(UPSTREAM_REASONS) == 6


def test_a_worker_error_object_keeps_its_own_code() -> None:
    oom = UpstreamError("http://w", "in_band", "CUDA out of memory", code=50002)
    assert oom.error_code == ErrorCode.CUDA_OUT_OF_MEMORY


def test_no_worker_says_what_is_served_and_picks_the_code() -> None:
    unknown = NoWorker("gpt-5", ["b", "a", "a"])
    assert str(unknown) == "unknown model 'gpt-5'; served models: a, b"
    assert unknown.error_code == ErrorCode.INVALID_MODEL
    down = NoWorker("a", [], known=True)
    assert str(down) == "no live FastChat worker serves model 'a'; served models: none"
    assert down.error_code == ErrorCode.CONTROLLER_NO_WORKER


def test_request_failed_carries_its_output_and_outcome() -> None:
    failed = RequestFailed(error_output(40303, "too long"), "rejected")
    assert (failed.error_code, failed.outcome, str(failed)) == (40303, "rejected", "too long")
    assert Refused(501, "no rerank").status == 501
