"""DB-GPT's worker API (``/api/worker/*``, docs/protocol.md §6, §9) from FastChat workers.

| route | answer |
|---|---|
| ``POST generate_stream`` | NUL-terminated ModelOutput frames, HTTP 200, errors in-band |
| ``POST generate`` | one ModelOutput, HTTP 200, errors as a ModelOutput with ``error_code`` |
| ``POST embeddings`` | bare ``[[float]]`` in input order (``embeddings``) |
| ``POST count_token`` | bare int; ``model`` may be missing when one LLM is served |
| ``POST model_metadata`` | ModelMetadata, the cross-version key set |
| ``GET models/supports`` | ``[{"host", "port", "models": [SupportedModel…]}]`` |
| ``POST apply`` | ``{"message", "success", "timecost"}``: start / stop / restart (registration) |
| ``GET parameter/descriptions`` | ``[ParameterDescription…]`` of one model |
| ``POST models/startup``, ``models/shutdown`` | ``WorkerApplyOutput``; 404 for a model not served |

HTTP statuses other than 200: **422** for a body that does not parse, naming the field (on the
stream route the 422 body is one NUL-terminated ModelOutput error frame, as every answer of
that route is, because DB-GPT's stream reader ignores the status and would otherwise show an
empty answer); **404** for a model no live worker serves; **400** for ``count_token`` without
a model when several are served; **500** when a FastChat worker fails; **501** for what
FastChat cannot do (rerank). DB-GPT's clients raise on these with our ``detail`` in the message
(§6.3). ``start``, ``stop`` and ``restart`` act on the registration only (adapter/model_control.py).

Every route is declared with ``@_worker_route``, the one place that reads and parses the body,
makes the request's ``Tracker`` and maps errors to answers: ``InvalidRequest`` -> 422,
``NoWorker`` -> 404, ``Refused`` -> its status, ``UpstreamError`` -> 500. Handlers only raise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from adapter.embeddings import embed
from adapter.errors import NoWorker, Refused, UpstreamError
from adapter.model_control import apply_action, parameter_descriptions
from adapter.pool import WorkerKind
from adapter.relay import Relay, frame
from adapter.streaming import FrameStreamResponse, wait_for_disconnect
from adapter.tracking import Tracker
from protocol import strict_json
from protocol.dbgpt import (
    CountTokenRequest,
    EmbeddingsRequest,
    ModelMetadataRequest,
    PromptRequest,
    SupportedModel,
    WorkerApplyOutput,
    WorkerApplyRequest,
    WorkerStartupRequest,
    WorkerSupportedModel,
)
from protocol.errors import InvalidMessage, InvalidRequest
from protocol.translate import error_output, model_metadata

if TYPE_CHECKING:
    from adapter.runtime import Runtime

__all__ = ["StreamLane", "router"]

_Wire = TypeVar("_Wire")
Handler = Callable[["Runtime", _Wire, Tracker], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]

_KINDS: tuple[WorkerKind, ...] = ("llm", "text2vec")
STREAM_ROUTE = "generate_stream"
STREAM_PATH = "/api/worker/generate_stream"

router = APIRouter(prefix="/api/worker", tags=["DB-GPT worker API"])

NO_RERANK = "rerank is not supported: FastChat workers have no rerank API"


# --- the one place that parses, tracks and maps errors ------------------------------------


def _worker_route(
    route: str,
    parse: Callable[[Any], _Wire] | None,
    *,
    lenient: bool = False,
    query: bool = False,
) -> Callable[[Handler[_Wire]], Endpoint]:
    """Wrap ``handler(runtime, parsed, tracker)`` into an endpoint. ``parse`` is the body's
    ``from_wire`` (``None`` for a route without a body), or with ``query`` the query string's
    (a dict of its parameters: DB-GPT's GET routes take theirs there); ``lenient`` routes are
    answered whatever the body, with ``None`` for one that does not parse. The tracker is
    closed here when the response is made, except for a ``FrameStreamResponse``, which closes
    it when the stream ends (the handler hands it ``tracker.done``). A non-stream handler is
    cancelled the moment the client leaves (its upstream calls with it), counted
    ``client_gone``."""

    def decorate(handler: Handler[_Wire]) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            runtime: Runtime = request.app.state.runtime
            body: Any = None
            parsed: Any = None
            error: InvalidRequest | None = None
            try:
                if parse is not None:
                    body = dict(request.query_params) if query else await _body(request)
                    parsed = parse(body)
            except InvalidRequest as exc:
                error = None if lenient else exc
            except ClientDisconnect:  # left (or timed out) before its body was complete
                return Response(status_code=400)  # nobody is left to read it
            tracker = Tracker(runtime, route, _model_of(body), streams=route == STREAM_ROUTE)
            try:
                if error is not None:
                    raise error
                answer = handler(runtime, parsed, tracker)
                response: Response | None
                if route == STREAM_ROUTE:  # returns at once; the stream watches for itself
                    response = await answer
                else:
                    response = await _unless_client_leaves(answer, request.receive)
                if response is None:
                    tracker.done("client_gone")
                    return Response(status_code=499)  # never sent: the client is gone
            except (InvalidRequest, NoWorker, Refused, UpstreamError) as exc:
                response = _error_response(route, tracker, exc)
            except BaseException:
                tracker.done("error")
                raise
            if not isinstance(response, FrameStreamResponse):
                tracker.done(tracker.outcome)
            return response

        endpoint.__name__ = handler.__name__
        endpoint.__doc__ = handler.__doc__
        return endpoint

    return decorate


def _error_response(route: str, tracker: Tracker, exc: Exception) -> Response:
    """A refusal is the caller's mistake (counted ``rejected``); a worker failure is ours."""
    tracker.outcome = "rejected"
    tracker.error_code = getattr(exc, "error_code", 0)
    if isinstance(exc, InvalidRequest):
        if route == STREAM_ROUTE:  # DB-GPT's stream reader ignores the status: say it in-band
            rejection = frame(error_output(exc.error_code, f"invalid request: {exc}"))
            return Response(rejection, 422, media_type="application/json")
        return _invalid(exc)
    if isinstance(exc, NoWorker):
        return _detail(404, str(exc))
    if isinstance(exc, Refused):
        return _detail(exc.status, str(exc))
    tracker.outcome = "error"
    return _detail(500, str(exc))


async def _body(request: Request) -> Any:
    # Strict: NaN, lone surrogates and runaway nesting are refused like any malformed body.
    return strict_json.loads(await request.body())


async def _unless_client_leaves(answer: Awaitable[Response], receive: Receive) -> Response | None:
    """``answer``'s response, or ``None`` (``answer`` cancelled) if the client leaves first.
    The body has been read, so the next ASGI message is the disconnect (as in ``streaming``)."""
    work = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, gone):
            task.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
    return work.result() if not work.cancelled() else None


def _model_of(body: Any) -> object:
    return body.get("model") if isinstance(body, dict) else None


def _detail(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status)


def _invalid(exc: InvalidMessage) -> JSONResponse:
    """FastAPI's own 422 shape, so tools that read it find the field in ``loc``."""
    path = [int(p) if p.isdigit() else p for p in exc.field.split(".") if p]
    error = {"type": "invalid_request", "loc": ["body", *path], "msg": exc.reason}
    return JSONResponse({"detail": [error]}, 422)


def _as_is(body: Any) -> Any:
    return body


# --- generation -------------------------------------------------------------------------


@router.post("/generate_stream")
@_worker_route(STREAM_ROUTE, PromptRequest.from_wire)
async def generate_stream(runtime: Runtime, prompt: PromptRequest, tracker: Tracker) -> Response:
    relay = Relay(runtime, prompt, tracker)
    return FrameStreamResponse(
        relay.stream,
        keepalive_interval=runtime.settings.keepalive_interval,
        on_done=tracker.done,
        going_away=runtime.going_away,
    )


@router.post("/generate")
@_worker_route("generate", PromptRequest.from_wire)
async def generate(runtime: Runtime, prompt: PromptRequest, tracker: Tracker) -> Response:
    output, tracker.outcome = await Relay(runtime, prompt, tracker).generate()
    return JSONResponse(output.to_wire())


# --- embeddings, count_token, model_metadata ----------------------------------------------


@router.post("/embeddings")
@_worker_route("embeddings", EmbeddingsRequest.from_wire)
async def embeddings(runtime: Runtime, request: EmbeddingsRequest, tracker: Tracker) -> Response:
    if request.is_rerank:
        raise Refused(501, NO_RERANK)
    return JSONResponse(await embed(runtime, request, tracker))


@router.post("/count_token")
@_worker_route("count_token", CountTokenRequest.from_wire)
async def count_token(runtime: Runtime, request: CountTokenRequest, tracker: Tracker) -> Response:
    if request.model is not None:
        return JSONResponse(await _count_tokens(runtime, request.model, request.prompt))
    # DB-GPT's own client names no model (docs/protocol.md §6.3); its app counts to trim chat
    # history under a limit, so with several models served the largest count is the safe one.
    served = runtime.pool.all_names("llm")
    if not served:
        raise Refused(400, "no model given and none is served")
    counts = [await _count_tokens(runtime, name, request.prompt) for name in served]
    return JSONResponse(max(counts))


async def _count_tokens(runtime: Runtime, model: str, prompt: str) -> int:
    route = await runtime.pool.resolve_first(model, ("llm", "text2vec"), takes_slot=False)
    return await runtime.client.count_token(route.worker, route.model, prompt)


@router.post("/model_metadata")
@_worker_route("model_metadata", ModelMetadataRequest.from_wire)
async def model_metadata_route(
    runtime: Runtime, request: ModelMetadataRequest, tracker: Tracker
) -> Response:
    route = await runtime.pool.resolve(request.model, "llm", takes_slot=False)
    info = await runtime.pool.model_info(route)
    metadata = model_metadata(request.model, info.context_length, info.conv)
    return JSONResponse(metadata.to_wire())


# --- worker manager routes: what FastChat cannot do -------------------------------------


@router.get("/models/supports")
@_worker_route("models_supports", None)
async def models_supports(runtime: Runtime, _: None, tracker: Tracker) -> Response:
    pool, settings = runtime.pool, runtime.settings
    models = [
        SupportedModel(
            model=name, worker_type=kind, params=parameter_descriptions(runtime, name, kind)
        )
        for kind in _KINDS
        for name in pool.all_names(kind)
    ]
    entry = WorkerSupportedModel(host=settings.advertised_host, port=settings.port, models=models)
    return JSONResponse([entry.to_wire()])


@router.post("/apply")
@_worker_route("apply", WorkerApplyRequest.from_wire, lenient=True)
async def apply(runtime: Runtime, asked: WorkerApplyRequest | None, tracker: Tracker) -> Response:
    # Answered whatever the body: the CLI parses only the reply.
    if asked is None:
        output = WorkerApplyOutput(
            message="the request is not a worker apply request", success=False
        )
    else:
        output = await apply_action(runtime, asked.apply_type, asked.model, asked.worker_type)
    if not output.success:
        tracker.outcome = "rejected"
    return JSONResponse(output.to_wire())


@router.get("/parameter/descriptions")
@_worker_route("parameter_descriptions", _as_is, lenient=True, query=True)
async def parameter_descriptions_route(
    runtime: Runtime, query: dict[str, str], tracker: Tracker
) -> Response:
    kind: WorkerKind = "text2vec" if query.get("worker_type") == "text2vec" else "llm"
    described = parameter_descriptions(runtime, query.get("model", ""), kind)
    return JSONResponse([d.to_wire() for d in described])


@router.post("/models/startup")
@_worker_route("models_startup", WorkerStartupRequest.from_wire)
async def models_startup(
    runtime: Runtime, asked: WorkerStartupRequest, tracker: Tracker
) -> Response:
    return _startup_reply(await apply_action(runtime, "start", asked.model, asked.worker_type))


@router.post("/models/shutdown")
@_worker_route("models_shutdown", WorkerStartupRequest.from_wire)
async def models_shutdown(
    runtime: Runtime, asked: WorkerStartupRequest, tracker: Tracker
) -> Response:
    output = await apply_action(
        runtime, "stop", asked.model, asked.worker_type, remove=asked.delete_after
    )
    return _startup_reply(output)


def _startup_reply(output: WorkerApplyOutput) -> Response:
    """DB-GPT's client prints nothing of a 200 reply, and raises with the body of any other:
    a model we do not serve is a 404 whose message says so."""
    if not output.success:
        raise Refused(404, output.message)
    return JSONResponse(output.to_wire())


# --- the stream route's own lane ----------------------------------------------------------


class StreamLane:
    """ASGI middleware, innermost of ours: ``POST /api/worker/generate_stream`` goes straight to
    its endpoint (the same function the router calls), past Starlette's exception layer,
    FastAPI's exit stack and the route matching: about a tenth of the adapter's CPU per
    request (py-spy, bench/relay.py), on the route every token of a deployment goes through.
    The access log and the guard (API key, body limit) still wrap it; an unexpected error still
    reaches Starlette's error middleware (500). Anything else, and this route under a
    ``root_path``, takes the router as before."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == STREAM_PATH
            and scope["method"] == "POST"
            and not scope.get("root_path")
        ):
            response = await generate_stream(Request(scope, receive))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
