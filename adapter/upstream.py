"""The one place that talks HTTP to FastChat workers and controllers.

Every call goes through one pooled ``httpx.AsyncClient`` created by the process. Failures are
turned into ``UpstreamError`` with a ``reason`` that names what went wrong, so callers can map
them to in-band error frames and metrics without inspecting httpx exceptions::

    UpstreamError
     ├── reason "unreachable"    connect failed / refused (error code 50005, no worker)
     ├── reason "idle_timeout"   no frame within the idle timeout (50006)
     ├── reason "http_status"    non-200 answer (50001)
     ├── reason "broken_stream"  body ended early or the connection reset (50001)
     └── reason "malformed"      undecodable body or frame (50001)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
import httpx

from protocol.errors import ProtocolError
from protocol.framing import FrameDecoder

CONTROLLER_NO_WORKER: Final = 50005
CONTROLLER_WORKER_TIMEOUT: Final = 50006
INTERNAL_ERROR: Final = 50001

_CODE_BY_REASON: Final = {
    "unreachable": CONTROLLER_NO_WORKER,
    "idle_timeout": CONTROLLER_WORKER_TIMEOUT,
}


class UpstreamError(Exception):
    """A FastChat worker or controller could not give a usable answer."""

    def __init__(self, worker: str, reason: str, detail: str) -> None:
        super().__init__(f"FastChat worker {worker}: {reason}: {detail}")
        self.worker = worker
        self.reason = reason
        self.detail = detail

    @property
    def error_code(self) -> int:
        return _CODE_BY_REASON.get(self.reason, INTERNAL_ERROR)


def make_http_client(
    connect_timeout: float, read_timeout: float | None = 30.0
) -> httpx.AsyncClient:
    """The process-wide pool. Streams override the read timeout with the idle timeout."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=30.0, pool=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        trust_env=False,  # loopback sidecar: an inherited proxy setting must never capture it
    )


class FastChatClient:
    """Typed calls to the FastChat worker API (PROTOCOLS.md §1) and controller API (§2)."""

    def __init__(self, http: httpx.AsyncClient, *, idle_timeout: float) -> None:
        self._http = http
        self._idle_timeout = idle_timeout

    # --- worker routes ------------------------------------------------------------------
    async def status(self, worker: str, model: str | None = None) -> dict[str, Any]:
        return await self._post_json(worker, "/worker_get_status", _model_body(model))

    async def conv_template(self, worker: str, model: str) -> dict[str, Any]:
        reply = await self._post_json(worker, "/worker_get_conv_template", {"model": model})
        conv = reply.get("conv")
        if not isinstance(conv, dict):
            raise UpstreamError(worker, "malformed", f"template reply without 'conv': {reply!r}")
        return conv

    async def context_length(self, worker: str, model: str) -> int:
        reply = await self._post_json(worker, "/model_details", {"model": model})
        value = reply.get("context_length")
        if not isinstance(value, int) or value <= 0:
            raise UpstreamError(worker, "malformed", f"model_details reply: {reply!r}")
        return value

    async def count_token(self, worker: str, model: str, prompt: str) -> int:
        reply = await self._post_json(worker, "/count_token", {"model": model, "prompt": prompt})
        count = reply.get("count")
        if not isinstance(count, int) or reply.get("error_code", 0) != 0:
            raise UpstreamError(worker, "malformed", f"count_token reply: {reply!r}")
        return count

    async def generate(self, worker: str, params: dict[str, Any]) -> dict[str, Any]:
        # No total timeout: a long non-stream generation is legitimate; the idle timeout
        # bounds the wait for the single answer instead.
        return await self._post_json(worker, "/worker_generate", params, read=self._idle_timeout)

    async def embeddings(self, worker: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._post_json(
            worker, "/worker_get_embeddings", body, read=self._idle_timeout, accept_error=True
        )

    @asynccontextmanager
    async def generate_stream(
        self, worker: str, params: dict[str, Any]
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Open the stream; iterate decoded chunks. Leaving the block closes the upstream
        connection at once, which is how FastChat frees the worker's concurrency slot."""
        request = self._http.build_request(
            "POST",
            worker + "/worker_generate_stream",
            json=params,
            timeout=httpx.Timeout(
                connect=self._http.timeout.connect, read=None, write=30.0, pool=None
            ),
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _transport_error(worker, exc) from exc
        try:
            if response.status_code != 200:
                body = (await response.aread())[:500].decode("utf-8", "replace")
                raise UpstreamError(worker, "http_status", f"HTTP {response.status_code}: {body}")
            yield self._chunks(worker, response)
        finally:
            await response.aclose()

    async def _chunks(self, worker: str, response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        decoder = FrameDecoder()
        raw = response.aiter_raw()
        while True:
            try:
                with anyio.fail_after(self._idle_timeout):
                    data = await raw.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError as exc:
                raise UpstreamError(
                    worker, "idle_timeout", f"no frame for {self._idle_timeout:g} s"
                ) from exc
            except httpx.HTTPError as exc:
                raise _transport_error(worker, exc) from exc
            try:
                frames = decoder.feed(data)
            except ProtocolError as exc:
                raise UpstreamError(worker, "malformed", str(exc)) from exc
            for frame in frames:
                yield frame
        try:
            decoder.close()
        except ProtocolError as exc:
            raise UpstreamError(worker, "broken_stream", str(exc)) from exc

    # --- controller routes (FastChat controller, §2) ------------------------------------
    async def list_models(self, controller: str) -> list[str]:
        reply = await self._post_json(controller, "/list_models", {})
        models = reply.get("models")
        if not isinstance(models, list):
            raise UpstreamError(controller, "malformed", f"list_models reply: {reply!r}")
        return sorted(str(m) for m in models)

    async def worker_address(self, controller: str, model: str) -> str:
        reply = await self._post_json(controller, "/get_worker_address", {"model": model})
        return str(reply.get("address") or "").rstrip("/")

    # --- plumbing -----------------------------------------------------------------------
    async def _post_json(
        self,
        worker: str,
        path: str,
        body: dict[str, Any],
        *,
        read: float | None = None,
        accept_error: bool = False,
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
            raise UpstreamError(worker, "malformed", f"{path}: not JSON: {exc}") from exc
        if not isinstance(reply, dict):
            raise UpstreamError(worker, "malformed", f"{path}: expected an object: {reply!r}")
        if response.status_code != 200 and "error_code" not in reply:
            raise UpstreamError(worker, "http_status", f"{path}: HTTP {response.status_code}")
        return reply


def _model_body(model: str | None) -> dict[str, Any]:
    return {"model": model} if model else {}


def _transport_error(worker: str, exc: httpx.HTTPError) -> UpstreamError:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return UpstreamError(worker, "unreachable", str(exc) or type(exc).__name__)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(worker, "idle_timeout", str(exc) or type(exc).__name__)
    return UpstreamError(worker, "broken_stream", str(exc) or type(exc).__name__)
