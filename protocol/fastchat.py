"""FastChat wire messages: the model-worker API (docs/protocol.md §1) and the controller API (§2).

Requests we send serialise with ``to_wire()``, which **omits every null**: FastChat passes most
parameters through ``float()``/``int()``, and an explicit ``null`` there crashes the worker
mid-stream and can leak its concurrency slot for good (§1.2, "null rule"). Replies we read are
parsed tolerantly (``from_wire``): extra keys are ignored, because every worker type adds its
own (§1.11).
"""

from __future__ import annotations

from collections.abc import Mapping
from copy import deepcopy
from enum import IntEnum
from types import MappingProxyType
from typing import Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, model_validator
from pydantic import ModelWrapValidatorHandler as Handler

from protocol._wire import WireModel

__all__ = [
    "Chunk",
    "ChunkUsage",
    "ConvTemplate",
    "ConvTemplateReply",
    "CountTokenReply",
    "CountTokenRequest",
    "EmbeddingsRequest",
    "EmbeddingsResponse",
    "ErrorCode",
    "GenerationParams",
    "GetWorkerAddress",
    "ListModelsReply",
    "ModelDetailsReply",
    "WorkerAddressReply",
    "WorkerStatus",
]


class ErrorCode(IntEnum):
    """``fastchat/constants.py`` (identical copy in DB-GPT ``core/schema/api.py``), §1.5."""

    VALIDATION_TYPE_ERROR = 40001
    INVALID_AUTH_KEY = 40101
    INCORRECT_AUTH_KEY = 40102
    NO_PERMISSION = 40103
    INVALID_MODEL = 40301
    PARAM_OUT_OF_RANGE = 40302
    CONTEXT_OVERFLOW = 40303
    RATE_LIMIT = 42901
    QUOTA_EXCEEDED = 42902
    ENGINE_OVERLOADED = 42903
    INTERNAL_ERROR = 50001
    CUDA_OUT_OF_MEMORY = 50002
    GRADIO_REQUEST_ERROR = 50003
    GRADIO_STREAM_UNKNOWN_ERROR = 50004
    CONTROLLER_NO_WORKER = 50005
    CONTROLLER_WORKER_TIMEOUT = 50006


class _Request(WireModel):
    """A body we send to FastChat: strictly typed (a float where FastChat calls ``int()`` is a
    bug on our side), nulls omitted on the wire."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


# --- worker API ---------------------------------------------------------------------------


class GenerationParams(_Request):
    """Body of ``/worker_generate_stream`` and ``/worker_generate`` (§1.2, §3.3)."""

    model: str  # ignored by model_worker, required by multi-model workers: always sent
    prompt: str  # the rendered prompt; a missing one crashes the worker
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_new_tokens: StrictInt = Field(gt=0)  # 0 crashes the HF generator; absent means 256
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    echo: StrictBool = False  # the worker defaults to true: always sent explicitly
    logprobs: StrictInt | None = None  # any non-null value, 0 included, turns logprobs on
    images: list[str] | None = None  # multimodal workers: image URLs, as openai_api_server sends


class ChunkUsage(WireModel):
    """``usage`` as workers send it: model_worker and vLLM send all three keys, MLX ends with
    ``{}``; extra keys are dropped."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class Chunk(WireModel):
    """One frame of ``/worker_generate_stream``, or the body of ``/worker_generate`` (§1.3).

    ``text`` is cumulative. Error frames carry only ``text`` and ``error_code`` (§1.5).
    ``finish_reason`` is kept raw: vLLM sends ``"abort"`` and, for n > 1, a list.
    """

    text: str
    error_code: int = 0
    usage: ChunkUsage | None = None
    finish_reason: str | list[str | None] | None = None


class WorkerStatus(WireModel):
    """``/worker_get_status`` reply, also the ``worker_status`` of a registration (§1.1)."""

    model_names: list[str]
    speed: int | float = 1  # FastChat sends an int; kept as sent
    queue_length: int = 0


class ConvTemplate(WireModel):
    """The ``conv`` object of ``/worker_get_conv_template`` (§1.9).

    Accepts fschat 0.2.36's fields and FastChat main's (``system_message_vision``,
    ``max_image_size_mb``); unknown keys are tolerated. ``raw()`` gives back the dict exactly
    as received, for ``render_prompt``.
    """

    name: str
    system_template: str
    system_message: str
    system_message_vision: str | None = None  # main only
    roles: list[str] = Field(min_length=2)
    messages: list[list[Any]]
    offset: int
    sep_style: int | None  # None crashes the worker at start-up; kept to report it
    sep: str | None  # null in some API-only templates of main
    sep2: str | None = None
    stop_str: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_image_size_mb: float | None = None  # main only; some templates give a float

    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw(cls, data: Any, handler: Handler[ConvTemplate]) -> ConvTemplate:
        template = handler(data)
        if isinstance(data, dict):
            template._raw = deepcopy(data)
        return template

    def raw(self) -> dict[str, Any]:
        """A copy of the JSON object this template was parsed from."""
        return deepcopy(self._raw) if self._raw else self.model_dump(mode="json")

    def raw_view(self) -> Mapping[str, Any]:
        """That object itself, read-only at the top level and not to be changed below it:
        for readers such as ``render_prompt``, once per request, without ``raw``'s copy."""
        return MappingProxyType(self._raw) if self._raw else self.model_dump(mode="json")

    @property
    def has_main_fields(self) -> bool:
        """Whether the worker runs post-2024-06 FastChat main (its sep_style numbering, §4.1)."""
        return {"system_message_vision", "max_image_size_mb"} & self.model_fields_set != set()

    @property
    def stop_strings(self) -> list[str]:
        """``stop_str`` as a list (a single string, a list, or nothing)."""
        if self.stop_str is None:
            return []
        return [self.stop_str] if isinstance(self.stop_str, str) else list(self.stop_str)


class ConvTemplateReply(WireModel):
    conv: ConvTemplate


class EmbeddingsRequest(_Request):
    """Body of ``/worker_get_embeddings``: ``input`` must be a non-empty list (§1.7), else the
    worker answers 500 and leaks a slot."""

    model: str
    input: list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] | None = None


class EmbeddingsResponse(WireModel):
    """``/worker_get_embeddings`` reply: ``{"embedding", "token_num"}``, or the worker's error
    object ``{"text", "error_code"}``. With ``encoding_format: "base64"`` each vector is a
    base64 string of little-endian float32."""

    embedding: list[list[float] | str] | None = None
    token_num: int | None = None
    text: str | None = None
    error_code: int = 0


class CountTokenRequest(_Request):
    model: str
    prompt: str


class CountTokenReply(WireModel):
    count: int
    error_code: int = 0


class ModelDetailsReply(WireModel):
    context_length: int = Field(gt=0)


# --- controller API (§2, §1.10) -----------------------------------------------------------


class ListModelsReply(WireModel):
    models: list[str]


class GetWorkerAddress(_Request):
    model: str


class WorkerAddressReply(WireModel):
    address: str  # "" when no worker serves the model
