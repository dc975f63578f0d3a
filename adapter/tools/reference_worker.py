"""A FastChat-protocol worker around a scripted model, for demos, self-tests and benchmarks.

On the wire it behaves like FastChat 0.2.36's ``model_worker`` (docs/protocol.md §1): POST-only
routes, NUL-framed JSON with ``json.dumps`` defaults and no Content-Type, cumulative text, the
chunk cadence and the extra final chunk, ``completion_tokens`` one short, a semaphore of
``limit_worker_concurrency`` slots whose holders and waiters make up ``queue_length``. The model
is ``adapter.tools.scripted_model.ScriptedModel``, so every reply can be predicted by a test.

Where FastChat would wedge itself, this worker does not (the differences, all deliberate):

- **No slot ever leaks.** A request that crashes FastChat's generator (missing ``prompt``, a
  ``null`` number, ``max_new_tokens`` 0) still ends the same way on the wire (the stream body
  stops without a chunk, ``/worker_generate`` answers 500) but its slot is released. Bad
  embeddings input answers 500 without taking a slot for good.
- **Disconnects.** A streaming client that goes away stops generation at once and frees its slot.
  A client that leaves while *queued* keeps its place until its turn, then frees it immediately.
- **Echo and stop strings.** With echo on, the stop-string search starts after the re-decoded
  prompt (FastChat starts at ``len(prompt)`` of the raw prompt, which is usually the same place).
- **Embeddings** are hash-based and independent of the batch they come in.
- **``route_by_model``** (off by default, like ``model_worker``, which ignores ``model``) makes
  it answer 500 to an unknown or missing ``model`` like ``multi_model_worker``, but before any
  slot is taken. All names share one model, one template and one semaphore.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import struct
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from adapter.tools.scripted_model import (
    DEFAULT_SCRIPT,
    BrokenRequest,
    GenerationParams,
    InBandError,
    ScriptedModel,
    ScriptedReply,
    encode_frame,
    error_chunk,
    generation_steps,
    load_replies,
    parse_generation_params,
)

__all__ = [
    "ReferenceWorkerConfig",
    "add_reference_worker_arguments",
    "config_from_args",
    "create_app",
    "serve",
    "vicuna_v1_1_template",
]

logger = logging.getLogger(__name__)


def vicuna_v1_1_template() -> dict[str, Any]:
    """The template JSON a 0.2.36 worker serves for a Vicuna model (docs/protocol.md §1.9)."""
    return {
        "name": "vicuna_v1.1",
        "system_template": "{system_message}",
        "system_message": "A chat between a curious user and an artificial intelligence "
        "assistant. The assistant gives helpful, detailed, and polite answers to the user's "
        "questions.",
        "roles": ["USER", "ASSISTANT"],
        "messages": [],
        "offset": 0,
        "sep_style": 2,
        "sep": " ",
        "sep2": "</s>",
        "stop_str": None,
        "stop_token_ids": None,
    }


@dataclass(frozen=True)
class ReferenceWorkerConfig:
    """Every setting of the reference worker. Treat ``conv_template`` as read-only."""

    model_names: tuple[str, ...] = ("reference-model",)
    route_by_model: bool = False
    """Answer 500 when ``model`` is not one of ``model_names`` (multi_model_worker style)."""
    context_length: int = 2048
    limit_worker_concurrency: int = 5
    stream_interval: int = 2
    tokens_per_second: float = 0.0
    """Pace of generation after the first token; 0 means as fast as possible."""
    first_token_delay: float = 0.0
    """Seconds before the first token (the prefill), counted after the slot is taken."""
    conv_template: dict[str, Any] = field(default_factory=vicuna_v1_1_template)
    embedding_dim: int = 16
    script: tuple[str, ...] = DEFAULT_SCRIPT
    seed: int = 0
    eos_after: int | None = None
    """The model ends its turn with EOS after this many words; None: only length or stop."""
    in_order: bool = False
    """Every reply is the script from its first word (see ``ScriptedModel.in_order``)."""
    replies: tuple[ScriptedReply, ...] = ()
    """Canned answers by prompt pattern (``--replies FILE``), tried before ``in_order``."""

    def __post_init__(self) -> None:
        if not self.model_names or not all(self.model_names):
            raise ValueError("model_names must be non-empty names")
        for name in ("context_length", "limit_worker_concurrency", "stream_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.embedding_dim < 1:
            raise ValueError("embedding_dim must be >= 1")
        if self.tokens_per_second < 0 or self.first_token_delay < 0:
            raise ValueError("tokens_per_second and first_token_delay must be >= 0")
        _ = self.model  # validates script, seed and eos_after now

    @property
    def model(self) -> ScriptedModel:
        return ScriptedModel(
            self.script,
            self.seed,
            self.context_length,
            self.eos_after,
            self.in_order,
            self.replies,
        )


class _ConcurrencyGate:
    """FastChat's worker semaphore, counted the way ``/worker_get_status`` reports it."""

    def __init__(self, limit: int) -> None:
        self._semaphore = asyncio.Semaphore(limit)
        self._waiting = 0
        self._holding = 0

    @property
    def queue_length(self) -> int:
        return self._waiting + self._holding

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            self._semaphore.release()


class _RawResponse(Response):
    """Gives the raw ASGI channel to ``run``, which owns the whole response from the first byte.

    A stream must take its slot before the headers, watch for the client leaving and release
    the slot however it ends; StreamingResponse cannot express the first or the last of these.
    """

    def __init__(self, run: Callable[[Receive, Send], Awaitable[None]]) -> None:
        self.status_code = 200
        self.background = None
        self._run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._run(receive, send)
        if self.background is not None:
            await self.background()


_Parsed = GenerationParams | InBandError | BrokenRequest
"""A generation request as FastChat's worker would take it: valid, or failing one of two ways."""


class _InternalError(Exception):
    """Answered as FastChat's uncaught exceptions are: 500 text/plain."""


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


class _Worker:
    """One app's state: the config, the model and one semaphore per event loop.

    The semaphore is made lazily, as FastChat does, and per loop because a test server that
    restarts serves the same app from a fresh loop (a restarted worker starts with no queue).
    """

    def __init__(self, config: ReferenceWorkerConfig) -> None:
        self.config = config
        self.model = config.model
        self._gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _ConcurrencyGate]
        self._gates = weakref.WeakKeyDictionary()

    def gate(self) -> _ConcurrencyGate:
        loop = asyncio.get_running_loop()
        if loop not in self._gates:
            self._gates[loop] = _ConcurrencyGate(self.config.limit_worker_concurrency)
        return self._gates[loop]

    async def read_body(self, request: Request) -> Any:
        """The JSON body, checked against ``model_names`` when routing by model."""
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise _InternalError("invalid JSON") from exc
        if self.config.route_by_model and not (
            isinstance(body, dict) and body.get("model") in self.config.model_names
        ):
            raise _InternalError("unknown model")
        return body

    def pace(self, prompt: str) -> tuple[float, float]:
        """(first_token_delay, tokens_per_second) for this prompt: a scripted reply's own, where
        it sets them, else the worker's."""
        scripted = self.model.scripted_reply(prompt)
        first, tps = self.config.first_token_delay, self.config.tokens_per_second
        if scripted is not None:
            if scripted.first_token_delay is not None:
                first = scripted.first_token_delay
            if scripted.tokens_per_second is not None:
                tps = scripted.tokens_per_second
        return first, tps

    async def _pause(
        self, index: int, gone: asyncio.Event | None, pace: tuple[float, float]
    ) -> bool:
        """Spend the time token ``index`` takes; True if the client went away meanwhile."""
        first, tps = pace
        delay = first if index == 0 else (1 / tps if tps else 0.0)
        if gone is None:
            await asyncio.sleep(delay)
            return False
        if delay <= 0:
            await asyncio.sleep(0)  # let other streams and the disconnect watcher run
            return gone.is_set()
        try:
            await asyncio.wait_for(gone.wait(), delay)
        except asyncio.TimeoutError:
            return False
        return True

    async def stream(self, parsed: _Parsed, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(_watch_disconnect(receive, gone))
        try:
            async with self.gate().slot():
                await send({"type": "http.response.start", "status": 200, "headers": []})
                if isinstance(parsed, BrokenRequest):
                    # Returning before the body ends makes uvicorn drop the connection, which
                    # is what a crashed FastChat generator looks like to the client.
                    logger.warning("generation crashed like FastChat's would: %s", parsed)
                    return
                if isinstance(parsed, InBandError):
                    frame = encode_frame(error_chunk(str(parsed)))
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                else:
                    steps = generation_steps(self.model, parsed, self.config.stream_interval)
                    pace = self.pace(parsed.prompt)
                    for index, step in enumerate(steps):
                        if not step.final and await self._pause(index, gone, pace):
                            return  # the client left: stop generating, free the slot
                        if step.chunk is not None:
                            frame = encode_frame(step.chunk)
                            body = {"type": "http.response.body", "body": frame, "more_body": True}
                            await send(body)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def generate(self, parsed: _Parsed) -> Response:
        async with self.gate().slot():
            if isinstance(parsed, BrokenRequest):
                logger.warning("generation crashed like FastChat's would: %s", parsed)
                return _internal_error()
            if isinstance(parsed, InBandError):
                return JSONResponse(error_chunk(str(parsed)))
            last: dict[str, Any] = {}
            steps = generation_steps(self.model, parsed, self.config.stream_interval)
            pace = self.pace(parsed.prompt)
            for index, step in enumerate(steps):
                if not step.final:
                    await self._pause(index, None, pace)
                last = step.chunk or last
            return JSONResponse(last)

    async def embed(self, body: Any) -> Response:
        inputs = body.get("input") if isinstance(body, dict) else None
        if not (isinstance(inputs, list) and inputs and all(isinstance(t, str) for t in inputs)):
            raise _InternalError("input must be a non-empty list of strings")
        dim = self.config.embedding_dim
        async with self.gate().slot():
            vectors: list[Any] = [self.model.embed(text, dim) for text in inputs]
            if body.get("encoding_format") == "base64":
                vectors = [base64.b64encode(struct.pack(f"<{dim}f", *v)).decode() for v in vectors]
            token_num = sum(self.model.count_tokens(text) for text in inputs)
            return JSONResponse({"embedding": vectors, "token_num": token_num})


def _internal_error() -> Response:
    return PlainTextResponse("Internal Server Error", status_code=500)


def _parse(body: Any) -> _Parsed:
    try:
        return parse_generation_params(body)
    except (InBandError, BrokenRequest) as exc:
        return exc


def create_app(config: ReferenceWorkerConfig | None = None) -> FastAPI:
    """The worker as an ASGI app; serve it with any server (see ``serve``)."""
    worker = _Worker(config or ReferenceWorkerConfig())
    app = FastAPI(title="fastchat-adapter reference worker")

    async def on_internal_error(request: Request, exc: Exception) -> Response:
        return _internal_error()

    app.add_exception_handler(_InternalError, on_internal_error)

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Response:
        parsed = _parse(await worker.read_body(request))
        return _RawResponse(lambda receive, send: worker.stream(parsed, receive, send))

    @app.post("/worker_generate")
    async def worker_generate(request: Request) -> Response:
        return await worker.generate(_parse(await worker.read_body(request)))

    @app.post("/worker_get_embeddings")
    async def worker_get_embeddings(request: Request) -> Response:
        return await worker.embed(await worker.read_body(request))

    @app.post("/worker_get_status")
    async def worker_get_status() -> Response:
        names = list(worker.config.model_names)
        queue_length = worker.gate().queue_length
        return JSONResponse({"model_names": names, "speed": 1, "queue_length": queue_length})

    @app.post("/count_token")
    async def count_token(request: Request) -> Response:
        body = await worker.read_body(request)
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str):
            raise _InternalError("prompt must be a string")
        return JSONResponse({"count": worker.model.count_tokens(prompt), "error_code": 0})

    @app.post("/worker_get_conv_template")
    async def worker_get_conv_template(request: Request) -> Response:
        if worker.config.route_by_model:
            await worker.read_body(request)
        return JSONResponse({"conv": worker.config.conv_template})

    @app.post("/model_details")
    async def model_details(request: Request) -> Response:
        if worker.config.route_by_model:
            await worker.read_body(request)
        return JSONResponse({"context_length": worker.config.context_length})

    return app


def serve(config: ReferenceWorkerConfig, host: str, port: int) -> None:
    """Run the worker with uvicorn until interrupted."""
    uvicorn.run(create_app(config), host=host, port=port, log_level="info")


def _at_least(kind: type[int] | type[float], minimum: int) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


_positive, _count, _non_negative = _at_least(int, 1), _at_least(int, 0), _at_least(float, 0)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty model name in {text!r}")
    return names


def _words(text: str) -> tuple[str, ...]:
    words = tuple(text.split())
    if not words:
        raise argparse.ArgumentTypeError("the script needs at least one word")
    return words


def _replies(path: str) -> tuple[ScriptedReply, ...]:
    try:
        return load_replies(path)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc}") from exc


def _template(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("conv"), dict):
        data = data["conv"]  # a saved /worker_get_conv_template reply works as well
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"{path} does not hold a JSON object")
    return data


def add_reference_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``reference-worker`` command's options (FastChat's names where FastChat has one)."""
    default = ReferenceWorkerConfig()
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=21002)
    add(
        "--model-names",
        type=_names,
        default=default.model_names,
        help="comma-separated names the worker reports",
    )
    add(
        "--route-by-model",
        action="store_true",
        help="answer 500 to an unknown model, like multi_model_worker",
    )
    add("--context-length", type=_positive, default=default.context_length)
    add("--limit-worker-concurrency", type=_positive, default=default.limit_worker_concurrency)
    add("--stream-interval", type=_positive, default=default.stream_interval)
    add(
        "--tokens-per-second",
        type=_non_negative,
        default=default.tokens_per_second,
        help="generation pace after the first token; 0 = as fast as possible",
    )
    add(
        "--first-token-delay",
        type=_non_negative,
        default=default.first_token_delay,
        help="seconds before the first token",
    )
    add(
        "--conv-template-file",
        type=_template,
        default=None,
        dest="conv_template",
        help="JSON file with the conversation template to serve (default: vicuna_v1.1)",
    )
    add("--embedding-dim", type=_positive, default=default.embedding_dim)
    add("--seed", type=int, default=default.seed)
    add("--eos-after", type=_count, default=None, help="end every reply with EOS after N words")
    add(
        "--script",
        type=_words,
        default=default.script,
        help="the model's words, separated by spaces (distinct, e.g. '<think> hmm </think> 42')",
    )
    add(
        "--in-order",
        action="store_true",
        help="reply with the script from its first word, whatever the prompt",
    )
    add(
        "--replies",
        type=_replies,
        default=(),
        metavar="FILE",
        help="TOML or JSON file of scripted replies by prompt pattern (see README)",
    )


def config_from_args(ns: argparse.Namespace) -> ReferenceWorkerConfig:
    """The config for options added by ``add_reference_worker_arguments``: every option is
    named after the config field it sets."""
    values = {f.name: getattr(ns, f.name) for f in fields(ReferenceWorkerConfig)}
    values["conv_template"] = ns.conv_template or vicuna_v1_1_template()
    return ReferenceWorkerConfig(**values)
