"""DB-GPT wire messages: the model controller (docs/protocol.md §5) and the worker API (§6, §7).

Two rules shape this module:

- **Requests in** are parsed the way DB-GPT's own pydantic models parse them, across 0.4–0.8:
  unknown keys ignored, an explicit ``null`` meaning "absent" (so the default applies), and
  ``from_wire`` raising ``InvalidRequest`` naming the field.
- **Replies out** are emitted with ``to_wire()``, which gives *exactly* the documented keys:
  DB-GPT clients up to 0.6 rebuild them with ``cls(**dict)``, where one unknown key is a
  TypeError (§10 item 14). So the key sets below are the safe cross-version ones, never more.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from json.encoder import encode_basestring
from typing import Any, Final, Literal

from pydantic import Field, StrictBool, StrictInt, field_validator, model_validator

from protocol._wire import WireModel
from protocol.errors import InvalidMessage, InvalidRequest
from protocol.framing import encode_frame

__all__ = [
    "CountTokenRequest",
    "EmbeddingsRequest",
    "ExtMetadata",
    "FrameEncoder",
    "GrowingTextEscaper",
    "MediaContent",
    "MediaObject",
    "ModelInstance",
    "ModelMessage",
    "ModelMetadata",
    "ModelMetadataRequest",
    "ModelOutput",
    "ParameterDescription",
    "PromptRequest",
    "SupportedModel",
    "Usage",
    "WorkerApplyOutput",
    "WorkerApplyRequest",
    "WorkerStartupRequest",
    "WorkerSupportedModel",
    "WorkerType",
    "parse_worker_key",
    "worker_key",
]


class _Reply(WireModel):
    """A body we send to DB-GPT: every documented key, nulls included, nothing else."""

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class _Request(WireModel):
    """A body DB-GPT sends us. Explicit nulls are dropped before validation, so they mean the
    same as an absent key (DB-GPT's completions path sends ``"stop": null, "user": null``)."""

    invalid = InvalidRequest

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


# --- controller: registry entries and worker keys (§5) -----------------------------------


class WorkerType(str, Enum):
    LLM = "llm"
    TEXT2VEC = "text2vec"
    RERANKER = "reranker"  # 0.7+; 0.6 registers rerankers as text2vec


def worker_key(name: str, worker_type: WorkerType) -> str:
    """``"<name>@<type>"``, the registry's ``model_name``. DB-GPT's helpers reject names with
    ``@`` and a key without exactly one ``@`` crashes its model list (§5.4, §10 item 21)."""
    if not name.strip() or "@" in name:
        raise InvalidMessage(f"invalid DB-GPT model name {name!r}", field="model_name")
    return f"{name}@{worker_type.value}"


def parse_worker_key(key: str) -> tuple[str, WorkerType]:
    """Split ``"<name>@<type>"``; the inverse of ``worker_key``."""
    name, at, kind = key.strip().partition("@")
    try:
        worker_type = WorkerType(kind)
    except ValueError:
        worker_type = None
    if not at or not name or "@" in kind or worker_type is None:
        raise InvalidMessage(f"invalid DB-GPT worker key {key!r}", field="model_name")
    return name, worker_type


class ModelInstance(_Reply):
    """A registry entry (``P/model/base.py``), keys in DB-GPT's order (§5.1, §5.5). The same full
    body is sent to register and to heartbeat; extra keys of newer controllers are dropped."""

    model_name: str  # the worker key, name@type
    host: str
    port: int
    weight: float = 1.0
    check_healthy: bool = True
    healthy: bool = False
    enabled: bool = True
    prompt_template: str | None = None
    last_heartbeat: str | None = None  # naive local ISO time, kept as the controller wrote it
    remove_from_registry: bool = False  # 0.7+

    def delete_params(self, *, remove_from_registry: bool = True) -> dict[str, str]:
        """Query string of ``DELETE /api/controller/models``, which reads no body (§5.2)."""
        return {
            "model_name": self.model_name,
            "host": self.host,
            "port": str(self.port),
            "remove_from_registry": "true" if remove_from_registry else "false",
        }


# --- worker API: requests (§6.1, §8.2, §8.3) ----------------------------------------------


class MediaObject(WireModel):
    data: Any = None
    format: str | None = None


class MediaContent(WireModel):
    """One part of a message (0.7.1+): ``{"type": "text"|"thinking"|"image"|…, "object"}``."""

    type: str
    object: MediaObject


class ModelMessage(_Request):
    role: Literal["system", "human", "ai", "view"]
    content: str | list[MediaContent] = ""
    round_index: int = 0

    @field_validator("content", mode="before")
    @classmethod
    def _one_part_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value


class PromptRequest(_Request):
    """Body of ``/api/worker/generate_stream`` and ``/generate``, as sent by DB-GPT 0.4–0.8
    (§6.1). Fields FastChat needs as ints are strict: a float or string there is refused here
    rather than crashing the worker (§1.2)."""

    model: str
    messages: list[ModelMessage] = Field(default_factory=list)
    prompt: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    max_new_tokens: StrictInt | None = Field(default=None, gt=0)
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] = Field(default_factory=list)
    context_len: int | None = None
    echo: StrictBool = True  # DB-GPT's default; every DB-GPT caller sends it explicitly
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    chat_model: bool = True
    span_id: str | None = None
    metrics: bool = False
    version: str = "v2"
    context: dict[str, Any] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        # "" matches at offset 0: the worker would stop before producing anything.
        if value == "" or (isinstance(value, list) and "" in value):
            raise InvalidRequest("stop strings must not be empty", field="stop")
        return value

    @model_validator(mode="after")
    def _has_something_to_say(self) -> PromptRequest:
        if not self.messages and self.prompt is None:
            raise InvalidRequest("neither messages nor prompt given", field="messages")
        return self

    @property
    def is_completion(self) -> bool:
        """The raw-completion path (§9.2 item 2): ``prompt`` is used verbatim."""
        return self.prompt is not None and (not self.messages or not self.chat_model)


class EmbeddingsRequest(_Request):
    """Body of ``/api/worker/embeddings``; ``query`` set means rerank (§6.1, §8.3)."""

    model: str
    input: list[str] = Field(min_length=1)
    worker_type: WorkerType = WorkerType.TEXT2VEC
    query: str | None = None
    span_id: str | None = None

    @property
    def is_rerank(self) -> bool:
        return self.query is not None or self.worker_type is WorkerType.RERANKER


class CountTokenRequest(_Request):
    """DB-GPT's own client sends no ``model`` (§6.3): resolve it to the default served model."""

    model: str | None = None
    prompt: str


class ModelMetadataRequest(_Request):
    model: str


class WorkerApplyRequest(_Request):
    model: str
    apply_type: str  # start | stop | restart | update_params
    worker_type: str = WorkerType.LLM.value
    params: dict[str, Any] = Field(default_factory=dict)
    apply_user: str | None = None


class WorkerStartupRequest(_Request):
    """Body of ``/api/worker/models/startup`` and ``models/shutdown`` (§8.8): what ``dbgpt model
    start`` and ``stop`` (and the web UI's stop) send to a ``WorkerManager@service`` entry."""

    model: str
    worker_type: str = WorkerType.LLM.value
    host: str | None = None
    port: int | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    delete_after: bool = False  # stop: remove from the registry instead of marking unhealthy


# --- worker API: replies (§6.2, §6.4, §7.3) -----------------------------------------------


class Usage(_Reply):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelOutput(_Reply):
    """One generation frame in the legacy ``text`` form (§7.3), readable by DB-GPT 0.4.2–0.8.2.

    No FastChat extras such as ``logprobs``. ``text`` is cumulative. ``incremental`` is left out
    on purpose: every version that knows the key defaults it to false, and 0.4.2–0.5.2 clients,
    which parse with ``ModelOutput(**data)``, raise on it (§7.2).

    With ``thinking`` set (the reasoning split, §7.4) the frame is sent in the 0.7.1+ form
    instead: ``content: [thinking part, text part]`` in place of ``text``, never both (0.7.0
    stores ``content`` raw; ≤ 0.6 crashes on it). ``thinking`` is never a wire key itself.
    """

    text: str
    error_code: int
    model_context: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage | None = None
    metrics: dict[str, Any] | None = None
    thinking: str | None = Field(default=None, exclude=True)

    def to_wire(self) -> dict[str, Any]:
        wire = super().to_wire()
        if self.thinking is None:
            return wire
        text = wire.pop("text")
        parts = [_media_part("thinking", self.thinking), _media_part("text", text)]
        return {"content": parts, **wire}

    def to_frame(
        self,
        escape_text: Callable[[str], str] = encode_basestring,
        escape_thinking: Callable[[str], str] = encode_basestring,
    ) -> bytes:
        """This output as one stream frame: exactly ``encode_frame(self.to_wire())``, in a
        fraction of its time (the relay sends one per upstream chunk, issue 14). The frames
        relayed by the thousand (text or content form, any finish reason, usage or not, no
        ``model_context`` or ``metrics``) are written from a fixed template, their strings
        escaped by the very function ``json`` escapes them with; anything else, and a text
        without a UTF-8 form (a lone surrogate: ``encode_frame`` falls back to ASCII escapes),
        takes the generic path. ``escape_*`` may be a stream's ``GrowingTextEscaper``s
        (``FrameEncoder``): the same strings, escaped in time proportional to what is new."""
        text, thinking, code, reason = self.text, self.thinking, self.error_code, self.finish_reason
        usage = self.usage
        finish = _FINISH_JSON.get(reason) if reason is None or type(reason) is str else None
        if (
            finish is None
            or type(text) is not str
            or type(code) is not int
            or self.model_context is not None
            or self.metrics is not None
        ):
            return encode_frame(self.to_wire())
        if thinking is None:
            start = '{"text":' + escape_text(text)
        elif type(thinking) is str:
            start = _CONTENT_START % (escape_thinking(thinking), escape_text(text))
        else:
            return encode_frame(self.to_wire())
        if usage is None:
            frame = _FRAME_WITHOUT_USAGE % (start, code, finish)
        else:
            prompt, completion, total = (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens,
            )
            if type(prompt) is not int or type(completion) is not int or type(total) is not int:
                return encode_frame(self.to_wire())
            frame = _FRAME_WITH_USAGE % (start, code, finish, prompt, completion, total)
        try:
            return frame.encode("utf-8")
        except UnicodeEncodeError:
            return encode_frame(self.to_wire())


class GrowingTextEscaper:
    """``json``'s string escaper for a text that grows from call to call (a stream's cumulative
    text): when the text extends the previous one, only the new part is escaped and appended to
    the previous result. JSON escapes each character on its own, so the result is exactly
    ``encode_basestring(text)``; any other text is escaped whole."""

    def __init__(self) -> None:
        self._raw = ""
        self._escaped = '""'

    def __call__(self, text: str) -> str:
        raw = self._raw
        if raw and len(text) >= len(raw) and text.startswith(raw):
            escaped = self._escaped[:-1] + encode_basestring(text[len(raw) :])[1:]
        else:
            escaped = encode_basestring(text)
        self._raw, self._escaped = text, escaped
        return escaped


class FrameEncoder:
    """The frames of one stream: ``encode(output)`` is ``output.to_frame()``, with the text and
    the thinking each escaped as a growing text (O(new text) per frame instead of O(text))."""

    def __init__(self) -> None:
        self._text = GrowingTextEscaper()
        self._thinking = GrowingTextEscaper()

    def encode(self, output: ModelOutput) -> bytes:
        return output.to_frame(self._text, self._thinking)

    def plain(self, text: str, thinking: str | None, usage: dict[str, Any] | None) -> bytes:
        """``encode`` of a frame that neither ends the stream nor fails: ``ModelOutput(text=text,
        error_code=0, thinking=thinking, usage=usage)`` with ``usage`` None or holding the three
        token counts as ints; the same bytes, without building the ``ModelOutput`` (the relay
        writes one per upstream chunk, issue 14)."""
        if thinking is None:
            start = '{"text":' + self._text(text)
        else:
            start = _CONTENT_START % (self._thinking(thinking), self._text(text))
        if usage is None:
            frame = _FRAME_WITHOUT_USAGE % (start, 0, "null")
        else:
            counts = usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]
            frame = _FRAME_WITH_USAGE % (start, 0, "null", *counts)
        try:
            return frame.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: encode_frame's ASCII escapes
            values = {"text": text, "error_code": 0, "usage": usage, "thinking": thinking}
            return encode_frame(ModelOutput.from_values(values).to_wire())


# ModelOutput.to_frame's templates: JSON as encode_frame writes it (compact, keys in to_wire's
# order), the text (or content) first, the NUL terminator included.
_FINISH_JSON: Final = {None: "null", "stop": '"stop"', "length": '"length"'}
_CONTENT_START: Final = (
    '{"content":[{"object":{"data":%s,"format":"text"},"type":"thinking"},'
    '{"object":{"data":%s,"format":"text"},"type":"text"}]'
)
_FRAME_WITHOUT_USAGE: Final = (
    '%s,"error_code":%d,"model_context":null,"finish_reason":%s,"usage":null,"metrics":null}\0'
)
_FRAME_WITH_USAGE: Final = (
    '%s,"error_code":%d,"model_context":null,"finish_reason":%s,"usage":{"prompt_tokens":%d,'
    '"completion_tokens":%d,"total_tokens":%d},"metrics":null}\0'
)


def _media_part(kind: str, data: str) -> dict[str, Any]:
    """A MediaContent as DB-GPT's own workers serialise it (``dataclasses.asdict`` order)."""
    return {"object": {"data": data, "format": "text"}, "type": kind}


class ExtMetadata(_Reply):
    prompt_roles: list[str] = Field(default_factory=lambda: ["system", "human", "ai"])
    prompt_sep: str = "\n"
    prompt_chat_template: str | None = None


class ModelMetadata(_Reply):
    """``/api/worker/model_metadata`` reply: the key set both 0.4–0.6 and 0.7+ accept (§6.4)."""

    model: str
    context_length: int
    chat_model: bool = True
    metadata: dict[str, Any] = Field(default_factory=dict)
    ext_metadata: ExtMetadata = Field(default_factory=ExtMetadata)


class ParameterDescription(_Reply):
    """One model parameter (``/api/worker/parameter/descriptions``, ``SupportedModel.params``):
    the keys every DB-GPT's ``ParameterDescription(**d)`` accepts (0.7 added ``is_array``,
    ``label``, ``nested_fields`` and ``param_order``, which older ones would refuse)."""

    param_class: str | None = None
    param_name: str
    param_type: str | None = None
    default_value: Any = None
    description: str | None = None
    required: bool = False
    valid_values: list[Any] | None = None
    ext_metadata: dict[str, Any] | None = None


class SupportedModel(_Reply):
    """One entry of ``/api/worker/models/supports``: the legacy key set (§6.4, §9.1)."""

    model: str
    path: str | None = None
    worker_type: str = WorkerType.LLM.value
    path_exist: bool = False
    proxy: bool = False
    enabled: bool = True
    # `dbgpt model start --help` builds its options from the first model with params, and
    # crashes (IndexError) when no model has any (§8.8).
    params: list[ParameterDescription] = Field(default_factory=list)


class WorkerSupportedModel(_Reply):
    host: str
    port: int
    models: list[SupportedModel]


class WorkerApplyOutput(_Reply):
    message: str
    success: bool
    timecost: float = 0
