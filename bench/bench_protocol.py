"""Cost of the protocol layer on a streamed generation (a script, not a test).

Prints, for a 1,000-chunk FastChat stream shaped like docs/protocol.md §1.3 (cumulative text that
grows by a couple of tokens per chunk, usage on every chunk, one final finish-only chunk):

- decode + translate + encode cost per chunk, in µs, and each step alone (encode: the relay's
  ``ModelOutput.to_frame``, and the generic ``encode_frame(to_wire())`` it gives the bytes of);
- throughput of the framing decoder alone (``FrameDecoder.feed``, JSON parsing included) when
  the body arrives in 4 KiB and 64 KiB pieces, in MB/s.

Run: ``.venv/bin/python bench/bench_protocol.py`` (or ``make bench``).
"""

from __future__ import annotations

import json
import platform
import random
import time
from collections.abc import Callable
from typing import Any

from protocol.framing import FrameDecoder, encode_frame
from protocol.translate import StreamTranslator

CHUNKS = 1_000
PROMPT_TOKENS = 213
REPEATS = 7
WORDS = ("the", "model", "streams", "cumulative", "text", "so", "every", "chunk", "repeats",
         "all", "of", "the", "output", "so", "far", "é", "中文", "😀")  # fmt: skip


def fastchat_stream(chunks: int = CHUNKS) -> list[bytes]:
    """Frames as a FastChat model_worker writes them: ``json.dumps`` defaults plus a NUL."""
    rng = random.Random(20261121)
    text = ""
    frames = []
    for i in range(chunks - 1):
        text += " " + rng.choice(WORDS) + (" " + rng.choice(WORDS) if i else "")
        completion = 2 * i
        chunk = {
            "text": text.lstrip(),
            "error_code": 0,
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": completion,
                "total_tokens": PROMPT_TOKENS + completion,
            },
            "finish_reason": None,
            "logprobs": None,
        }
        frames.append(json.dumps(chunk).encode() + b"\0")
    final = json.loads(frames[-1][:-1])
    final["finish_reason"] = "length"
    frames.append(json.dumps(final).encode() + b"\0")
    return frames


def best_of(run: Callable[[], None], repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    frames = fastchat_stream()
    body = b"".join(frames)
    objects: list[dict[str, Any]] = [json.loads(f[:-1]) for f in frames]
    translator_outputs = []
    translator = StreamTranslator()
    for obj in objects:
        out = translator.translate(obj)
        assert out is not None
        translator_outputs.append(out)
    wires = [out.to_wire() for out in translator_outputs]

    def pipeline() -> None:
        decoder = FrameDecoder()
        translator = StreamTranslator()
        for frame in frames:  # one network read per chunk, as FastChat flushes them
            for chunk in decoder.feed(frame):
                output = translator.translate(chunk)
                if output is not None:
                    output.to_frame()  # the relay's encoding (adapter/relay.py: frame)
        decoder.close()

    def decode_only() -> None:
        decoder = FrameDecoder()
        for frame in frames:
            decoder.feed(frame)

    def translate_only() -> None:
        translator = StreamTranslator()
        for obj in objects:
            translator.translate(obj)

    def to_frame_only() -> None:
        for out in translator_outputs:
            out.to_frame()

    def to_wire_only() -> None:
        for out in translator_outputs:
            out.to_wire()

    def encode_only() -> None:
        for wire in wires:
            encode_frame(wire)

    def feed_in(piece: int) -> Callable[[], None]:
        pieces = [body[i : i + piece] for i in range(0, len(body), piece)]

        def run() -> None:
            decoder = FrameDecoder()
            count = 0
            for data in pieces:
                count += len(decoder.feed(data))
            assert count == CHUNKS

        return run

    print(f"python {platform.python_version()} on {platform.machine()}, best of {REPEATS} runs")
    print(
        f"stream: {CHUNKS} chunks, {len(body) / 1e6:.2f} MB of FastChat frames, "
        f"final text {len(objects[-1]['text'])} chars, mean frame {len(body) // CHUNKS} B"
    )
    per_chunk = 1e6 / CHUNKS
    total = best_of(pipeline)
    print(f"decode + translate + encode   : {total * per_chunk:7.1f} µs/chunk")
    for label, run in (
        ("  decode (FrameDecoder)", decode_only),
        ("  translate (StreamTranslator)", translate_only),
        ("  ModelOutput.to_frame", to_frame_only),
        ("  (generic: to_wire", to_wire_only),
        ("  + encode_frame)", encode_only),
    ):
        print(f"{label:<30}: {best_of(run) * per_chunk:7.1f} µs/chunk")
    for piece in (4 * 1024, 64 * 1024):
        seconds = best_of(feed_in(piece))
        rate = len(body) / seconds / 1e6
        print(f"framing decoder, {piece // 1024:>2} KiB pieces: {rate:7.1f} MB/s")


if __name__ == "__main__":
    main()
