"""Both wire protocols as pure code: FastChat workers and the DB-GPT model cluster.

No I/O happens here (no httpx, fastapi, uvicorn or asyncio): every function takes values and
returns values, in the spirit of h11. Where a request enters and leaves:

- ``framing``: NUL-delimited JSON in both directions (``FrameDecoder``, ``encode_frame``).
- ``dbgpt``: what DB-GPT sends us (``PromptRequest``…) and what we answer (``ModelOutput``…).
- ``fastchat``: what we send FastChat workers (``GenerationParams``…) and what they answer.
- ``conversation``: FastChat's prompt rendering (``render_prompt``).
- ``translate``: DB-GPT request → FastChat request, FastChat reply → DB-GPT reply.
- ``errors``: the one exception hierarchy.

Both sides have an ``EmbeddingsRequest`` and a ``CountTokenRequest``; use them through their
modules (``dbgpt.EmbeddingsRequest``, ``fastchat.EmbeddingsRequest``).
"""

from protocol import dbgpt, fastchat
from protocol.conversation import render_prompt
from protocol.dbgpt import (
    ModelInstance,
    ModelMessage,
    ModelMetadata,
    ModelOutput,
    PromptRequest,
    SupportedModel,
    WorkerApplyOutput,
    WorkerSupportedModel,
    WorkerType,
    parse_worker_key,
    worker_key,
)
from protocol.errors import (
    ContextOverflow,
    FramingError,
    InvalidMessage,
    InvalidReply,
    InvalidRequest,
    ProtocolError,
    UnknownSeparatorStyle,
    WorkerError,
)
from protocol.fastchat import Chunk, ConvTemplate, ErrorCode, GenerationParams, WorkerStatus
from protocol.framing import KEEPALIVE, FrameDecoder, encode_frame
from protocol.translate import (
    GenerationPlan,
    StreamTranslator,
    build_prompt,
    count_from_reply,
    embeddings_from_reply,
    embeddings_request,
    error_output,
    model_metadata,
    plan_generation,
    translate_reply,
)

__all__ = [
    "KEEPALIVE",
    "Chunk",
    "ContextOverflow",
    "ConvTemplate",
    "ErrorCode",
    "FrameDecoder",
    "FramingError",
    "GenerationParams",
    "GenerationPlan",
    "InvalidMessage",
    "InvalidReply",
    "InvalidRequest",
    "ModelInstance",
    "ModelMessage",
    "ModelMetadata",
    "ModelOutput",
    "PromptRequest",
    "ProtocolError",
    "StreamTranslator",
    "SupportedModel",
    "UnknownSeparatorStyle",
    "WorkerApplyOutput",
    "WorkerError",
    "WorkerStatus",
    "WorkerSupportedModel",
    "WorkerType",
    "build_prompt",
    "count_from_reply",
    "dbgpt",
    "embeddings_from_reply",
    "embeddings_request",
    "encode_frame",
    "error_output",
    "fastchat",
    "model_metadata",
    "parse_worker_key",
    "plan_generation",
    "render_prompt",
    "translate_reply",
    "worker_key",
]
