"""What both conformance checkers share: the endpoint under test, the ordered steps, and the
validation of a NUL-framed stream as a reader needs it (NUL framing, every frame a JSON object
with ``error_code`` 0, cumulative text never shrinking, a final ``finish_reason``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

from protocol.errors import ProtocolError
from protocol.framing import FrameDecoder

PROMPT: Final = "Hello! Who are you?"
MAX_NEW_TOKENS: Final = 8


class CheckFailed(Exception):
    """One check failed; the message says why in one line."""


class Unreachable(CheckFailed):
    """The endpoint does not answer at all: later checks are skipped."""


class UsageError(Exception):
    """Nothing can be checked as asked (exit status 2)."""


@dataclass
class Outcome:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str


@dataclass
class Endpoint:
    """HTTP to the endpoint under test; every failure becomes a ``CheckFailed``."""

    url: str
    client: httpx.Client
    max_frame_bytes: int = 1 << 20

    def post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            response = self.client.post(self.url + path, json=body)
        except httpx.TransportError as exc:
            raise Unreachable(f"POST {path}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise CheckFailed(f"POST {path}: HTTP {response.status_code}: {response.text[:200]}")
        try:
            return response.json()
        except ValueError:
            raise CheckFailed(f"POST {path}: not JSON: {response.text[:200]!r}") from None

    def get(self, path: str) -> Any:
        try:
            response = self.client.get(self.url + path)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise CheckFailed(f"GET {path}: {exc}") from None

    def stream(self, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        decoder = FrameDecoder(max_frame_bytes=self.max_frame_bytes)
        frames: list[dict[str, Any]] = []
        try:
            with self.client.stream("POST", self.url + path, json=body) as response:
                if response.status_code != 200:
                    raise CheckFailed(f"POST {path}: HTTP {response.status_code}")
                for data in response.iter_raw():
                    frames += decoder.feed(data)
            decoder.close()
        except httpx.TransportError as exc:
            raise CheckFailed(f"stream broke after {len(frames)} frames: {exc}") from None
        except ProtocolError as exc:
            raise CheckFailed(f"framing: {exc}") from None
        if not frames:
            raise CheckFailed("the stream held no frame")
        return frames


def validate_stream(frames: list[dict[str, Any]]) -> str:
    """Error codes, cumulative text, final finish_reason; returns a one-line summary."""
    previous = ""
    for index, frame in enumerate(frames, 1):
        if not isinstance(frame.get("error_code"), int):
            raise CheckFailed(f"frame {index} has no integer error_code: {frame!r:.200}")
        if frame["error_code"] != 0:
            raise CheckFailed(f"frame {index}: error {frame['error_code']}: {frame.get('text')}")
        text = frame.get("text")
        if not isinstance(text, str):
            raise CheckFailed(f"frame {index} has no string 'text': {frame!r:.200}")
        # A trailing U+FFFD may become a real character once its remaining bytes arrive.
        if len(text) < len(previous) or not text.startswith(previous.rstrip("\ufffd")):
            raise CheckFailed(f"frame {index}: cumulative text shrank or changed: {text!r:.80}")
        previous = text
    final = frames[-1].get("finish_reason")
    if not final:
        raise CheckFailed(f"the last of {len(frames)} frames has no finish_reason")
    return f"{len(frames)} frames, finish_reason {final}, text {previous[:40]!r}"


@dataclass
class Run:
    """Steps run in order; after an Unreachable the rest are skipped."""

    outcomes: list[Outcome] = field(default_factory=list)
    _gone: bool = False

    def step(self, name: str, check: Callable[[], str]) -> None:
        if self._gone:
            self.outcomes.append(Outcome(name, "SKIP", "endpoint unreachable"))
            return
        try:
            self.outcomes.append(Outcome(name, "PASS", check()))
        except Unreachable as exc:
            self._gone = True
            self.outcomes.append(Outcome(name, "FAIL", str(exc)))
        except (CheckFailed, ProtocolError) as exc:
            self.outcomes.append(Outcome(name, "FAIL", str(exc)))

    @property
    def ok(self) -> bool:
        return all(o.status == "PASS" for o in self.outcomes)
