"""DB-GPT's worker API (``/api/worker/*``, PROTOCOLS.md §6 and §9), served from FastChat workers.

| route | answer |
|---|---|
| ``POST generate_stream`` | NUL-terminated ModelOutput frames, HTTP 200, errors in-band |
| ``POST generate`` | one ModelOutput, HTTP 200, errors as a ModelOutput with ``error_code`` |
| ``POST embeddings`` | bare ``[[float]]`` in input order (``embeddings``) |
| ``POST count_token`` | bare int; ``model`` may be missing when one LLM is served |
| ``POST model_metadata`` | ModelMetadata, the cross-version key set |
| ``GET models/supports`` | ``[{"host", "port", "models": [SupportedModel…]}]`` |
| ``POST apply`` | ``{"message", "success": false, "timecost": 0}`` |
| ``GET parameter/descriptions`` | ``[]`` |
| ``POST models/startup``, ``models/shutdown`` | 501 ``{"detail"}`` |

HTTP statuses other than 200: **422** for a body that does not parse, naming the field (on the
stream route the 422 body is one NUL-terminated ModelOutput error frame, as every answer of
that route is, because DB-GPT's stream reader ignores the status and would otherwise show an
empty answer); **404** for a model no live worker serves; **400** for ``count_token`` without
a model when several are served; **500** when a FastChat worker fails; **501** for what
FastChat cannot do (rerank, starting or stopping models). DB-GPT's clients raise on these with
our ``detail`` in the message (§6.3).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from adapter.embeddings import embed
from adapter.pool import NoWorker, WorkerKind
from adapter.relay import Relay, frame
from adapter.streaming import FrameStreamResponse
from adapter.tracking import Tracker
from adapter.upstream import UpstreamError
from protocol.dbgpt import (
    CountTokenRequest,
    EmbeddingsRequest,
    ModelMetadataRequest,
    PromptRequest,
    SupportedModel,
    WorkerApplyOutput,
    WorkerApplyRequest,
    WorkerSupportedModel,
)
from protocol.errors import InvalidMessage, InvalidRequest
from protocol.translate import error_output, model_metadata

if TYPE_CHECKING:
    from adapter.runtime import Runtime

__all__ = ["router"]

_Wire = TypeVar("_Wire")
_KINDS: tuple[WorkerKind, ...] = ("llm", "text2vec")

router = APIRouter(prefix="/api/worker", tags=["DB-GPT worker API"])

NO_LIFECYCLE = (
    "FastChat workers have no lifecycle API: start, stop or restart the FastChat worker "
    "process itself; fastchat-adapter picks the change up from its status within seconds"
)
NO_RERANK = "rerank is not supported: FastChat workers have no rerank API"


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def _body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise InvalidRequest(f"the body is not JSON: {exc}") from None


def _model_of(body: Any) -> object:
    return body.get("model") if isinstance(body, dict) else None


def _detail(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status)


def _invalid(exc: InvalidMessage) -> JSONResponse:
    """FastAPI's own 422 shape, so tools that read it find the field in ``loc``."""
    path = [int(p) if p.isdigit() else p for p in exc.field.split(".") if p]
    error = {"type": "invalid_request", "loc": ["body", *path], "msg": exc.reason}
    return JSONResponse({"detail": [error]}, 422)


def _failed(tracker: Tracker, exc: NoWorker | UpstreamError) -> JSONResponse:
    """An unknown model is the caller's mistake (404, rejected); a worker failure is ours (500)."""
    if isinstance(exc, NoWorker):
        tracker.outcome = "rejected"
        return _detail(404, str(exc))
    tracker.outcome = "error"
    return _detail(500, str(exc))


async def _parse(
    request: Request, route: str, parse: Callable[[Any], _Wire]
) -> _Wire | InvalidRequest:
    """The body through ``parse`` (a ``from_wire``), or the error naming the bad field,
    counted as a rejected request."""
    body: Any = None
    try:
        body = await _body(request)
        return parse(body)
    except InvalidRequest as exc:
        Tracker(_runtime(request), route, _model_of(body)).done("rejected")
        return exc


# --- generation -------------------------------------------------------------------------


@router.post("/generate_stream")
async def generate_stream(request: Request) -> Response:
    runtime = _runtime(request)
    prompt = await _parse(request, "generate_stream", PromptRequest.from_wire)
    if isinstance(prompt, InvalidRequest):
        rejection = frame(error_output(prompt.error_code, f"invalid request: {prompt}"))
        return Response(rejection, 422, media_type="application/json")
    tracker = Tracker(runtime, "generate_stream", prompt.model)
    relay = Relay(runtime, prompt, tracker)
    return FrameStreamResponse(
        relay.stream,
        keepalive_interval=runtime.settings.keepalive_interval,
        on_done=tracker.done,
    )


@router.post("/generate")
async def generate(request: Request) -> Response:
    runtime = _runtime(request)
    prompt = await _parse(request, "generate", PromptRequest.from_wire)
    if isinstance(prompt, InvalidRequest):
        return _invalid(prompt)
    with Tracker(runtime, "generate", prompt.model) as tracker:
        output, tracker.outcome = await Relay(runtime, prompt, tracker).generate()
        return JSONResponse(output.to_wire())


# --- embeddings, count_token, model_metadata ----------------------------------------------


@router.post("/embeddings")
async def embeddings(request: Request) -> Response:
    runtime = _runtime(request)
    parsed = await _parse(request, "embeddings", EmbeddingsRequest.from_wire)
    if isinstance(parsed, InvalidRequest):
        return _invalid(parsed)
    with Tracker(runtime, "embeddings", parsed.model) as tracker:
        if parsed.is_rerank:
            tracker.outcome = "rejected"
            return _detail(501, NO_RERANK)
        try:
            vectors = await embed(runtime, parsed, tracker)
        except (NoWorker, UpstreamError) as exc:
            return _failed(tracker, exc)
        return JSONResponse(vectors)


@router.post("/count_token")
async def count_token(request: Request) -> Response:
    runtime = _runtime(request)
    parsed = await _parse(request, "count_token", CountTokenRequest.from_wire)
    if isinstance(parsed, InvalidRequest):
        return _invalid(parsed)
    pool = runtime.pool
    with Tracker(runtime, "count_token", parsed.model) as tracker:
        served = pool.all_names("llm")
        if parsed.model is None and len(served) != 1:
            tracker.outcome = "rejected"
            listed = ", ".join(served) or "none"
            return _detail(400, f"no model given and {len(served)} are served ({listed})")
        model = parsed.model or served[0]
        try:
            route = await pool.resolve_first(model, ("llm", "text2vec"), takes_slot=False)
            count = await runtime.client.count_token(route.worker, route.model, parsed.prompt)
        except (NoWorker, UpstreamError) as exc:
            return _failed(tracker, exc)
        return JSONResponse(count)


@router.post("/model_metadata")
async def model_metadata_route(request: Request) -> Response:
    runtime = _runtime(request)
    parsed = await _parse(request, "model_metadata", ModelMetadataRequest.from_wire)
    if isinstance(parsed, InvalidRequest):
        return _invalid(parsed)
    with Tracker(runtime, "model_metadata", parsed.model) as tracker:
        try:
            route = await runtime.pool.resolve(parsed.model, "llm", takes_slot=False)
            info = await runtime.pool.model_info(route)
        except (NoWorker, UpstreamError) as exc:
            return _failed(tracker, exc)
        metadata = model_metadata(parsed.model, info.context_length, info.conv)
        return JSONResponse(metadata.to_wire())


# --- worker manager routes: what FastChat cannot do -------------------------------------


@router.get("/models/supports")
async def models_supports(request: Request) -> Response:
    runtime = _runtime(request)
    with Tracker(runtime, "models_supports"):
        pool, settings = runtime.pool, runtime.settings
        models = [
            SupportedModel(model=name, worker_type=kind)
            for kind in _KINDS
            for name in pool.all_names(kind)
        ]
        entry = WorkerSupportedModel(
            host=settings.advertised_host, port=settings.port, models=models
        )
        return JSONResponse([entry.to_wire()])


@router.post("/apply")
async def apply(request: Request) -> Response:
    runtime = _runtime(request)
    body: Any = None
    try:
        body = await _body(request)
        asked = WorkerApplyRequest.from_wire(body)
        what = f"{asked.apply_type} of {asked.model}@{asked.worker_type}"
    except InvalidRequest:
        what = "this request"  # answered all the same: the CLI parses only the reply
    with Tracker(runtime, "apply", _model_of(body)) as tracker:
        tracker.outcome = "rejected"
        message = f"{what} is not supported: {NO_LIFECYCLE}"
        return JSONResponse(WorkerApplyOutput(message=message, success=False).to_wire())


@router.get("/parameter/descriptions")
async def parameter_descriptions(request: Request) -> Response:
    with Tracker(_runtime(request), "parameter_descriptions"):
        return JSONResponse([])


@router.post("/models/startup")
async def models_startup(request: Request) -> Response:
    return await _lifecycle(request, "models_startup", "starting a model")


@router.post("/models/shutdown")
async def models_shutdown(request: Request) -> Response:
    return await _lifecycle(request, "models_shutdown", "stopping a model")


async def _lifecycle(request: Request, route: str, what: str) -> Response:
    body: Any = None
    with contextlib.suppress(InvalidRequest):  # answered all the same
        body = await _body(request)
    with Tracker(_runtime(request), route, _model_of(body)) as tracker:
        tracker.outcome = "rejected"
        return _detail(501, f"{what} is not supported: {NO_LIFECYCLE}")
