"""protocol/framing.py: NUL-delimited JSON, decoded incrementally in O(n)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FramingError
from protocol.framing import KEEPALIVE, FrameDecoder, encode_frame
from tests.protocol.test_fastchat import STREAM_1_3, STREAM_CHUNKS


def fastchat_body(objects: list[dict[str, Any]]) -> bytes:
    """Framed the way FastChat's worker frames: ``json.dumps`` defaults, then one NUL."""
    return b"".join(json.dumps(obj).encode() + b"\0" for obj in objects)


def feed_in_pieces(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        out += decoder.feed(data[start:end])
    return out


# --- the captured stream ------------------------------------------------------------------


def test_captured_stream_body_decodes() -> None:
    body = b"".join(line.encode() + b"\0" for line in STREAM_1_3.splitlines())
    decoder = FrameDecoder()
    assert decoder.feed(body) == STREAM_CHUNKS
    assert decoder.pending == 0
    decoder.close()


def test_byte_by_byte_with_keepalives_between_frames() -> None:
    body = KEEPALIVE * 3 + fastchat_body(STREAM_CHUNKS[:2]) + KEEPALIVE + KEEPALIVE
    decoder = FrameDecoder()
    out: list[dict[str, Any]] = []
    for i in range(len(body)):
        out += decoder.feed(body[i : i + 1])
    assert out == STREAM_CHUNKS[:2]
    decoder.close()


def test_multibyte_character_split_across_feeds() -> None:
    frame = encode_frame({"text": "é中😀\ufffd"})  # raw UTF-8 on the wire (LightLLM-style)
    emoji_at = frame.index("😀".encode())
    decoder = FrameDecoder()
    assert decoder.feed(frame[: emoji_at + 2]) == []
    assert decoder.pending == emoji_at + 2
    assert decoder.feed(frame[emoji_at + 2 :]) == [{"text": "é中😀\ufffd"}]


def test_pending_and_close_on_a_body_without_its_final_nul() -> None:
    decoder = FrameDecoder()
    body = fastchat_body(STREAM_CHUNKS[:1]) + b'{"text": "lost"'
    assert decoder.feed(body) == STREAM_CHUNKS[:1]
    assert decoder.pending == len(b'{"text": "lost"')
    with pytest.raises(FramingError) as caught:
        decoder.close()
    assert caught.value.offset == len(fastchat_body(STREAM_CHUNKS[:1]))
    with pytest.raises(FramingError):  # spent: keeps failing
        decoder.feed(b"{}\0")
    assert FrameDecoder.eof is FrameDecoder.close


def test_close_after_whole_frames_is_quiet() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"{}\0\0")
    decoder.close()
    decoder.close()


# --- errors and offsets -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b"[1, 2]", "not an object"),
        (b'"text"', "not an object"),
        (b"null", "not an object"),
        (b"{not json}", "not UTF-8 JSON"),
        (b'{"text": "\xff"}', "not UTF-8 JSON"),
        (b"\n", "not UTF-8 JSON"),  # newline-delimited output is not our framing
        (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
    ],
)
def test_bad_frame_names_its_absolute_offset(bad: bytes, message: str) -> None:
    good = fastchat_body(STREAM_CHUNKS[:2]) + b"\0"
    decoder = FrameDecoder()
    assert decoder.feed(good) == STREAM_CHUNKS[:2]
    with pytest.raises(FramingError, match=message) as caught:
        decoder.feed(bad + b"\0" + fastchat_body(STREAM_CHUNKS[2:]))
    assert caught.value.offset == len(good)
    assert f"offset {len(good)}" in str(caught.value)
    assert caught.value.error_code == 50001


def test_objects_before_a_bad_frame_are_returned_then_the_error() -> None:
    decoder = FrameDecoder()
    prefix = fastchat_body(STREAM_CHUNKS[:2])
    assert decoder.feed(prefix + b"[]\0" + fastchat_body(STREAM_CHUNKS[2:])) == STREAM_CHUNKS[:2]
    with pytest.raises(FramingError) as caught:
        decoder.feed(b"")
    assert caught.value.offset == len(prefix)
    with pytest.raises(FramingError):
        decoder.close()


def test_oversize_detected_before_the_nul_arrives() -> None:
    decoder = FrameDecoder(max_frame_bytes=64)
    assert decoder.feed(b"{}\0" + b'{"text": "' + b"x" * 40) == [{}]
    with pytest.raises(FramingError, match="limit of 64 bytes") as caught:
        decoder.feed(b"x" * 20)  # 70 bytes buffered, no NUL yet
    assert caught.value.offset == 3
    assert decoder.pending == 0  # memory released


def test_oversize_complete_frame_in_one_feed() -> None:
    decoder = FrameDecoder(max_frame_bytes=10)
    with pytest.raises(FramingError, match="limit") as caught:
        decoder.feed(b"\0" + b'{"a": "0123456789"}\0')
    assert caught.value.offset == 1
    assert FrameDecoder(max_frame_bytes=12).feed(b'{"a": "012"}\0') == [{"a": "012"}]


def test_frame_exactly_at_the_limit_is_fine() -> None:
    frame = b'{"a": "' + b"x" * 10 + b'"}'
    decoder = FrameDecoder(max_frame_bytes=len(frame))
    assert decoder.feed(frame) == []
    assert decoder.feed(b"\0") == [{"a": "x" * 10}]
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_bytes=0)


# --- O(n) ----------------------------------------------------------------------------------


def test_trickled_large_frame_is_scanned_once() -> None:
    frame = encode_frame({"text": "x" * 200_000})
    decoder = FrameDecoder()
    out: list[dict[str, Any]] = []
    for i in range(len(frame)):
        out += decoder.feed(frame[i : i + 1])
    assert out == [{"text": "x" * 200_000}]
    # Each byte is searched exactly once; a re-scanning reader would need ~2e10.
    assert decoder.bytes_scanned == len(frame)


@given(st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=30))
def test_bytes_scanned_equals_bytes_fed_for_any_piece_sizes(sizes: list[int]) -> None:
    body = fastchat_body(STREAM_CHUNKS) * 20
    decoder = FrameDecoder()
    position = 0
    out: list[dict[str, Any]] = []
    while position < len(body):
        size = sizes[len(out) % len(sizes)]
        out += decoder.feed(body[position : position + size])
        position += size
    assert out == STREAM_CHUNKS * 20
    assert decoder.bytes_scanned == len(body)


# --- encoder -------------------------------------------------------------------------------


def test_encode_frame_is_compact_utf8_plus_nul() -> None:
    assert encode_frame({"text": "é", "n": [1, 2]}) == '{"text":"é","n":[1,2]}'.encode() + b"\0"
    assert KEEPALIVE == b"\0"


def test_encode_frame_never_contains_a_raw_nul() -> None:
    frame = encode_frame({"text": "a\0b"})
    assert frame.count(b"\0") == 1 and frame.endswith(b"\0")
    assert FrameDecoder().feed(frame) == [{"text": "a\0b"}]


def test_encode_frame_lone_surrogate_falls_back_to_ascii_escapes() -> None:
    frame = encode_frame({"text": "\ud83d"})  # decoded from a worker's "\ud83d" escape
    assert frame == b'{"text":"\\ud83d"}\0'
    assert FrameDecoder().feed(frame) == [{"text": "\ud83d"}]


# --- properties ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=5)


@given(
    objects=st.lists(json_objects, max_size=8),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
    keepalives=st.lists(st.integers(min_value=0, max_value=9), max_size=4),
    ascii_json=st.booleans(),
)
def test_any_split_of_any_valid_stream_decodes_to_the_same_objects(
    objects: list[dict[str, Any]], cuts: list[int], keepalives: list[int], ascii_json: bool
) -> None:
    frames = [
        json.dumps(obj, ensure_ascii=ascii_json).encode("utf-8", "surrogatepass")
        if ascii_json
        else encode_frame(obj)[:-1]
        for obj in objects
    ]
    for where in keepalives:  # empty frames anywhere are skipped
        frames.insert(where % (len(frames) + 1), b"")
    body = b"".join(frame + b"\0" for frame in frames)
    decoder = FrameDecoder()
    assert feed_in_pieces(decoder, body, cuts) == objects
    assert decoder.pending == 0
    assert decoder.bytes_scanned == len(body)
    decoder.close()


@settings(max_examples=300)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_garbage_never_hangs_or_raises_anything_but_framing_error(
    data: bytes, cuts: list[int]
) -> None:
    decoder = FrameDecoder(max_frame_bytes=64)
    try:
        for obj in feed_in_pieces(decoder, data, cuts):
            assert isinstance(obj, dict)
        decoder.close()
    except FramingError as exc:
        assert 0 <= exc.offset <= len(data)


@given(junk=st.binary(min_size=1, max_size=50).filter(lambda b: b"\0" not in b))
def test_error_offset_points_at_the_bad_frame(junk: bytes) -> None:
    prefix = fastchat_body(STREAM_CHUNKS[:1])
    decoder = FrameDecoder()
    try:
        decoded = decoder.feed(prefix + junk + b"\0")
        decoder.feed(b"")
    except FramingError as exc:
        assert exc.offset == len(prefix)
    else:  # the junk happened to be a JSON object
        assert isinstance(decoded[-1], dict) and len(decoded) == 2


# --- the decode: json's scanner direct for the common frame, json.loads for the rest ---------

_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def _as_json_loads_sees_it(raw: bytes) -> str:
    """What the decoder must give for ``raw``: ``json.loads``'s object (its repr: int and float,
    -0.0 and nan told apart), or the error it raises, as the pre-scanner decoder worded it."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except RecursionError:
        return "error: frame nests too deeply"
    except ValueError as exc:
        return f"error: frame is not UTF-8 JSON: {exc}"
    if not isinstance(obj, dict):
        return f"error: frame is a JSON {type(obj).__name__}, not an object"
    return repr(obj)


def _decoded(raw: bytes) -> str:
    decoder = FrameDecoder()
    try:
        [obj] = decoder.feed(raw + b"\0")
    except FramingError as exc:
        return "error: " + str(exc).rsplit(" (frame at stream offset", 1)[0]
    return repr(obj)


@settings(max_examples=400)
@given(
    value=st.dictionaries(st.text(), _JSON_VALUES, max_size=6),
    ascii_only=st.booleans(),
    indent=st.sampled_from([None, 0, 2]),
    around=st.sampled_from(["", " ", "\n", "\t ", "\ufeff"]),
    tail=st.sampled_from(["", " ", "x", "}", ",{}", "\r\n"]),
)
def test_decode_is_json_loads_for_any_object_and_anything_around_it(
    value: dict[str, Any], ascii_only: bool, indent: int | None, around: str, tail: str
) -> None:
    text = around + json.dumps(value, ensure_ascii=ascii_only, indent=indent) + tail
    raw = text.encode("utf-8", "surrogatepass")
    assert _decoded(raw) == _as_json_loads_sees_it(raw)


@settings(max_examples=400)
@given(raw=st.binary(min_size=1, max_size=60).filter(lambda b: b"\0" not in b))
def test_decode_is_json_loads_for_any_bytes(raw: bytes) -> None:
    assert _decoded(b"{" + raw) == _as_json_loads_sees_it(b"{" + raw)
    assert _decoded(raw) == _as_json_loads_sees_it(raw)


@pytest.mark.parametrize(
    "raw",
    [b'{"a": 123456789012345678901234567890}', b'{"a": NaN, "b": -Infinity}', b'{"a": 1e400}',
     b'{"a": "\\ud800"}', b'{"a": 1, "a": 2}', b'{"a": 1} ', b'{"a": 1}}', b'{"a": 1} {}',
     b"{" * 5000 + b"}" * 5000, b'{"a": "\xff"}'],
)  # fmt: skip
def test_decode_of_the_edges_json_loads_decides(raw: bytes) -> None:
    assert _decoded(raw) == _as_json_loads_sees_it(raw)


def test_failure_is_the_error_kept_for_the_next_feed() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b'{"a": 1}\0[]\0') == [{"a": 1}]
    kept = decoder.failure
    assert kept is not None and kept.offset == len(b'{"a": 1}\0')
    with pytest.raises(FramingError) as caught:
        decoder.feed(b"")
    assert caught.value is kept
    assert FrameDecoder().failure is None


def _fed(decoder: FrameDecoder, piece: bytes | bytearray) -> object:
    try:
        return decoder.feed(piece), decoder.offset, decoder.bytes_scanned
    except FramingError as exc:
        return str(exc), exc.offset, decoder.offset, decoder.bytes_scanned


@settings(max_examples=300)
@given(
    st.lists(
        st.one_of(
            st.dictionaries(st.text(max_size=5), _JSON_VALUES, max_size=3).map(json.dumps),
            st.sampled_from(["", "[]", "{", "x" * 70, '{"a": 1} ', " {}"]),
        ).map(lambda text: text.encode("utf-8", "surrogatepass") + b"\0"),
        max_size=8,
    )
)
def test_a_read_of_one_whole_frame_decodes_as_any_other_read(frames: list[bytes]) -> None:
    # bytes of exactly one frame take a shorter way than the buffer (FrameDecoder._one_frame)
    direct, buffered = FrameDecoder(max_frame_bytes=64), FrameDecoder(max_frame_bytes=64)
    for frame in frames:
        assert _fed(direct, frame) == _fed(buffered, bytearray(frame))
