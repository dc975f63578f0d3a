"""DB-GPT ⇄ FastChat translation, as pure functions (docs/protocol.md §9).

Request direction, in the order the adapter calls it::

    PromptRequest ──build_prompt──▶ prompt ──(shell: /count_token)──▶ prompt_tokens
    PromptRequest + prompt + template + context length + prompt_tokens
                  ──plan_generation──▶ GenerationPlan(params, echo_prompt)

Reply direction: every FastChat chunk goes through one ``StreamTranslator`` per stream
(``translate_reply`` for ``/worker_generate``); embeddings, count_token and model_details
replies have their own small functions. Every failure is a ``ProtocolError`` carrying the
``error_code`` to report it with; ``error_output`` builds that report.
"""

from __future__ import annotations

import base64
import binascii
import struct
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from protocol import dbgpt, fastchat
from protocol.conversation import IMAGE_PLACEHOLDER, places_images, render_prompt
from protocol.dbgpt import (
    ExtMetadata,
    FrameEncoder,
    ModelMessage,
    ModelMetadata,
    ModelOutput,
    PromptRequest,
)
from protocol.errors import (
    ContextOverflow,
    InvalidReply,
    InvalidRequest,
    ProtocolError,
    WorkerError,
)
from protocol.fastchat import Chunk, ChunkUsage, ConvTemplate, ErrorCode, GenerationParams
from protocol.reasoning import ReasoningMode, ReasoningParser, ReasoningRule

__all__ = [
    "GenerationPlan",
    "StreamTranslator",
    "build_prompt",
    "conversation_turns",
    "count_from_reply",
    "embeddings_from_reply",
    "embeddings_request",
    "error_output",
    "model_metadata",
    "normalize_finish_reason",
    "plan_generation",
    "request_images",
    "translate_reply",
]

Turn = tuple[int, str | None]  # (0 = roles[0] / user, 1 = roles[1] / assistant), content
FinishReason = Literal["stop", "length"]


# --- prompt -------------------------------------------------------------------------------


def conversation_turns(
    messages: Sequence[ModelMessage], *, mark_images: bool = False
) -> tuple[list[Turn], str | None]:
    """DB-GPT messages → (turns for ``render_prompt``, system message or None).

    Mapping by position, never by role string (§10 item 1), as FastChat's own API server does:

    - ``human`` → turn 0, ``ai`` → turn 1; the open assistant turn ``(1, None)`` is appended.
    - ``system`` replaces the template's system message wherever it stands. With several,
      **the last one wins**, like FastChat's ``openai_api_server`` (DB-GPT v2 would refuse the
      request; the earlier ones are usually the client's defaults being overridden).
    - ``view`` (DB-GPT UI-only) is dropped.
    - Consecutive ``human`` messages are merged with ``"\\n"``: DB-GPT's apiserver splits one
      multi-part OpenAI message into several, and FastChat picks separators by index parity, so
      unmerged they would misplace ``sep2`` (§9.2 item 2). Consecutive ``ai`` messages are kept
      as they are, as FastChat keeps them.
    - An empty message is kept: FastChat renders ``""`` like an open turn, and so do we.

    Content lists keep only their ``text`` parts, joined with ``"\\n"``. ``thinking`` parts
    (earlier reasoning) are dropped, as chat templates do not feed reasoning back; ``image`` and
    other media parts are dropped too. With ``mark_images`` (images go to a multimodal worker
    and the template is one FastChat marks them in), a ``human`` message's text gets one
    ``IMAGE_PLACEHOLDER`` per image part in front, as FastChat 0.2.36 renders it.
    """
    system: str | None = None
    turns: list[Turn] = []
    for message in messages:
        if message.role == "view":
            continue
        text = _message_text(message)
        if mark_images and message.role == "human":
            text = IMAGE_PLACEHOLDER * len(_images(message)) + text
        if message.role == "system":
            system = text
        elif message.role == "ai":
            turns.append((1, text))
        elif turns and turns[-1][0] == 0:
            turns[-1] = (0, _join((turns[-1][1] or "", text)))
        else:
            turns.append((0, text))
    turns.append((1, None))
    return turns, system


def build_prompt(
    request: PromptRequest,
    template: ConvTemplate,
    *,
    numbering: str | None = None,
    with_images: bool = False,
) -> str:
    """The prompt to send: ``request.prompt`` verbatim on the completion path (``prompt`` given
    and no messages or ``chat_model: false``), else the messages rendered with the worker's
    conversation template. ``numbering`` picks the ``sep_style`` table ("0.2.36", "main", or
    None to detect it; see ``render_prompt``). ``with_images``: the request's images go to the
    worker, so they are marked in the prompt where FastChat marks them. A template that cannot
    be rendered raises ``UnknownSeparatorStyle`` or ``InvalidReply``."""
    if request.prompt is not None and request.is_completion:
        return request.prompt
    conv = template.raw_view()
    try:
        mark = with_images and places_images(conv, numbering=numbering)
    except ValueError:
        mark = False  # render_prompt below reports the unusable template
    turns, system = conversation_turns(request.messages, mark_images=mark)
    try:
        return render_prompt(conv, turns, system, numbering=numbering)
    except ProtocolError:
        raise
    except ValueError as exc:  # a template render_prompt cannot use: the worker's fault
        raise InvalidReply(f"cannot render the template: {exc}", field="conv") from exc


def _message_text(message: ModelMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    parts: list[str] = []
    for part in message.content:
        if part.type != "text":
            continue
        if not isinstance(part.object.data, str):
            raise InvalidRequest("a text part must carry a string", field="messages.content")
        parts.append(part.object.data)
    return _join(parts)


def request_images(request: PromptRequest) -> list[str]:
    """The images of the request's ``human`` messages, in order, in the form FastChat's
    ``openai_api_server`` sends as ``images`` (§3.3): a URL as given (``http(s):`` or
    ``data:``), base64 data as a ``data:`` URL. The completion path has none."""
    if request.is_completion:
        return []
    return [url for m in request.messages if m.role == "human" for url in _images(m)]


def _images(message: ModelMessage) -> list[str]:
    if isinstance(message.content, str):
        return []
    urls = []
    for part in message.content:
        data, fmt = part.object.data, part.object.format or ""
        if part.type != "image" or not isinstance(data, str) or not data:
            continue
        kind, _, mime = fmt.partition("@")  # DB-GPT: "url", "base64@image/jpeg"…
        if kind == "base64" and not data.startswith("data:"):
            data = f"data:{mime or 'image/jpeg'};base64,{data}"
        urls.append(data)
    return urls


def _join(parts: Sequence[str]) -> str:
    return "\n".join(part for part in parts if part)


# --- generation parameters ----------------------------------------------------------------


@dataclass(frozen=True)
class GenerationPlan:
    """What to send, and what to do with the answer.

    ``echo_prompt`` is set when a completion asked for echo: FastChat is always sent
    ``echo: false`` (its echo is the *re-decoded* prompt, not the original), and the
    ``StreamTranslator`` built with ``StreamTranslator(echo_prompt=plan.echo_prompt)`` prepends
    the exact original prompt instead (§9.2 item 7). ``reasoning`` is how the answer's text is
    split into thinking and answer (None: relayed as it is; ``protocol.reasoning``).
    """

    params: GenerationParams
    echo_prompt: str | None = None
    reasoning: ReasoningRule | None = None


TOKEN_BOUND_MARGIN: Final = 16
"""Tokens a tokenizer may add to the prompt's own: BOS/EOS and other special tokens, and
SentencePiece's dummy-prefix piece (a few in practice; 16 leaves room)."""


def prompt_tokens_bound(prompt: str) -> int:
    """An upper bound on ``/count_token``'s answer for ``prompt`` (§1.8), for byte-level BPE
    and SentencePiece (byte fallback) tokenizers: every token covers at least one UTF-8 byte
    of the text it is made of, plus the special tokens they add. SentencePiece may first
    normalise (NFKC can expand a character: U+FDFA is 3 bytes, 33 after NFKC), so the larger
    of the two byte lengths counts. MLX's worker counts characters (fewer than bytes) and
    the HF-API worker answers 0: both stay under the bound too. Checked against the interop
    model's tokenizer by ``tests/interop/test_token_bound.py``."""
    size = len(prompt.encode("utf-8", "surrogatepass"))
    if not prompt.isascii():
        size = max(
            size, len(unicodedata.normalize("NFKC", prompt).encode("utf-8", "surrogatepass"))
        )
    return size + TOKEN_BOUND_MARGIN


def count_can_matter(request: PromptRequest, prompt: str, context_length: int) -> bool:
    """Whether the exact prompt token count can change the plan (``plan_generation``): only
    when ``max_new_tokens`` is missing (the budget is sent) or the bound on the prompt plus
    the requested tokens may not fit the context (the clamp may bind, or overflow)."""
    requested = request.max_new_tokens
    return requested is None or prompt_tokens_bound(prompt) + requested + 1 > context_length


def plan_generation(
    request: PromptRequest,
    *,
    model: str,
    prompt: str,
    template: ConvTemplate,
    context_length: int,
    prompt_tokens: int,
    default_temperature: float,
    reasoning: ReasoningMode = "pass",
    images: Sequence[str] = (),
) -> GenerationPlan:
    """FastChat generation parameters for ``request`` (§9.2), with ``openai_api_server``'s
    semantics where DB-GPT's differ.

    - ``stop``: the request's stop strings in order, then the template's ``stop_str``, without
      duplicates or empty strings; omitted when there are none. (FastChat's server unions them
      too, but in set order; DB-GPT's worker lets the request's replace the template's.)
    - ``stop_token_ids``: the request's non-empty list, else the template's; omitted if empty.
    - ``max_new_tokens`` = min(requested, ``context_length - prompt_tokens - 1``). The one
      token of slack stops the worker from left-truncating the prompt and dropping its BOS
      (§3.5). Nothing left raises ``ContextOverflow`` (40303): do not call the worker.
    - ``temperature``: the request's, else ``default_temperature``, which the caller must pick.
      DB-GPT's apiserver sends 0.7 when its client gave none and *drops the key when the client
      asked for 0* (§8.2), so an absent temperature usually means greedy: **0.0 is the
      recommended default** (FastChat's own default, 1.0, would sample).
    - ``top_p``, ``top_k``, ``presence_penalty``, ``frequency_penalty``: copied when given,
      otherwise omitted, never sent as null (§1.2).
    - ``echo``: always ``false`` (see ``GenerationPlan``); echo is honoured on the completion
      path only. DB-GPT's chat callers all send ``echo: false``, and echoing a chat would show
      the rendered template.
    - ``model`` is always set; DB-GPT-only keys (``span_id``, ``context_len``, ``user``…) are
      not forwarded. ``context_length`` comes from the worker, not the request's ``context_len``.
    - ``images``: sent as FastChat's ``images`` (only for a multimodal worker; see
      ``request_images``); omitted when empty.
    - ``reasoning``: the ``--reasoning`` mode; the plan carries the rule for this model and
      prompt (``ReasoningRule.for_request``).
    """
    budget = context_length - prompt_tokens - 1
    if budget <= 0:
        raise ContextOverflow(context_length=context_length, prompt_tokens=prompt_tokens)
    requested = request.max_new_tokens
    request_stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    stops = list(dict.fromkeys(s for s in (*request_stops, *template.stop_strings) if s))
    params = GenerationParams(
        model=model,
        prompt=prompt,
        temperature=default_temperature if request.temperature is None else request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        max_new_tokens=budget if requested is None else min(requested, budget),
        stop=stops or None,
        stop_token_ids=request.stop_token_ids or template.stop_token_ids or None,
        echo=False,
        images=list(images) or None,
    )
    echo = request.prompt if request.is_completion and request.echo else None
    rule = ReasoningRule.for_request(
        reasoning, model=model, prompt=prompt, completion=request.is_completion
    )
    return GenerationPlan(params=params, echo_prompt=echo, reasoning=rule)


# --- output stream ------------------------------------------------------------------------


def normalize_finish_reason(value: str | list[str | None] | None) -> FinishReason | None:
    """``"stop"``, ``"length"`` or None, the only values DB-GPT's OpenAI layer survives (§10
    item 15): a list (vLLM, n > 1) gives its first element; ``""`` counts as None; anything
    else (vLLM's ``"abort"``, ``"tool_calls"``…) is ``"stop"``."""
    if isinstance(value, list):
        value = value[0] if value else None
    if not value:
        return None
    return "length" if value == "length" else "stop"


def error_output(code: int, message: str) -> ModelOutput:
    """One in-band DB-GPT error frame. DB-GPT tests only ``error_code != 0`` and shows ``text``."""
    if code == 0:
        raise ValueError("an error output needs a non-zero error code")
    return ModelOutput(text=message, error_code=int(code))


class StreamTranslator:
    """FastChat ``/worker_generate_stream`` chunks → DB-GPT ``ModelOutput`` frames, one object
    per stream (§9.3). Pure: it never reads or writes anything.

    - ``text`` stays cumulative and untouched (DB-GPT strips U+FFFD itself).
    - An error chunk is forwarded with its code and text and ends the stream.
    - ``finish_reason`` is normalised (``normalize_finish_reason``); the chunk carrying it ends
      the stream, and later chunks (vLLM's and LightLLM's repeated final payload) are dropped.
    - ``usage`` keeps the three standard keys, as sent: model_worker's ``completion_tokens``
      is one short (§1.4), but the stream cannot tell it from vLLM's exact count.
    - A chunk that only adds the finish reason to unchanged text loses its ``usage``: with it,
      DB-GPT's apiserver sends the finish event twice (§8.4). The previous chunk had the same
      usage anyway.

    - With a ``reasoning`` rule, each frame's cumulative text is split into thinking and answer
      (``ReasoningParser``): neither ever shrinks. Error frames keep the plain form.

    ``translate`` returns None for a chunk to drop. At a clean end of the body call ``finish``:
    it returns the frame still owed downstream, if any.
    """

    def __init__(
        self, *, echo_prompt: str | None = None, reasoning: ReasoningRule | None = None
    ) -> None:
        self._prefix = echo_prompt or ""
        self._context = None if echo_prompt is None else _echo_context(echo_prompt)
        # None without a rule: the text passes through, without the parser's Split per frame.
        self._reasoning = None if reasoning is None else ReasoningParser(reasoning)
        self._text: str | None = None  # upstream text of the last chunk
        self._ended = False

    @property
    def ended(self) -> bool:
        """Whether a finish reason or an error has been seen (or ``finish`` called)."""
        return self._ended

    def translate(self, chunk: dict[str, Any]) -> ModelOutput | None:
        if self._ended:
            return None
        fields = _plain_fields(chunk)
        if fields is None:
            parsed = Chunk.from_wire(chunk)
            if parsed.error_code != 0:
                self._ended = True
                return error_output(parsed.error_code, parsed.text)
            fields = parsed.text, parsed.finish_reason, _usage(parsed.usage)
        text, finish_reason, usage = fields
        output = _output(text, finish_reason, usage, self._prefix, self._context, self._reasoning)
        if output.finish_reason is not None:
            self._ended = True
            if output.usage is not None and _unchanged(self._text or "", text):
                output = output.model_copy(update={"usage": None})
        self._text = text
        return output

    def frame(self, chunk: dict[str, Any], encoder: FrameEncoder) -> bytes | None:
        """``encoder.encode(self.translate(chunk))``, without the ``ModelOutput``, for the chunks
        relayed by the thousand: the common shape (``_plain_fields``), no finish reason, no
        echo. The same bytes, and the translator as ``translate`` leaves it. None, with nothing
        changed, for any other chunk: it goes through ``translate``."""
        if self._ended or self._context is not None:
            return None
        fields = _plain_fields(chunk)
        if fields is None or fields[1]:  # a finish reason ("" counts as none) ends the stream
            return None
        text, _, usage = fields
        self._text = text
        if self._reasoning is None:
            return encoder.plain(self._prefix + text, None, usage)
        split = self._reasoning.feed(text)
        return encoder.plain(self._prefix + split.answer, split.thinking, usage)

    def finish(self) -> ModelOutput | None:
        """At a clean end of the upstream body: None if the stream already ended properly.
        Otherwise SGLang and DashInfer, which never send a finish reason, get a closing
        ``"stop"`` frame (same text, so DB-GPT adds nothing), and a body without any chunk
        gives an error frame (50001)."""
        if self._ended:
            return None
        self._ended = True
        if self._text is None:
            return error_output(
                ErrorCode.INTERNAL_ERROR, "the FastChat worker's stream ended without any output"
            )
        return _output(self._text, "stop", None, self._prefix, self._context, self._reasoning)


def translate_reply(
    reply: dict[str, Any],
    *,
    echo_prompt: str | None = None,
    reasoning: ReasoningRule | None = None,
) -> ModelOutput:
    """The ``/worker_generate`` reply (FastChat's last chunk) → one DB-GPT ``ModelOutput``,
    split like a stream's last frame."""
    parsed = Chunk.from_wire(reply)
    if parsed.error_code != 0:
        return error_output(parsed.error_code, parsed.text)
    context = None if echo_prompt is None else _echo_context(echo_prompt)
    usage = _usage(parsed.usage)
    parser = None if reasoning is None else ReasoningParser(reasoning)
    return _output(parsed.text, parsed.finish_reason, usage, echo_prompt or "", context, parser)


RawFinishReason = str | list[str | None] | None
ChunkFields = tuple[str, RawFinishReason, dict[str, Any] | None]
"""A chunk's text, raw finish reason and usage (the three token counts, extra keys ignored)."""


def _plain_fields(chunk: object) -> ChunkFields | None:
    """The fields of a chunk in the shape nearly every one has, read without building a
    ``Chunk`` (the relay translates one per upstream frame, issue 14): a dict with a ``str``
    text, ``error_code`` 0 or absent, ``finish_reason`` absent, null or a ``str``, ``usage``
    absent, null or holding all three token counts as ints. Exact types only, so these are the
    very values ``Chunk.from_wire`` would give; None for anything else (bools or floats where
    ints belong, partial usage, lists, error chunks…), which goes through ``Chunk.from_wire``
    and keeps its coercions and its errors."""
    if type(chunk) is not dict:
        return None
    text, code = chunk.get("text"), chunk.get("error_code", 0)
    finish_reason, usage = chunk.get("finish_reason"), chunk.get("usage")
    if (
        type(text) is not str
        or type(code) is not int
        or code != 0
        or not (finish_reason is None or type(finish_reason) is str)
    ):
        return None
    if usage is None or (
        type(usage) is dict
        and type(usage.get("prompt_tokens")) is int
        and type(usage.get("completion_tokens")) is int
        and type(usage.get("total_tokens")) is int
    ):
        return text, finish_reason, usage
    return None


def _output(
    text: str,
    finish_reason: RawFinishReason,
    usage: dict[str, Any] | None,
    prefix: str,
    context: dict[str, Any] | None,
    reasoning: ReasoningParser | None,
) -> ModelOutput:
    if reasoning is None:
        thinking, answer = None, text
    else:
        split = reasoning.feed(text)
        thinking, answer = split.thinking, split.answer
    return ModelOutput.from_values(
        {
            "text": prefix + answer,
            "error_code": 0,
            "model_context": context,
            "finish_reason": normalize_finish_reason(finish_reason),
            "usage": usage,
            "thinking": thinking,
        }
    )


def _usage(usage: ChunkUsage | None) -> dict[str, int] | None:
    if usage is None or (  # MLX ends with "usage": {}; compared by field: cheaper per frame
        usage.prompt_tokens is None
        and usage.completion_tokens is None
        and usage.total_tokens is None
    ):
        return None
    prompt = usage.prompt_tokens or 0
    completion = usage.completion_tokens or 0
    total = prompt + completion if usage.total_tokens is None else usage.total_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def _unchanged(previous: str, text: str) -> bool:
    # DB-GPT's delta is computed after removing U+FFFD; compare the same way.
    return text.replace("\ufffd", "") == previous.replace("\ufffd", "")


def _echo_context(prompt: str) -> dict[str, Any]:
    """DB-GPT's own echo bookkeeping (§6.5): its output parser strips this many characters."""
    echo_len = len(prompt.replace("<s>", "").replace("</s>", ""))
    return {"prompt_echo_len_char": echo_len, "has_format_prompt": True, "echo": True}


# --- embeddings, count_token, model_details -----------------------------------------------


def embeddings_request(
    request: dbgpt.EmbeddingsRequest, *, model: str
) -> fastchat.EmbeddingsRequest:
    """FastChat body for a DB-GPT embeddings call; ``encoding_format`` is left out (floats).
    A rerank request never gets here: FastChat has no reranker, and the route refuses it."""
    return fastchat.EmbeddingsRequest(model=model, input=list(request.input))


def embeddings_from_reply(
    reply: dict[str, Any], *, expected: int | None = None
) -> list[list[float]]:
    """``{"embedding", "token_num"}`` → the bare ``[[float]]`` DB-GPT wants (the wrapped form
    becomes garbage there, §8.6). Base64 vectors are decoded. The worker's error object raises
    ``WorkerError``; a vector count other than ``expected`` raises ``InvalidReply``."""
    parsed = fastchat.EmbeddingsResponse.from_wire(reply)
    if parsed.error_code != 0:
        raise WorkerError(parsed.text or "embeddings failed", error_code=parsed.error_code)
    if parsed.embedding is None:
        raise InvalidReply("no embedding in the reply", field="embedding")
    vectors = [v if isinstance(v, list) else _float32_vector(v) for v in parsed.embedding]
    if expected is not None and len(vectors) != expected:
        raise InvalidReply(f"{len(vectors)} vectors for {expected} inputs", field="embedding")
    return vectors


def _float32_vector(encoded: str) -> list[float]:
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise InvalidReply(f"bad base64 vector: {exc}", field="embedding") from None
    if len(raw) % 4:
        raise InvalidReply("base64 vector is not whole float32s", field="embedding")
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def count_from_reply(reply: dict[str, Any]) -> int:
    """``/count_token`` reply → the bare int DB-GPT's ``/api/worker/count_token`` returns."""
    parsed = fastchat.CountTokenReply.from_wire(reply)
    if parsed.error_code != 0:
        raise WorkerError(f"count_token failed ({parsed.count})", error_code=parsed.error_code)
    return parsed.count


def model_metadata(
    model: str, context_length: int, template: ConvTemplate | None = None
) -> ModelMetadata:
    """``/api/worker/model_metadata`` reply (§9.1): the safe cross-version key set only, roles
    in DB-GPT's vocabulary, ``prompt_sep`` the template's ``sep`` (or ``"\\n"``)."""
    sep = template.sep if template is not None and template.sep else "\n"
    return ModelMetadata(
        model=model,
        context_length=context_length,
        chat_model=True,
        metadata={},
        ext_metadata=ExtMetadata(
            prompt_roles=["system", "human", "ai"], prompt_sep=sep, prompt_chat_template=None
        ),
    )
