"""``check --kind fastchat``: a FastChat worker, checked the way the adapter uses it.

Status, conversation template (and that it renders), model details, count_token, a short greedy
stream and a non-stream generate, and embeddings when asked (docs/protocol.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapter.tools.check_common import (
    MAX_NEW_TOKENS,
    PROMPT,
    CheckFailed,
    Endpoint,
    Run,
    validate_stream,
)
from protocol import fastchat
from protocol.conversation import render_prompt


@dataclass
class FastChatChecks:
    endpoint: Endpoint
    model: str | None
    embedding_model: str | None = None  # default: the checked model
    prompt: str = PROMPT

    def status(self) -> str:
        status = fastchat.WorkerStatus.from_wire(self.endpoint.post("/worker_get_status", {}))
        if not status.model_names:
            raise CheckFailed("the worker reports no model_names")
        if self.model is None:
            self.model = status.model_names[0]
        elif self.model not in status.model_names:
            raise CheckFailed(f"{self.model!r} not among {status.model_names}")
        return (
            f"models {', '.join(status.model_names)}; queue_length {status.queue_length}, "
            f"speed {status.speed:g}"
        )

    def template(self) -> str:
        reply = self.endpoint.post("/worker_get_conv_template", {"model": self.model})
        conv = fastchat.ConvTemplateReply.from_wire(reply).conv
        try:
            self.prompt = render_prompt(conv.raw(), [(0, PROMPT), (1, None)])
        except ValueError as exc:
            raise CheckFailed(f"template {conv.name!r} does not render: {exc}") from None
        return f"{conv.name}, sep_style {conv.sep_style}, prompt of {len(self.prompt)} chars"

    def details(self) -> str:
        reply = self.endpoint.post("/model_details", {"model": self.model})
        return f"context_length {fastchat.ModelDetailsReply.from_wire(reply).context_length}"

    def count_token(self) -> str:
        body = {"model": self.model, "prompt": self.prompt}
        reply = fastchat.CountTokenReply.from_wire(self.endpoint.post("/count_token", body))
        if reply.error_code != 0 or reply.count < 0:
            raise CheckFailed(f"count_token reply {reply.model_dump()}")
        return f"{reply.count} tokens"

    def _params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": self.prompt,
            "temperature": 0.0,  # greedy: below FastChat's 1e-5 threshold
            "max_new_tokens": MAX_NEW_TOKENS,
            "echo": False,
        }

    def stream(self) -> str:
        return validate_stream(self.endpoint.stream("/worker_generate_stream", self._params()))

    def generate(self) -> str:
        reply = self.endpoint.post("/worker_generate", self._params())
        chunk = fastchat.Chunk.from_wire(reply)
        if "error_code" not in reply or chunk.error_code != 0:
            raise CheckFailed(f"reply {reply!r:.200}")
        return f"finish_reason {chunk.finish_reason}, text {chunk.text[:40]!r}"

    def embeddings(self) -> str:
        body = {"model": self.embedding_model or self.model, "input": [PROMPT]}
        reply = fastchat.EmbeddingsResponse.from_wire(
            self.endpoint.post("/worker_get_embeddings", body)
        )
        if reply.error_code != 0 or not reply.embedding:
            raise CheckFailed(f"error {reply.error_code}: {reply.text}")
        vector = reply.embedding[0]
        if len(reply.embedding) != 1 or not isinstance(vector, list) or not vector:
            raise CheckFailed(f"expected one float vector, got {len(reply.embedding)} items")
        return f"1 vector of {len(vector)} dimensions, token_num {reply.token_num}"


def check_fastchat(
    endpoint: Endpoint, model: str | None, embeddings: str | None, *, embeddings_only: bool = False
) -> Run:
    checks, run = FastChatChecks(endpoint, model, embeddings or None), Run()
    run.step("status", checks.status)
    run.step("conv template", checks.template)
    run.step("model details", checks.details)
    run.step("count_token", checks.count_token)
    if not embeddings_only:  # generating on an embedding worker leaks a slot (docs/peers.md §3.7)
        run.step("generate_stream", checks.stream)
        run.step("generate", checks.generate)
    if embeddings is not None:
        run.step("embeddings", checks.embeddings)
    return run
