"""The reference worker's "model": a word tokenizer, a scripted reply, FastChat's generation loop.

Everything here is a pure function of its arguments, so a test predicts a reply by calling the
same code the worker runs: ``ScriptedModel().reply(prompt, 4)`` is what the worker streams.

The generation loop reproduces the observable behaviour of FastChat 0.2.36's HF ``generate_stream``
(docs/protocol.md §1.2 and §1.4), written from that description: chunk cadence, cumulative ``text``,
``completion_tokens`` one short of the tokens generated, stop strings cut at the match, chunks
withheld while the text ends with a proper prefix of a stop string, echo of the re-decoded
prompt, left truncation to ``context_length - max_new_tokens - 1`` tokens, top-1 logprobs.

It keeps its own frame encoder and error text instead of importing ``protocol/``: the reference
worker is an independent oracle for conformance tests, so a bug in the adapter's codec must not
be mirrored here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import struct
import sys
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "BOS",
    "BOS_TOKEN_ID",
    "DEFAULT_SCRIPT",
    "EOS",
    "EOS_TOKEN_ID",
    "INTERNAL_ERROR",
    "SERVER_ERROR_MSG",
    "BrokenRequest",
    "GenerationParams",
    "InBandError",
    "ScriptedModel",
    "ScriptedReply",
    "Step",
    "encode_frame",
    "error_chunk",
    "generation_steps",
    "load_replies",
    "parse_generation_params",
    "token_logprob",
]

BOS: Final = "<s>"
EOS: Final = "</s>"
BOS_TOKEN_ID: Final = 1
EOS_TOKEN_ID: Final = 2
_FIRST_WORD_ID: Final = 3
_SPECIAL_IDS: Final = {BOS: BOS_TOKEN_ID, EOS: EOS_TOKEN_ID}

DEFAULT_SCRIPT: Final = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
    "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
)  # fmt: skip

SERVER_ERROR_MSG: Final = (
    "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
)
INTERNAL_ERROR: Final = 50001

# Special tokens are split off even when glued to a word, as a sentencepiece tokenizer would.
_TOKEN_RE: Final = re.compile(r"</?s>|(?:(?!</?s>)\S)+")

Chunk = dict[str, Any]


class InBandError(ValueError):
    """A request FastChat answers with one 50001 error chunk (its ValueError path)."""


class BrokenRequest(Exception):
    """A request that crashes FastChat's generator (KeyError, TypeError, UnboundLocalError).

    FastChat then ends the stream without a chunk, or answers 500 on ``/worker_generate``.
    """


THINK_START: Final = "<think>"
THINK_END: Final = "</think>"
_REPLY_KEYS: Final = ("match", "reply", "think", "finish_reason", "tokens_per_second",
                      "first_token_delay")  # fmt: skip


@dataclass(frozen=True)
class ScriptedReply:
    """A canned answer: when ``match`` (a Python regular expression) is found in the prompt, the
    model answers ``reply``, after a ``<think>`` block when ``think`` is set.

    The reply is tokenized like everything else (whitespace words), so its whitespace comes out
    as single spaces. ``finish_reason`` "stop" ends the turn with EOS after the last word;
    "length" says the reply again and again until ``max_new_tokens``. ``tokens_per_second``
    and ``first_token_delay``, when set, replace the worker's pace for this reply.
    """

    match: str
    reply: str
    think: str | None = None
    finish_reason: Literal["stop", "length"] = "stop"
    tokens_per_second: float | None = None
    first_token_delay: float | None = None

    def __post_init__(self) -> None:
        try:
            re.compile(self.match)
        except re.error as exc:
            raise ValueError(f"match {self.match!r} is not a regular expression: {exc}") from exc
        for name in ("reply", "think"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str) or not _TOKEN_RE.findall(value):
                raise ValueError(f"{name} must be a non-empty string")
            if any(token in _SPECIAL_IDS for token in _TOKEN_RE.findall(value)):
                raise ValueError(f"{name} must not hold {BOS} or {EOS}")
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(f"finish_reason must be stop or length, not {self.finish_reason!r}")
        for name in ("tokens_per_second", "first_token_delay"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or value < 0):
                raise ValueError(f"{name} must be a number >= 0")

    @property
    def text(self) -> str:
        """What the model says, think block included."""
        if self.think is None:
            return self.reply
        return f"{THINK_START} {self.think} {THINK_END} {self.reply}"

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(_TOKEN_RE.findall(self.text))


def load_replies(path: str | Path) -> tuple[ScriptedReply, ...]:
    """Scripted replies from a TOML file (``[[reply]]`` tables) or a JSON file (a list, or an
    object with a ``reply`` list), in file order: the first whose ``match`` hits wins."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError
        raise ValueError(f"{path}: {exc}") from exc
    entries = data.get("reply") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of replies ([[reply]] tables in TOML)")
    replies = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: reply {number} is not a table")
        unknown = sorted(set(entry) - set(_REPLY_KEYS))
        if unknown or not {"match", "reply"} <= set(entry):
            raise ValueError(
                f"{path}: reply {number} needs match and reply, may have "
                f"{', '.join(_REPLY_KEYS[2:])}; unknown: {', '.join(unknown) or '-'}"
            )
        try:
            replies.append(ScriptedReply(**entry))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: reply {number}: {exc}") from exc
    return tuple(replies)


@functools.lru_cache(maxsize=256)
def _reply_for(replies: tuple[ScriptedReply, ...], prompt: str) -> ScriptedReply | None:
    # Called once per generated token with the same prompt: cached.
    return next((r for r in replies if re.search(r.match, prompt)), None)


@dataclass(frozen=True)
class ScriptedModel:
    """A whitespace word tokenizer and a reply that cycles through ``script``.

    The reply starts at a word chosen by a hash of ``seed`` and the prompt, so different prompts
    get different (but always the same) replies.
    """

    script: tuple[str, ...] = DEFAULT_SCRIPT
    seed: int = 0
    context_length: int = 2048
    eos_after: int | None = None
    """Emit EOS as reply token number ``eos_after`` (0-based), ending the turn; None: never."""
    in_order: bool = False
    """Reply with the script from its first word, whatever the prompt (a scripted answer, e.g.
    one with a ``<think>`` block); otherwise start at a word chosen by the prompt's hash. The
    same as a last scripted reply that matches every prompt and goes on (finish "length")."""
    replies: tuple[ScriptedReply, ...] = ()
    """Canned answers for prompts that match a pattern; the first match wins."""

    def __post_init__(self) -> None:
        if not self.script or len(set(self.script)) != len(self.script):
            raise ValueError("script must be a non-empty sequence of distinct words")
        for word in self.script:
            if _TOKEN_RE.fullmatch(word) is None or word in _SPECIAL_IDS:
                raise ValueError(f"script word {word!r} is not a single plain token")
        if self.eos_after is not None and self.eos_after < 0:
            raise ValueError("eos_after must be >= 0")

    def tokenize(self, text: str) -> list[str]:
        """Words split on whitespace, with ``<s>`` and ``</s>`` as tokens of their own; no BOS."""
        return _TOKEN_RE.findall(text)

    def count_tokens(self, text: str) -> int:
        """What ``/count_token`` answers: the words plus one BOS (``""`` gives 1)."""
        return len(self.tokenize(text)) + 1

    def token_id(self, token: str) -> int:
        """The id of a special token or script word, for ``stop_token_ids``; other words: -1."""
        if token in _SPECIAL_IDS:
            return _SPECIAL_IDS[token]
        try:
            return _FIRST_WORD_ID + self.script.index(token)
        except ValueError:
            return -1

    def decode(self, tokens: list[str]) -> str:
        """Tokens joined by one space, special tokens skipped (FastChat decodes that way)."""
        return " ".join(token for token in tokens if token not in _SPECIAL_IDS)

    @functools.cached_property
    def _replies(self) -> tuple[ScriptedReply, ...]:
        if not self.in_order:
            return self.replies
        everything = ScriptedReply(match="", reply=" ".join(self.script), finish_reason="length")
        return (*self.replies, everything)

    def scripted_reply(self, prompt: str) -> ScriptedReply | None:
        """The first scripted reply whose pattern is found in ``prompt`` (``in_order``: the
        script, for any prompt no other reply matches)."""
        return _reply_for(self._replies, prompt) if self._replies else None

    def next_token(self, prompt: str, index: int) -> str:
        """Reply token number ``index`` for ``prompt``: EOS at ``eos_after``; else the words of
        the scripted reply that matches (then EOS, or for finish "length" the reply again); else
        script words from a start chosen by the prompt's hash."""
        if index == self.eos_after:
            return EOS
        scripted = self.scripted_reply(prompt)
        if scripted is not None:
            words = scripted.tokens
            if index < len(words) or scripted.finish_reason == "length":
                return words[index % len(words)]
            return EOS
        digest = hashlib.sha256(f"{self.seed}\0{prompt}".encode()).digest()
        start = int.from_bytes(digest[:8], "big")
        return self.script[(start + index) % len(self.script)]

    def reply(self, prompt: str, max_new_tokens: int) -> list[str]:
        """The first ``max_new_tokens`` reply tokens, ending at EOS if the model emits one."""
        tokens: list[str] = []
        for index in range(max_new_tokens):
            tokens.append(self.next_token(prompt, index))
            if tokens[-1] == EOS:
                break
        return tokens

    def embed(self, text: str, dim: int) -> list[float]:
        """A deterministic L2-normalised float32 vector; unlike FastChat's, batch-independent."""
        raw = hashlib.shake_256(f"{self.seed}\0{text}".encode()).digest(4 * dim)
        values = [n / 2**31 - 1.0 for n in struct.unpack(f">{dim}I", raw)]
        norm = sum(v * v for v in values) ** 0.5 or 1.0
        packed = struct.pack(f"<{dim}f", *(v / norm for v in values))
        return list(struct.unpack(f"<{dim}f", packed))


def token_logprob(token: str, position: int) -> float:
    """A made-up but stable log-probability for the token at ``position`` of the output ids."""
    return -((zlib.crc32(f"{position}:{token}".encode()) % 1000) + 1) / 250


@dataclass(frozen=True)
class GenerationParams:
    """The generation parameters FastChat's HF worker reads, after its own conversions."""

    prompt: str
    max_new_tokens: int = 256
    echo: bool = True
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[object, ...] = ()
    logprobs: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0


def _number(
    body: Mapping[str, Any], key: str, default: float, kind: type[float] | type[int]
) -> Any:
    # float()/int() on the JSON value, like FastChat: a bad string is a ValueError (in-band
    # error), null or a list is a TypeError (a crashed generator).
    try:
        return kind(body.get(key, default))
    except ValueError as exc:
        raise InBandError(str(exc)) from exc
    except TypeError as exc:
        raise BrokenRequest(f"{key}: {exc}") from exc


def parse_generation_params(body: object) -> GenerationParams:
    """Read a ``/worker_generate[_stream]`` body; raise ``InBandError`` or ``BrokenRequest``."""
    if not isinstance(body, Mapping):
        raise BrokenRequest("the body is not a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise BrokenRequest("prompt is missing or not a string")
    temperature = _number(body, "temperature", 1.0, float)
    repetition_penalty = _number(body, "repetition_penalty", 1.0, float)
    top_p = _number(body, "top_p", 1.0, float)
    top_k = _number(body, "top_k", -1, int)
    max_new_tokens = _number(body, "max_new_tokens", 256, int)
    if max_new_tokens <= 0:
        raise BrokenRequest("max_new_tokens must be positive")  # FastChat: UnboundLocalError
    raw_stop = body.get("stop") or ()
    if isinstance(raw_stop, str):
        stop: tuple[Any, ...] = (raw_stop,)
    elif isinstance(raw_stop, list | tuple | Mapping):
        stop = tuple(raw_stop)  # a JSON object iterates its keys, as in FastChat
    else:
        raise InBandError("Invalid stop field type.")
    if not all(isinstance(s, str) for s in stop):
        raise BrokenRequest("stop holds a non-string")  # FastChat: TypeError in str.rfind
    stop_token_ids = body.get("stop_token_ids") or ()
    if not isinstance(stop_token_ids, list | tuple):
        raise BrokenRequest("stop_token_ids is not a list")
    return GenerationParams(
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        echo=bool(body.get("echo", True)),
        stop=stop,
        stop_token_ids=tuple(stop_token_ids),
        logprobs=body.get("logprobs") is not None,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
    )


@dataclass(frozen=True)
class Step:
    """One turn of the generation loop: a token was generated, and ``chunk`` goes out, if any.

    The last step (``final``) generates nothing: it is the extra chunk carrying finish_reason.
    """

    chunk: Chunk | None
    final: bool = False


def _apply_stop(text: str, stops: tuple[str, ...], search_from: int) -> tuple[str, bool, bool]:
    """(text cut at a stop string, stopped, partially stopped). The first hit in order wins;
    a stop string the text ends partway into ends the search, as in FastChat."""
    for stop in stops:
        pos = text.rfind(stop, search_from)
        if pos != -1:
            return text[:pos], True, False
        if any(text.endswith(stop[:k]) for k in range(1, len(stop))):
            return text, False, True
    return text, False, False


def _chunk(text: str, prompt_tokens: int, index: int, finish: str | None, logprobs: Any) -> Chunk:
    return {
        "text": text,
        "error_code": 0,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": index,
            "total_tokens": prompt_tokens + index,
        },
        "finish_reason": finish,
        "logprobs": logprobs,
    }


def _logprobs(tokens: list[str], values: list[float | None]) -> dict[str, Any]:
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {
        "text_offset": offsets,
        "tokens": list(tokens),
        "token_logprobs": list(values),
        "top_logprobs": [{} for _ in values],
    }


def generation_steps(
    model: ScriptedModel, params: GenerationParams, stream_interval: int = 2
) -> Iterator[Step]:
    """FastChat's generation loop over the scripted model: one step per token, then the final.

    A chunk goes out at token index 0, every ``stream_interval`` tokens, at the last index and
    when a stop hits, unless the text ends with a proper prefix of a stop string.
    """
    prompt_ids = [BOS, *model.tokenize(params.prompt)]
    prompt_ids = prompt_ids[-(model.context_length - params.max_new_tokens - 1) :]
    stop_ids = (*params.stop_token_ids, EOS_TOKEN_ID)  # compared with ==, as FastChat's list
    output_ids = list(prompt_ids)
    # Position 0 never has a logprob; the others are scored even when not echoed.
    values: list[float | None] = [None]
    values += [token_logprob(t, p) for p, t in enumerate(prompt_ids) if p > 0]
    search_from = len(model.decode(prompt_ids)) if params.echo else 0
    first_output = 0 if params.echo else len(prompt_ids)
    text, logprobs, stopped, index = "", None, False, 0
    for index in range(params.max_new_tokens):
        token = model.next_token(params.prompt, index)
        output_ids.append(token)
        values.append(token_logprob(token, len(output_ids) - 1))
        stopped = model.token_id(token) in stop_ids
        last = index == params.max_new_tokens - 1
        if not (index % stream_interval == 0 or last or stopped):
            yield Step(None)
            continue
        text = model.decode(output_ids[first_output:])
        if params.logprobs:
            logprobs = _logprobs(output_ids[first_output:], values[first_output:])
        text, stop_hit, partial = _apply_stop(text, params.stop, search_from)
        stopped = stopped or stop_hit
        yield Step(None if partial else _chunk(text, len(prompt_ids), index, None, logprobs))
        if stopped:
            break
    finish = "stop" if stopped else "length"
    yield Step(_chunk(text, len(prompt_ids), index, finish, logprobs), final=True)


def error_chunk(message: str, error_code: int = INTERNAL_ERROR) -> Chunk:
    """FastChat's in-band error: HTTP 200, no usage and no finish_reason."""
    return {"text": f"{SERVER_ERROR_MSG}\n\n({message})", "error_code": error_code}


def encode_frame(chunk: Mapping[str, Any]) -> bytes:
    """Exactly FastChat's framing: ``json.dumps`` defaults (", " and ": ", ASCII) plus NUL."""
    return json.dumps(chunk).encode() + b"\0"
