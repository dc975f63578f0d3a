"""A fake FastChat worker for contract tests: the reference worker, plus records and faults.

The model, the NUL framing, the cumulative text, the semaphore and ``queue_length`` are the
reference worker's own (``adapter.tools.reference_worker``); this module only wraps its ASGI
app. The wrapper sees every request and every response message, so it can

- record each request (path and JSON body) for assertions: ``requests``, ``bodies(path)``;
- notice a client leaving mid-response: ``disconnects``, ``disconnected``,
  ``wait_for_disconnects()``;
- apply one armed fault per request: ``fail_next(fault, path=...)`` with a fault below;
- reshape streams like FastChat's vLLM worker: ``FakeWorker(flavor="vllm")``.

Faults (``after_chunks`` counts the chunks forwarded before the fault fires; if the stream has
fewer, it fires just before the body would end, except ``Abort``, which needs a chunk to mark):

- ``HttpError``: an HTTP error instead of the reply (500 JSON by default; any route).
- ``CloseMidStream``: drop the connection before the body ends.
- ``MalformedFrame``: slip a non-JSON frame into the stream, then carry on.
- ``NewlineFraming``: the whole stream delimited by ``\\n`` instead of NUL.
- ``Hang``: send nothing for ``seconds``, mid-stream or (``after_chunks=None``) before the
  headers (any route); a client that leaves ends the hang. ``slow_first_token`` is a ``Hang``
  after the headers and before the first chunk.
- ``ErrorChunk``: FastChat's in-band error chunk, then the body ends.
- ``NoFinalChunk``: the body ends cleanly, but without the chunk carrying ``finish_reason``.
- ``Abort``: the next chunk goes out with ``finish_reason: "abort"``, then the body ends (vLLM's
  abort; in the vLLM flavour the payload is sent twice, first with ``finish_reason: null``).

A server that is down is not a fault: ``stop()`` it (connections are refused) and ``restart()``
it on the same port. A TCP reset cannot be produced through ASGI; ``CloseMidStream`` closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from starlette.types import Message, Receive, Scope, Send

from adapter.tools.reference_worker import ReferenceWorkerConfig, create_app
from adapter.tools.scripted_model import ScriptedModel, encode_frame, error_chunk
from tests.support.servers import LoopbackServer

__all__ = [
    "Abort",
    "CloseMidStream",
    "ErrorChunk",
    "FakeWorker",
    "Fault",
    "Hang",
    "HttpError",
    "MalformedFrame",
    "NewlineFraming",
    "NoFinalChunk",
    "RecordedRequest",
    "StartFake",
    "slow_first_token",
]

STREAM = "/worker_generate_stream"


@dataclass(frozen=True)
class HttpError:
    status: int = 500
    body: bytes = b'{"detail":"injected failure"}'
    content_type: str = "application/json"


@dataclass(frozen=True)
class CloseMidStream:
    after_chunks: int = 1


@dataclass(frozen=True)
class MalformedFrame:
    after_chunks: int = 1
    payload: bytes = b'{"text": "half a fra'


@dataclass(frozen=True)
class NewlineFraming:
    pass


@dataclass(frozen=True)
class Hang:
    seconds: float
    after_chunks: int | None = 1


@dataclass(frozen=True)
class ErrorChunk:
    after_chunks: int = 0
    message: str = "boom"
    error_code: int = 50001


@dataclass(frozen=True)
class NoFinalChunk:
    pass


@dataclass(frozen=True)
class Abort:
    after_chunks: int = 1


Fault = (
    HttpError
    | CloseMidStream
    | MalformedFrame
    | NewlineFraming
    | Hang
    | ErrorChunk
    | NoFinalChunk
    | Abort
)


def slow_first_token(seconds: float) -> Hang:
    return Hang(seconds, after_chunks=0)


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    body: Any
    """The JSON body, or None when the body was empty or not JSON (see ``raw``)."""
    raw: bytes


class _Stop(Exception):
    """Raised through the reference app's ``send`` to end its response early."""


def _vllm_chunk(chunk: dict[str, Any], outputs: int) -> dict[str, Any]:
    """A model_worker chunk as FastChat's vLLM worker shapes it (made-up cumulative_logprob)."""
    if "usage" not in chunk:
        return chunk  # an in-band error chunk looks the same from every worker
    usage = chunk["usage"]
    generated = usage["completion_tokens"] + 1  # vLLM counts exactly
    finish = chunk["finish_reason"]
    return {
        "text": " ".join([chunk["text"]] * outputs),
        "error_code": 0,
        "usage": {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": generated * outputs,
            "total_tokens": usage["prompt_tokens"] + generated * outputs,
        },
        "cumulative_logprob": [-0.5 * generated] * outputs,
        "finish_reason": finish if outputs == 1 else [finish] * outputs,
    }


class _Exchange:
    """One request through the fake: records it, watches the client, applies its fault."""

    def __init__(
        self, fake: FakeWorker, path: str, fault: Fault | None, receive: Receive, send: Send
    ) -> None:
        self.fake, self.path, self.fault = fake, path, fault
        self._receive, self._send = receive, send
        self.body = bytearray()
        self.replayed = self.complete = False
        self.client_gone = asyncio.Event()
        self.forwarded = 0

    async def read_request(self) -> bool:
        """Read and record the whole body up front, so requests the app answers without
        reading it (``/worker_get_status``) are recorded too; False if the client left."""
        more = True
        while more:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return False
            self.body += message.get("body", b"")
            more = message.get("more_body", False)
        self.fake._record(self.path, bytes(self.body))
        return True

    async def receive(self) -> Message:
        if not self.replayed:
            self.replayed = True
            return {"type": "http.request", "body": bytes(self.body), "more_body": False}
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.complete:
            self.client_gone.set()
            self.fake._count_disconnect()
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            if isinstance(self.fault, Hang) and self.fault.after_chunks is None:
                await self._idle(self.fault.seconds)
            await self._send(message)
            return
        await self._at_boundary()
        if message.get("more_body", False):
            await self._forward(message["body"])
        else:
            await self._end(message.get("body", b""))

    async def send_error(self, fault: HttpError) -> None:
        headers = [
            (b"content-type", fault.content_type.encode()),
            (b"content-length", str(len(fault.body)).encode()),
        ]
        await self._send(
            {"type": "http.response.start", "status": fault.status, "headers": headers}
        )
        await self._end(fault.body)

    async def _at_boundary(self) -> None:
        """Fire the fault due once ``self.forwarded`` chunks have gone out."""
        fault = self.fault
        if getattr(fault, "after_chunks", -1) != self.forwarded:
            return
        if isinstance(fault, Hang):
            self.fault = None
            await self._idle(fault.seconds)
        elif isinstance(fault, MalformedFrame):
            self.fault = None
            await self._write(fault.payload + b"\0")
        elif isinstance(fault, ErrorChunk):
            await self._write(encode_frame(error_chunk(fault.message, fault.error_code)))
            await self._end()
            raise _Stop
        elif isinstance(fault, CloseMidStream):
            raise _Stop

    async def _forward(self, frame: bytes) -> None:
        """Send one chunk of the reference worker, reshaped by the flavour and the fault."""
        chunk, fault = json.loads(frame[:-1]), self.fault
        if isinstance(fault, Abort) and fault.after_chunks == self.forwarded:
            if self.fake.flavor == "vllm":
                await self._write(self._encode({**chunk, "finish_reason": None}))
            await self._write(self._encode({**chunk, "finish_reason": "abort"}))
            await self._end()
            raise _Stop
        if isinstance(fault, NoFinalChunk) and chunk.get("finish_reason") is not None:
            return
        await self._write(self._encode(chunk))
        self.forwarded += 1

    def _encode(self, chunk: dict[str, Any]) -> bytes:
        if self.fake.flavor == "vllm":
            chunk = _vllm_chunk(chunk, self.fake.vllm_outputs)
        return json.dumps(chunk).encode() + (
            b"\n" if isinstance(self.fault, NewlineFraming) else b"\0"
        )

    async def _write(self, frame: bytes) -> None:
        await self._send({"type": "http.response.body", "body": frame, "more_body": True})

    async def _end(self, body: bytes = b"") -> None:
        self.complete = True
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def _idle(self, seconds: float) -> None:
        """Send nothing for ``seconds``, or until the client leaves."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.client_gone.wait(), seconds)


class FakeWorker:
    """The reference worker behind a loopback server, with request records and fault knobs.

    ``flavor="vllm"`` streams one chunk per token shaped like FastChat's vLLM worker: keys
    text, error_code, usage (exact), cumulative_logprob (a list), finish_reason; the final
    payload twice, first with finish_reason null; with ``vllm_outputs`` > 1, finish_reason is
    a list and the texts are joined with a space. ``/worker_generate`` keeps model_worker's shape.
    """

    def __init__(
        self,
        config: ReferenceWorkerConfig | None = None,
        *,
        flavor: Literal["model_worker", "vllm"] = "model_worker",
        vllm_outputs: int = 1,
    ) -> None:
        config = config or ReferenceWorkerConfig()
        if flavor == "vllm":
            config = dataclasses.replace(config, stream_interval=1)
        self.config = config
        self.model: ScriptedModel = config.model
        self.flavor = flavor
        self.vllm_outputs = vllm_outputs
        self.app = create_app(config)
        self.server = LoopbackServer(self)
        self.requests: list[RecordedRequest] = []
        self.disconnected = threading.Event()
        self._disconnects = 0
        self._faults: defaultdict[str, deque[Fault]] = defaultdict(deque)
        self._lock = threading.Lock()

    # -- the server --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> FakeWorker:
        self.server.start()
        return self

    def stop(self) -> None:
        """Down: connections are refused, and open streams are dropped."""
        self.server.stop()

    def restart(self) -> None:
        """Back up on the same port, with an empty queue (records and armed faults are kept)."""
        self.server.restart()

    def __enter__(self) -> FakeWorker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- knobs and records -------------------------------------------------------------------

    def fail_next(self, fault: Fault, *, path: str = STREAM, times: int = 1) -> None:
        """Apply ``fault`` to the next ``times`` requests to ``path``."""
        with self._lock:
            self._faults[path].extend([fault] * times)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def bodies(self, path: str = STREAM) -> list[Any]:
        """The JSON bodies received on ``path``, oldest first."""
        return [r.body for r in list(self.requests) if r.path == path]

    @property
    def disconnects(self) -> int:
        """How many clients went away before their response was complete."""
        return self._disconnects

    async def wait_for_disconnects(self, count: int = 1, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self._disconnects < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"saw {self._disconnects} disconnects, expected {count}")
            await asyncio.sleep(0.01)

    def _record(self, path: str, raw: bytes) -> None:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.requests.append(RecordedRequest(path, body, raw))

    def _count_disconnect(self) -> None:
        with self._lock:
            self._disconnects += 1
        self.disconnected.set()

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(path)
            return queue.popleft() if queue else None

    # -- the ASGI app ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        exchange = _Exchange(self, path, self._take_fault(path), receive, send)
        if not await exchange.read_request():
            return
        if isinstance(exchange.fault, HttpError):
            await exchange.send_error(exchange.fault)
            return
        # After a _Stop with the body unfinished, uvicorn drops the connection (CloseMidStream).
        with contextlib.suppress(_Stop):
            await self.app(scope, exchange.receive, exchange.send)


StartFake = Callable[..., FakeWorker]
"""The type of the ``fake_worker`` fixture (``tests/conftest.py``): ``fake_worker(config=None,
**options)`` starts a ``FakeWorker`` that stops at teardown."""
