"""A recording reverse proxy in front of a FastChat worker (docs/peers.md §4 "Recording proxy").

Register the proxy's URL as the worker's `--worker-address` (or give it to the adapter as its
`--worker-address`) and every request body the worker receives is kept, in arrival order, with
the path it was sent to, and so is the whole response body once it has been relayed
(`response_body`). Responses are relayed chunk by chunk as they arrive, so streams keep
their timing. It may re-chunk bodies and drops hop-by-hop headers: assert no headers through it.

Limitation: when the worker is unreachable uvicorn answers 500 for the proxy, and FastChat's
openai_api_server caches a failed `/worker_get_conv_template` answer for its lifetime (docs/peers.md
§3.7 item 2). Use it only in front of a worker that stays up.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.types import Message, Receive, Scope, Send

from tests.support.servers import LoopbackServer

_HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"content-length",
    b"host",
    b"upgrade",
    b"te",
    b"trailer",
    b"proxy-connection",
}


@dataclass(frozen=True)
class Recorded:
    seq: int
    at: float  # time.monotonic()
    method: str
    path: str
    body: Any  # parsed JSON, or the raw text when it is not JSON, None when empty


class RecordingProxy:
    """Serve on a free loopback port in a background thread; forward to `target`."""

    def __init__(self, target: str, *, read_timeout: float = 120.0) -> None:
        self.target = target.rstrip("/")
        self.read_timeout = read_timeout
        self._records: list[Recorded] = []
        self._responses: dict[int, bytes] = {}  # seq -> the complete body the worker sent
        self._lock = threading.Lock()
        self._server = LoopbackServer(self)  # an ASGI 3 app: see __call__

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> RecordingProxy:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    # --- what was seen ----------------------------------------------------------------------

    def mark(self) -> int:
        """A position in the record; `since(mark)` returns what arrived after it."""
        with self._lock:
            return len(self._records)

    def since(self, mark: int = 0, path: str | None = None) -> list[Recorded]:
        with self._lock:
            records = self._records[mark:]
        return [r for r in records if path is None or r.path == path]

    def generate_bodies(self, mark: int = 0) -> list[dict[str, Any]]:
        """Bodies sent to `/worker_generate` or `/worker_generate_stream` after `mark`."""
        paths = ("/worker_generate", "/worker_generate_stream")
        return [r.body for r in self.since(mark) if r.path in paths]

    def response_body(self, record: Recorded) -> bytes | None:
        """What the worker answered to `record`, once the whole body has been relayed."""
        with self._lock:
            return self._responses.get(record.seq)

    def _record(self, method: str, path: str, raw: bytes) -> int:
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        with self._lock:
            seq = len(self._records)
            self._records.append(Recorded(seq, time.monotonic(), method, path, body))
            return seq

    # --- the ASGI app -----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        path: str = scope["path"]
        seq = self._record(scope["method"], path, raw)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        url = self.target + path
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        client: httpx.AsyncClient = scope["state"]["client"]
        request = client.build_request(scope["method"], url, content=raw, headers=headers)
        response = await client.send(request, stream=True)
        try:
            out_headers = [
                (k.lower(), v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP
            ]
            await send(
                {"type": "http.response.start", "status": response.status_code,
                 "headers": out_headers}
            )  # fmt: skip
            relayed = []
            async for piece in response.aiter_raw():
                if piece:
                    relayed.append(piece)
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            with self._lock:
                self._responses[seq] = b"".join(relayed)
        finally:
            await response.aclose()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        client: httpx.AsyncClient | None = None
        while True:
            message: Message = await receive()
            if message["type"] == "lifespan.startup":
                timeout = httpx.Timeout(10.0, read=self.read_timeout)
                # Below uvicorn's 5 s keep-alive timeout: reusing a connection the worker is
                # closing made the proxy answer 500 now and then (seen in a parity run).
                limits = httpx.Limits(keepalive_expiry=2.0)
                client = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
                scope["state"]["client"] = client
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if client is not None:
                    await client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
