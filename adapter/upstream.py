"""The one place that talks HTTP to FastChat workers and controllers.

Every call goes through one pooled ``httpx.AsyncClient`` created by the process, and every reply
is parsed with ``protocol.fastchat``'s wire models. Failures are turned into ``UpstreamError``
with a ``reason`` that names what went wrong (the reasons and their error codes are drawn in
``adapter/errors.py``), so callers can map them to in-band error frames and metrics without
inspecting httpx exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any, Final, TypeVar, cast

import httpx

from adapter.errors import UpstreamError
from adapter.stream_reader import StreamFailure, StreamPool, UpstreamStream, open_stream
from protocol import fastchat
from protocol.errors import ProtocolError, WorkerError
from protocol.fastchat import ConvTemplate, GenerationParams, WorkerStatus
from protocol.framing import FrameDecoder
from protocol.translate import count_from_reply, embeddings_from_reply

_T = TypeVar("_T")


DEFAULT_READ_TIMEOUT: Final = 30.0
"""Read timeout of the calls that are not generations (status, template, count_token…)."""


def make_http_client(
    connect_timeout: float, read_timeout: float | None = DEFAULT_READ_TIMEOUT
) -> httpx.AsyncClient:
    """The process-wide pool. Streams override the read timeout with the idle timeout."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=30.0, pool=None),
        # FastChat workers run uvicorn, which closes idle keep-alive connections after 5 s:
        # reusing one at that moment fails the request ("Server disconnected"). Dropping ours
        # first, at 2 s, closes that race; status polls keep a warm connection anyway.
        limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0
        ),
        trust_env=False,  # loopback sidecar: an inherited proxy setting must never capture it
    )


class FastChatClient:
    """Typed calls to the FastChat worker API (docs/protocol.md §1) and controller API (§2)."""

    def __init__(
        self, http: httpx.AsyncClient, *, idle_timeout: float, generate_timeout: float = 600.0
    ) -> None:
        self._http = http
        self._connect_timeout = http.timeout.connect or DEFAULT_READ_TIMEOUT
        self._idle_timeout = idle_timeout
        # Streams through adapter/stream_reader.py; off only where httpx is mocked (respx).
        self.lean_streams = True
        self._streams = StreamPool()  # the lean streams' idle keep-alive connections
        self._generate_timeout = generate_timeout

    def close(self) -> None:
        """Close the idle stream connections (the httpx pool is its owner's to close)."""
        self._streams.close()

    # --- worker routes ------------------------------------------------------------------
    async def status(self, worker: str, model: str | None = None) -> WorkerStatus:
        body = {"model": model} if model else {}
        return await self._call(worker, "/worker_get_status", body, WorkerStatus.from_wire)

    async def conv_template(self, worker: str, model: str) -> ConvTemplate:
        parse = fastchat.ConvTemplateReply.from_wire
        reply = await self._call(worker, "/worker_get_conv_template", {"model": model}, parse)
        return reply.conv

    async def context_length(self, worker: str, model: str) -> int:
        parse = fastchat.ModelDetailsReply.from_wire
        reply = await self._call(worker, "/model_details", {"model": model}, parse)
        return reply.context_length

    async def count_token(self, worker: str, model: str, prompt: str) -> int:
        body = fastchat.CountTokenRequest(model=model, prompt=prompt).to_wire()
        return await self._call(worker, "/count_token", body, count_from_reply)

    async def generate(self, worker: str, params: GenerationParams) -> dict[str, Any]:
        """The ``/worker_generate`` reply (FastChat's last chunk, or its error object). Nothing
        arrives until the whole generation is done, so the bound is the generate timeout: a
        long CPU generation outlasts any sensible idle timeout."""
        body = params.to_wire()
        read = self._generate_timeout
        return await self._call(worker, "/worker_generate", body, _as_is, read=read)

    async def embeddings(
        self, worker: str, request: fastchat.EmbeddingsRequest
    ) -> list[list[float]]:
        """One vector per input, in order; the worker's error object is an ``in_band`` error."""
        expected = len(request.input)
        return await self._call(
            worker,
            "/worker_get_embeddings",
            request.to_wire(),
            lambda reply: embeddings_from_reply(reply, expected=expected),
            read=self._idle_timeout,
            accept_error=True,
        )

    @asynccontextmanager
    async def generate_stream(
        self, worker: str, params: GenerationParams
    ) -> AsyncIterator[ChunkStream]:
        """Open the stream; ``run`` it (or iterate its chunks). Leaving the block closes the
        upstream connection at once if the body is unfinished, which is how FastChat frees the
        worker's concurrency slot (a finished one goes back to the pool). The read timeout is
        the idle timeout: it bounds the wait for the headers (a queued or wedged worker) and
        then every wait between two reads; there is no total timeout."""
        if not self.lean_streams:
            async with self._httpx_stream(worker, params) as chunks:
                yield chunks
            return
        body = json.dumps(
            params.to_wire(), ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode("utf-8")
        try:
            response = await open_stream(
                worker + "/worker_generate_stream",
                body,
                connect_timeout=self._connect_timeout,
                idle_timeout=self._idle_timeout,
                pool=self._streams,
            )
        except StreamFailure as exc:
            raise self._stream_failure(worker, exc) from exc
        try:
            if response.status != 200:
                raise UpstreamError(
                    worker, "http_status", f"HTTP {response.status}: {await _lean_head(response)}"
                )
            yield _LeanChunkStream(self, worker, response)
        finally:
            response.close()

    def _stream_failure(self, worker: str, exc: StreamFailure) -> UpstreamError:
        if exc.reason == "idle_timeout":
            return self._idle(worker)
        return UpstreamError(worker, exc.reason, str(exc))  # type: ignore[arg-type]

    @asynccontextmanager
    async def _httpx_stream(
        self, worker: str, params: GenerationParams
    ) -> AsyncIterator[ChunkStream]:
        """The same through httpx (``lean_streams`` off: a mocked transport in tests)."""
        request = self._http.build_request(
            "POST",
            worker + "/worker_generate_stream",
            json=params.to_wire(),
            timeout=httpx.Timeout(
                connect=self._http.timeout.connect, read=self._idle_timeout, write=30.0, pool=None
            ),
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.ReadTimeout as exc:
            raise self._idle(worker) from exc
        except httpx.HTTPError as exc:
            raise _transport_error(worker, exc) from exc
        try:
            if response.status_code != 200:
                body = await _head(response)
                raise UpstreamError(worker, "http_status", f"HTTP {response.status_code}: {body}")
            batches = self._batches(worker, self._httpx_pieces(worker, response))
            try:
                yield ChunkStream(batches)
            finally:
                await batches.aclose()
        finally:
            await response.aclose()

    async def _httpx_pieces(
        self, worker: str, response: httpx.Response
    ) -> AsyncGenerator[bytes, None]:
        # httpx's raw iterator is an async generator: close it with us, not at GC time.
        raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())
        async with aclosing(raw):
            while True:
                try:
                    data = await raw.__anext__()
                except StopAsyncIteration:
                    break
                except httpx.ReadTimeout as exc:
                    raise self._idle(worker) from exc
                except httpx.HTTPError as exc:
                    raise _transport_error(worker, exc) from exc
                yield data

    async def _batches(
        self, worker: str, pieces: AsyncGenerator[bytes, None]
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        async with aclosing(pieces):
            decoder = FrameDecoder()
            async for data in pieces:
                try:
                    frames = decoder.feed(data)
                except ProtocolError as exc:
                    raise UpstreamError(worker, "malformed", str(exc)) from exc
                if frames:
                    yield frames
                    # The decoder hands over the good frames before a bad one and keeps the
                    # error for its next call: surface it now, not after the next write.
                    if (failure := decoder.failure) is not None:
                        raise UpstreamError(worker, "malformed", str(failure)) from failure
        _end_of_body(worker, decoder)

    def _idle(self, worker: str) -> UpstreamError:
        return UpstreamError(worker, "idle_timeout", f"no frame for {self._idle_timeout:g} s")

    # --- controller routes (FastChat controller, §2) ------------------------------------
    async def list_models(self, controller: str) -> list[str]:
        parse = fastchat.ListModelsReply.from_wire
        return sorted((await self._call(controller, "/list_models", {}, parse)).models)

    async def multimodal_models(self, controller: str) -> list[str]:
        """A FastChat controller's ``/list_multimodal_models`` (workers registered with
        ``multimodal``)."""
        parse = fastchat.ListModelsReply.from_wire
        return sorted((await self._call(controller, "/list_multimodal_models", {}, parse)).models)

    async def worker_address(self, controller: str, model: str) -> str:
        body = fastchat.GetWorkerAddress(model=model).to_wire()
        parse = fastchat.WorkerAddressReply.from_wire
        reply = await self._call(controller, "/get_worker_address", body, parse)
        return reply.address.rstrip("/")

    # --- plumbing -----------------------------------------------------------------------
    async def _call(
        self,
        worker: str,
        path: str,
        body: dict[str, Any],
        parse: Callable[[dict[str, Any]], _T],
        *,
        read: float | None = None,
        accept_error: bool = False,
    ) -> _T:
        """POST ``body``; the JSON object answered, through ``parse``. The worker's own error
        object is an ``in_band`` error (its code kept), any other misfit ``malformed``."""
        reply = await self._post_json(worker, path, body, read=read, accept_error=accept_error)
        try:
            return parse(reply)
        except WorkerError as exc:
            raise UpstreamError(worker, "in_band", exc.text, code=exc.error_code) from exc
        except ProtocolError as exc:
            raise UpstreamError(worker, "malformed", f"{path}: {exc}") from exc

    async def _post_json(
        self,
        worker: str,
        path: str,
        body: dict[str, Any],
        *,
        read: float | None,
        accept_error: bool,
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"json": body}
        if read is not None:
            kwargs["timeout"] = httpx.Timeout(
                connect=self._http.timeout.connect, read=read, write=30.0, pool=None
            )
        try:
            response = await self._http.post(worker + path, **kwargs)
        except httpx.HTTPError as exc:
            raise _transport_error(worker, exc) from exc
        if response.status_code != 200 and not accept_error:
            text = response.text[:500]
            raise UpstreamError(
                worker, "http_status", f"{path}: HTTP {response.status_code}: {text}"
            )
        try:
            reply = response.json()
        except ValueError as exc:
            if response.status_code != 200:
                text = response.text[:500]
                detail = f"{path}: HTTP {response.status_code}: {text}"
                raise UpstreamError(worker, "http_status", detail) from exc
            raise UpstreamError(worker, "malformed", f"{path}: not JSON: {exc}") from exc
        if not isinstance(reply, dict):
            raise UpstreamError(worker, "malformed", f"{path}: expected an object: {reply!r}")
        if response.status_code != 200 and "error_code" not in reply:
            detail = f"{path}: HTTP {response.status_code}: {response.text[:500]}"
            raise UpstreamError(worker, "http_status", detail)
        return reply


BatchConsumer = Callable[[list[dict[str, Any]]], bool]
"""Takes the chunks of one upstream read, in the read's own callback; True once the stream has
ended (its last frame relayed): the rest of the body is then read and dropped, for at most
``drain_timeout`` seconds, and a failure in it changes nothing."""


class ChunkStream:
    """The decoded chunks of one stream: ``run(consume)`` hands them over per upstream read (a
    read that brings several means the worker is ahead of us, docs: adapter/relay.py). This one
    reads through httpx (``lean_streams`` off)."""

    def __init__(self, batches: AsyncGenerator[list[dict[str, Any]], None]) -> None:
        self._batches = batches

    async def run(self, consume: BatchConsumer, *, drain_timeout: float) -> None:
        """Until the body ends or ``consume`` says the stream has; raises ``UpstreamError``."""
        async for batch in self._batches:
            if consume(batch):
                with contextlib.suppress(UpstreamError, TimeoutError):
                    async with asyncio.timeout(drain_timeout):
                        async for _ in self._batches:
                            pass
                return


class _LeanChunkStream(ChunkStream):
    """The same on ``adapter/stream_reader.py``: ``consume`` runs inside the socket read's
    callback, so relaying a frame resumes no coroutine and wakes no task."""

    def __init__(self, client: FastChatClient, worker: str, response: UpstreamStream) -> None:
        self._client, self._worker, self._response = client, worker, response

    async def run(self, consume: BatchConsumer, *, drain_timeout: float) -> None:
        worker, response = self._worker, self._response
        decoder = FrameDecoder()

        def malformed(exc: ProtocolError) -> UpstreamError:
            return UpstreamError(worker, "malformed", str(exc))

        def on_piece(data: bytes) -> None:
            try:
                frames = decoder.feed(data)
            except ProtocolError as exc:
                raise malformed(exc) from exc
            if not frames:
                return
            if consume(frames):
                response.release(drain_timeout)
                return
            # The decoder hands over the good frames before a bad one and keeps the error
            # for its next call: surface it now, not after the next read.
            if (failure := decoder.failure) is not None:
                raise malformed(failure) from failure

        response.consume(on_piece)
        try:
            await response.finished()
        except StreamFailure as exc:
            raise self._client._stream_failure(worker, exc) from exc
        if not response.released:
            _end_of_body(worker, decoder)


def _end_of_body(worker: str, decoder: FrameDecoder) -> None:
    """The body ended cleanly: a frame left without its NUL is a broken stream."""
    if decoder.pending:
        detail = f"the body ended inside a frame ({decoder.pending} bytes without a NUL)"
        raise UpstreamError(worker, "broken_stream", detail)
    try:
        decoder.close()
    except ProtocolError as exc:
        raise UpstreamError(worker, "malformed", str(exc)) from exc


async def _lean_head(response: UpstreamStream, limit: int = 500) -> str:
    """The start of an error body, like ``_head``."""
    head = bytearray()
    try:
        async for data in response.pieces():
            head += data
            if len(head) >= limit:
                break
    except StreamFailure as exc:
        head += f" [body unreadable: {exc}]".encode()
    return head[:limit].decode("utf-8", "replace")


def _as_is(reply: dict[str, Any]) -> dict[str, Any]:
    return reply


async def _head(response: httpx.Response, limit: int = 500) -> str:
    """The start of an error body, for the message. Reading stops at ``limit`` bytes, and a
    body that stalls or breaks gives what arrived: the status is the failure reported."""
    head = bytearray()
    chunks = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
    try:
        async with aclosing(chunks):
            async for data in chunks:
                head += data
                if len(head) >= limit:
                    break
    except httpx.HTTPError as exc:
        head += f" [body unreadable: {type(exc).__name__}]".encode()
    return head[:limit].decode("utf-8", "replace")


def _transport_error(worker: str, exc: httpx.HTTPError) -> UpstreamError:
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return UpstreamError(worker, "unreachable", detail)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(worker, "idle_timeout", detail)
    return UpstreamError(worker, "broken_stream", detail)
