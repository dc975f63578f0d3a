"""NUL-delimited JSON, the stream framing of both FastChat and DB-GPT (docs/protocol.md §1.3, §6.3).

A stream is a sequence of JSON objects, each followed by one ``0x00`` byte. Empty frames
(``\\0\\0``) are skipped by every reader, so a bare NUL serves as a keep-alive.

Decoding is O(n) in the bytes received. FastChat's and DB-GPT's own readers do
``buffer += chunk; buffer.split(b"\\0")``, which re-scans the whole unterminated tail on every
read: a peer that trickles one large frame a byte at a time costs them O(n²). Here, as in h11's
receive buffer, ``FrameDecoder`` remembers how far it has already searched and never looks at a
byte twice; the buffer is a ``bytearray`` trimmed once per ``feed``.
"""

from __future__ import annotations

import json
import json.scanner
from collections.abc import Callable
from typing import Any, Final, cast

from protocol.errors import FramingError

__all__ = ["DEFAULT_MAX_FRAME_BYTES", "KEEPALIVE", "FrameDecoder", "encode_frame"]

KEEPALIVE: Final = b"\0"
DEFAULT_MAX_FRAME_BYTES: Final = 16 * 1024 * 1024

# The scanner ``json.loads`` runs (C), as its default decoder makes it.
_scan_once: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_compact_ascii = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def encode_frame(obj: dict[str, Any]) -> bytes:
    """One frame: compact UTF-8 JSON plus the NUL terminator.

    JSON escapes control characters, so the frame itself never contains a NUL. A lone
    surrogate (a worker can send ``"\\ud83d"`` escapes) has no UTF-8 form; such a frame falls
    back to ASCII escapes, which every JSON reader accepts.
    """
    try:
        return _compact.encode(obj).encode("utf-8") + KEEPALIVE
    except UnicodeEncodeError:
        return _compact_ascii.encode(obj).encode("ascii") + KEEPALIVE


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get back every completed object.

    Errors (``FramingError``, naming the absolute stream offset of the bad frame):

    - a frame that is not UTF-8 JSON, or whose JSON is not an object;
    - a frame longer than ``max_frame_bytes``, detected as soon as the unterminated frame
      outgrows the limit, not when (or if) its NUL arrives;
    - ``close()`` with a partial frame pending: the body ended without its final NUL.

    Objects decoded before a bad frame are never lost: ``feed`` returns them and the error is
    raised by the next ``feed`` or ``close``. After an error the decoder is spent and keeps
    raising it.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be positive")
        self._max = max_frame_bytes
        self._buffer = bytearray()
        self._searched = 0  # bytes of _buffer already known to hold no NUL
        self._offset = 0  # absolute stream offset of _buffer[0]
        self._error: FramingError | None = None
        self.bytes_scanned = 0  # total bytes searched for NUL: equals bytes fed if O(n)

    @property
    def pending(self) -> int:
        """Bytes of an unterminated frame waiting for their NUL."""
        return len(self._buffer)

    @property
    def failure(self) -> FramingError | None:
        """The error the next ``feed`` or ``close`` will raise (a bad frame came after the good
        ones the last ``feed`` returned), or None."""
        return self._error

    @property
    def offset(self) -> int:
        """Bytes fed so far (the absolute offset of the next byte)."""
        return self._offset + len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[dict[str, Any]]:
        """Buffer ``data``; return the objects of every frame it completes, in order."""
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        if not buffer and type(data) is bytes and data.find(0) == len(data) - 1:
            return self._one_frame(data)  # the common read: exactly one whole frame
        buffer += data
        objects: list[dict[str, Any]] = []
        problem: str | None = None
        start = 0  # start of the current frame within buffer
        while True:
            end = buffer.find(0, self._searched)
            if end < 0:
                self.bytes_scanned += len(buffer) - self._searched
                self._searched = len(buffer)
                if len(buffer) - start > self._max:
                    problem = f"frame exceeds the limit of {self._max} bytes"
                break
            self.bytes_scanned += end + 1 - self._searched
            self._searched = end + 1
            if end > start:  # an empty frame is a keep-alive
                if end - start > self._max:
                    problem = f"frame exceeds the limit of {self._max} bytes"
                    break
                try:
                    objects.append(_decode(buffer, start, end))
                except ValueError as exc:
                    problem = str(exc)
                    break
            start = end + 1
        if problem is not None:
            error = FramingError(problem, offset=self._offset + start)
            self._spend(error)
            if not objects:
                raise error
            return objects
        if start:
            del buffer[:start]
            self._offset += start
            self._searched -= start
        return objects

    def _one_frame(self, data: bytes) -> list[dict[str, Any]]:
        """``feed`` of exactly one whole frame with nothing buffered, decoded from ``data``
        itself instead of through the buffer: the same objects, errors and offsets."""
        self.bytes_scanned += len(data)
        objects = []
        if len(data) > 1:  # (a bare NUL is a keep-alive)
            try:
                if len(data) - 1 > self._max:
                    raise ValueError(f"frame exceeds the limit of {self._max} bytes")
                objects.append(_decode(data, 0, len(data) - 1))
            except ValueError as exc:
                error = FramingError(str(exc), offset=self._offset)
                self._spend(error)
                raise error from None
        self._offset += len(data)
        return objects

    def close(self) -> None:
        """Declare the end of the stream; raise if it ended inside a frame."""
        if self._error is None and self._buffer:
            message = f"stream ended inside a frame ({len(self._buffer)} bytes, no NUL)"
            self._spend(FramingError(message, offset=self._offset))
        if self._error is not None:
            raise self._error

    # h11's word for the same moment: the peer signalled the end of its data.
    eof = close

    def _spend(self, error: FramingError) -> None:
        self._error = error
        self._buffer.clear()  # a broken stream is never read again: release the memory
        self._searched = 0


def _decode(buffer: bytes | bytearray, start: int, end: int) -> dict[str, Any]:
    try:
        text = buffer[start:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"frame is not UTF-8 JSON: {exc}") from None
    # The common frame, one object with nothing around it, goes straight through the scanner
    # ``json.loads`` itself calls (C), without the whitespace matches and BOM test around it: a
    # third of its cost on a short frame, and the relay decodes one per upstream chunk (issue
    # 14). The same object when the scan ends exactly at the end; otherwise (whitespace around
    # it, an error) ``json.loads`` has the last word, with its own message.
    if text[:1] == "{":
        try:
            obj, stop = _scan_once(text, 0)
        except (StopIteration, ValueError, RecursionError):
            pass
        else:
            if stop == len(text):
                return cast(dict[str, Any], obj)
    try:
        obj = json.loads(text)
    except RecursionError:  # absurdly deep nesting: reject, never crash the reader
        raise ValueError("frame nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"frame is a JSON {type(obj).__name__}, not an object")
    return obj
