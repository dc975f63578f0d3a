"""Every error the adapter raises on purpose, as one hierarchy::

    AdapterError                   .error_code: the in-band code a DB-GPT client is shown
     ├── UpstreamError             a FastChat worker or controller gave no usable answer;
     │                             .worker, .reason (one of UpstreamReason), .detail
     │       reason "unreachable"    connect failed or refused            50005
     │       reason "idle_timeout"   no frame within the idle timeout     50006
     │       reason "http_status"    a non-200 answer                     50001
     │       reason "broken_stream"  body ended early or connection reset 50001
     │       reason "malformed"      undecodable body, frame or template  50001
     │       reason "in_band"        the worker's own error object        its code, else 50001
     ├── NoWorker                  no live worker serves the model; .model, .served
     │                             (50005 if a worker served it before, else 40301)
     ├── ControllerError           a DB-GPT controller did not accept a call; the registrar
     │                             retries it (never shown to a DB-GPT client); .reason (one
     │                             of ControllerReason), .status (the HTTP status, if any)
     ├── RequestFailed             a generation answered with an error ModelOutput instead of
     │                             text; .output, .outcome (how the request is counted)
     └── Refused                   a request FastChat cannot serve as asked; .status: 400 (a
                                   model is needed) or 501 (rerank, model start/stop)

Errors in the bytes themselves (a body that does not fit its wire model, a broken frame, a
context overflow) are ``protocol.errors.ProtocolError``s; the routes map both trees to HTTP
answers in one place (``adapter/worker_api.py``). Outside this tree on purpose: the body-limit
rejection in ``ops_api`` is a Starlette ``HTTPException`` (FastAPI re-raises only those from
body reading), and the tools in ``adapter/tools/`` have their own (``CheckFailed``...).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, Literal, get_args

from protocol.fastchat import ErrorCode

if TYPE_CHECKING:
    from adapter.tracking import Outcome
    from protocol.dbgpt import ModelOutput

__all__ = [
    "AdapterError",
    "ControllerError",
    "ControllerReason",
    "NoWorker",
    "Refused",
    "RequestFailed",
    "UpstreamError",
    "UpstreamReason",
]

UpstreamReason = Literal[
    "unreachable", "idle_timeout", "http_status", "broken_stream", "malformed", "in_band"
]
UPSTREAM_REASONS: Final[tuple[UpstreamReason, ...]] = get_args(UpstreamReason)
ControllerReason = Literal["unreachable", "timeout", "http_status", "broken"]

_CODE_BY_REASON: Final[dict[UpstreamReason, ErrorCode]] = {
    "unreachable": ErrorCode.CONTROLLER_NO_WORKER,
    "idle_timeout": ErrorCode.CONTROLLER_WORKER_TIMEOUT,
}


class AdapterError(Exception):
    """Base of the tree. ``error_code`` is what a DB-GPT client sees in the error frame."""

    error_code: int = ErrorCode.INTERNAL_ERROR


class UpstreamError(AdapterError):
    """A FastChat worker or controller could not give a usable answer."""

    def __init__(
        self, worker: str, reason: UpstreamReason, detail: str, *, code: int | None = None
    ) -> None:
        super().__init__(f"FastChat worker {worker}: {reason}: {detail}")
        self.worker = worker
        self.reason: UpstreamReason = reason
        self.detail = detail
        # The worker's own code for "in_band" errors; otherwise fixed by the reason.
        self.error_code = code or _CODE_BY_REASON.get(reason, ErrorCode.INTERNAL_ERROR)


class NoWorker(AdapterError):
    """No live worker serves the model; the message names what is served.

    ``error_code``: 50005 (CONTROLLER_NO_WORKER) when the model is one a worker served but
    that worker is down now, 40301 (INVALID_MODEL) for a name no worker ever served."""

    def __init__(self, model: str, served: Iterable[str], *, known: bool = False) -> None:
        names = sorted(set(served))
        listed = ", ".join(names) if names else "none"
        why = "no live FastChat worker serves model" if known else "unknown model"
        super().__init__(f"{why} {model!r}; served models: {listed}")
        self.model = model
        self.served = names
        self.error_code = ErrorCode.CONTROLLER_NO_WORKER if known else ErrorCode.INVALID_MODEL


class ControllerError(AdapterError):
    """A DB-GPT controller did not accept a call (refused, timed out, non-2xx)."""

    def __init__(
        self,
        controller: str,
        detail: str,
        *,
        reason: ControllerReason = "broken",
        status: int | None = None,
    ) -> None:
        super().__init__(f"DB-GPT controller {controller}: {detail}")
        self.controller = controller
        self.detail = detail
        self.reason: ControllerReason = reason
        self.status = status


class RequestFailed(AdapterError):
    """The generation request is answered with ``output`` (an error) instead of text."""

    def __init__(self, output: ModelOutput, outcome: Outcome) -> None:
        super().__init__(output.text)
        self.output = output
        self.outcome: Outcome = outcome
        self.error_code = output.error_code


class Refused(AdapterError):
    """The request cannot be served as asked; answered with ``status`` and the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
