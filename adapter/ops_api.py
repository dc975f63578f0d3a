"""Operations surface: probes, metrics, and the request guard (body limit, API key).

- ``GET /livez``: the process answers; never looks at upstreams, so an orchestrator does not
  restart a healthy adapter because a FastChat worker is down.
- ``GET /readyz``: 200 only while ``Runtime.ready`` (registered, at least one FastChat worker
  answers, not shutting down); otherwise 503 with the reason. It turns 503 the moment SIGTERM
  handling begins, before the streams drain.
- ``GET /metrics``: Prometheus text format from the runtime's own registry.
- ``GuardMiddleware``: refuses a request that declares both ``Content-Length`` and
  ``Transfer-Encoding`` (400 and close, RFC 9112 §6.1: a proxy in front that trusts the
  Content-Length would read a different request boundary than ours), rejects bodies over
  ``max_body_bytes`` (413, by Content-Length or while the body streams in) and, when
  ``api_key`` is set, requires ``Authorization: Bearer <key>`` on ``/api/worker/*`` (401).
  DB-GPT's stream reader ignores the HTTP status and would show an empty answer, so on
  ``generate_stream`` the rejection body is also one NUL-terminated ModelOutput error frame;
  elsewhere it is ``{"detail": ...}``.

``mount`` wires all of it into an app: the guard inside, the access log outermost.
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Final

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapter.logs import AccessLogMiddleware
from adapter.metrics import CONTENT_TYPE
from protocol.fastchat import ErrorCode
from protocol.framing import encode_frame
from protocol.translate import error_output

if TYPE_CHECKING:
    from adapter.runtime import Runtime
    from adapter.settings import Settings

WORKER_API_PREFIX: Final = "/api/worker/"
STREAM_PATH: Final = "/api/worker/generate_stream"

router = APIRouter(tags=["operations"])


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


@router.get("/livez")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    runtime = _runtime(request)
    if runtime.ready:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unavailable", "reason": not_ready_reason(runtime)}, 503)


def not_ready_reason(runtime: Runtime) -> str:
    if runtime.shutting_down:
        return "shutting down"
    if not runtime.pool.any_alive():
        polled = ", ".join(runtime.pool.workers) or "none configured"
        return f"no FastChat worker answers yet (polled: {polled})"
    return "not registered with any DB-GPT controller yet"


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_runtime(request).metrics.render(), media_type=CONTENT_TYPE)


class _Rejected(HTTPException):
    """Raised from ``receive`` when a streamed body outgrows the limit. FastAPI re-raises
    HTTPExceptions met while reading a body, so the app's handler (see ``mount``) answers it;
    the middleware answers it itself for an app without that handler."""


def rejection(
    path: str, status: int, message: str, headers: dict[str, str] | None = None
) -> Response:
    """A 400/401/413 answer: ``{"detail"}``, or one ModelOutput error frame on the stream
    route."""
    if path == STREAM_PATH:
        body = encode_frame(error_output(_FRAME_CODES[status], message).to_wire())
    else:
        body = json.dumps({"detail": message}).encode()
    # The body is left unread (or framed ambiguously): close the connection, never reuse it.
    extra = {"connection": "close"} if status in (400, 413) else {}
    return Response(body, status, {**extra, **(headers or {})}, "application/json")


def ambiguous_length_answer(path: str) -> bytes:
    """The guard's answer to Content-Length with Transfer-Encoding, whole on the wire, for a
    server whose parser refuses such a request itself (adapter/connections.py)."""
    response = rejection(path, 400, _AMBIGUOUS_LENGTH)
    head = b"".join(b"%s: %s\r\n" % pair for pair in response.raw_headers)
    return b"HTTP/1.1 400 Bad Request\r\n" + head + b"\r\n" + bytes(response.body)


_FRAME_CODES: Final = {
    400: ErrorCode.VALIDATION_TYPE_ERROR,
    401: ErrorCode.INVALID_AUTH_KEY,
    413: ErrorCode.PARAM_OUT_OF_RANGE,
}
_AMBIGUOUS_LENGTH: Final = (
    "the request has both Content-Length and Transfer-Encoding: refused (RFC 9112 §6.1); "
    "send one of them"
)


class GuardMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, api_key: str | None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        headers = dict(scope.get("headers") or ())
        if b"content-length" in headers and b"transfer-encoding" in headers:
            await rejection(path, 400, _AMBIGUOUS_LENGTH)(scope, receive, send)
            return
        if self._key is not None and path.startswith(WORKER_API_PREFIX):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._key):
                message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
                response = rejection(path, 401, message, {"www-authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        limit = self.max_body_bytes
        too_large = f"request body exceeds the limit of {limit} bytes (max_body_bytes)"
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await rejection(path, 413, too_large)(scope, receive, send)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _Rejected(413, too_large)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _Rejected as exc:
            if not started:  # else the route answered before reading it all: nothing to add
                await rejection(path, exc.status_code, exc.detail)(scope, receive, send)


async def _handle_rejected(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _Rejected)
    return rejection(request.url.path, exc.status_code, exc.detail)


def mount(app: FastAPI, settings: Settings) -> None:
    """Probes and metrics routes; the guard; the access log as the outermost layer."""
    app.include_router(router)
    app.add_exception_handler(_Rejected, _handle_rejected)
    app.add_middleware(
        GuardMiddleware, max_body_bytes=settings.max_body_bytes, api_key=settings.api_key
    )
    app.add_middleware(AccessLogMiddleware)  # added last = outermost: it sees 401s and 413s
