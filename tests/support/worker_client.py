"""Small client-side helpers for tests that talk to a FastChat worker (reference, fake or real).

Frames are split the way FastChat's own readers do (on NUL, after reading everything), on
purpose without ``protocol.framing``: these helpers check the workers, not the adapter's codec.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

__all__ = ["connect", "queue_length", "split_frames", "stream_raw", "wait_for_queue_length"]


def connect(url: str, timeout: float = 10.0) -> httpx.AsyncClient:
    """A client for a loopback worker. Plain HTTP needs no CA bundle, and loading one costs
    about 0.1 s per client."""
    return httpx.AsyncClient(base_url=url, timeout=timeout, verify=False)


def split_frames(raw: bytes) -> list[dict[str, Any]]:
    """The JSON objects of a complete NUL-framed body (which must end with a NUL)."""
    *pieces, tail = raw.split(b"\0")
    assert tail == b"", f"the body does not end with a NUL: {raw[-80:]!r}"
    return [json.loads(piece) for piece in pieces]


async def stream_raw(
    client: httpx.AsyncClient, body: dict[str, Any], path: str = "/worker_generate_stream"
) -> tuple[httpx.Response, bytes]:
    """POST ``body`` and read the whole streamed reply."""
    async with client.stream("POST", path, json=body) as response:
        raw = await response.aread()
    return response, raw


async def queue_length(client: httpx.AsyncClient) -> int:
    response = await client.post("/worker_get_status", json={})
    response.raise_for_status()
    return int(response.json()["queue_length"])


async def wait_for_queue_length(
    client: httpx.AsyncClient, expected: int, timeout: float = 2.0
) -> None:
    """Poll ``/worker_get_status`` until ``queue_length`` is ``expected`` (the worker frees a
    slot just after the last byte, so a client that has read everything may still see it held)."""
    deadline = time.monotonic() + timeout
    while (seen := await queue_length(client)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"queue_length stayed {seen}, expected {expected}")
        await asyncio.sleep(0.01)
