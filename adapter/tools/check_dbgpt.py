"""``check --kind dbgpt``: a DB-GPT worker API endpoint, such as the adapter itself.

model_metadata (exact key set), count_token (bare int), generate_stream frames in the legacy
``text`` form, generate, and embeddings when asked (docs/protocol.md §6, §7). Missing model
names are looked up in the endpoint's controller listing when it has one (the adapter in
standalone mode does), else in its worker-manager listing ``/api/worker/models/supports`` (the
adapter always has one, registered with a DB-GPT controller or not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from adapter.tools.check_common import (
    MAX_NEW_TOKENS,
    PROMPT,
    CheckFailed,
    Endpoint,
    Run,
    UsageError,
    validate_stream,
)
from protocol import dbgpt

# DB-GPT clients rebuild these with cls(**data): the key sets both 0.4-0.6 and 0.7+ accept.
_METADATA_KEYS: Final = frozenset(dbgpt.ModelMetadata.model_fields)
_EXT_METADATA_KEYS: Final = frozenset(dbgpt.ExtMetadata.model_fields)
_MODEL_OUTPUT_KEYS: Final = frozenset(dbgpt.ModelOutput.model_fields)


@dataclass
class DbgptChecks:
    endpoint: Endpoint
    model: str
    embedding_model: str | None

    def model_metadata(self) -> str:
        reply = self.endpoint.post("/api/worker/model_metadata", {"model": self.model})
        if not isinstance(reply, dict):
            raise CheckFailed(f"not an object: {reply!r:.200}")
        unknown = set(reply) - _METADATA_KEYS
        if unknown:
            raise CheckFailed(f"keys 0.4-0.6 or 0.7+ clients reject: {sorted(unknown)}")
        ext = reply.get("ext_metadata", {})
        if not isinstance(ext, dict) or set(ext) - _EXT_METADATA_KEYS:
            raise CheckFailed(f"ext_metadata DB-GPT clients reject: {ext!r:.200}")
        length = reply.get("context_length")
        if not isinstance(length, int) or length <= 0:
            raise CheckFailed(f"context_length {length!r}")
        return f"context_length {length}, keys {', '.join(sorted(reply))}"

    def count_token(self) -> str:
        body = {"model": self.model, "prompt": PROMPT}
        reply = self.endpoint.post("/api/worker/count_token", body)
        if not isinstance(reply, int) or isinstance(reply, bool):
            raise CheckFailed(f"expected a bare integer, got {reply!r:.100}")
        return f"{reply} tokens"

    def _request(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": "human", "content": PROMPT, "round_index": 0}],
            "echo": False,
            "max_new_tokens": MAX_NEW_TOKENS,
        }

    def generate_stream(self) -> str:
        frames = self.endpoint.stream("/api/worker/generate_stream", self._request())
        for index, frame in enumerate(frames, 1):
            _check_model_output(frame, f"frame {index}")
        return validate_stream(frames)

    def generate(self) -> str:
        reply = self.endpoint.post("/api/worker/generate", self._request())
        if not isinstance(reply, dict):
            raise CheckFailed(f"not an object: {reply!r:.200}")
        _check_model_output(reply, "reply")
        return validate_stream([reply])

    def embeddings(self) -> str:
        inputs = [PROMPT, "second input"]
        body = {"model": self.embedding_model, "input": inputs}
        reply = self.endpoint.post("/api/worker/embeddings", body)
        vectors_ok = isinstance(reply, list) and len(reply) == len(inputs)
        if not vectors_ok or not all(isinstance(v, list) and v for v in reply):
            raise CheckFailed(f"expected {len(inputs)} bare vectors, got {reply!r:.100}")
        return f"{len(reply)} vectors of {len(reply[0])} dimensions"


def _check_model_output(obj: dict[str, Any], where: str) -> None:
    """The legacy ``text`` form every DB-GPT 0.5.3-0.8.2 client reads (§7.2, §7.3)."""
    if "content" in obj:
        raise CheckFailed(f"{where} carries 'content' (0.7.0 and <= 0.6 clients cannot read it)")
    unknown = set(obj) - _MODEL_OUTPUT_KEYS
    if unknown:
        raise CheckFailed(f"{where}: keys <= 0.6 clients reject: {sorted(unknown)}")
    if obj.get("incremental"):
        raise CheckFailed(f"{where}: incremental must be false (text is cumulative)")
    if obj.get("finish_reason") not in (None, "stop", "length"):
        raise CheckFailed(f"{where}: finish_reason {obj['finish_reason']!r} cuts DB-GPT streams")


def check_dbgpt(
    endpoint: Endpoint, model: str | None, embeddings: str | None, *, embeddings_only: bool = False
) -> Run:
    model, embeddings = _discover(endpoint, model, embeddings, need_llm=not embeddings_only)
    checks, run = DbgptChecks(endpoint, model or "", embeddings), Run()
    if not embeddings_only:
        run.step("model_metadata", checks.model_metadata)
        run.step("count_token", checks.count_token)
        run.step("generate_stream", checks.generate_stream)
        run.step("generate", checks.generate)
    if embeddings is not None:
        run.step("embeddings", checks.embeddings)
    return run


def _discover(
    endpoint: Endpoint, model: str | None, embeddings: str | None, *, need_llm: bool
) -> tuple[str | None, str | None]:
    """Fill in missing names from the endpoint's listings (see the module docstring);
    ``embeddings == ""`` means "asked, name unknown"."""
    if (model is not None or not need_llm) and embeddings != "":
        return model, embeddings
    keys = _listed_keys(endpoint)
    if model is None:
        model = next((k.split("@")[0] for k in keys if k.endswith("@llm")), None)
    if embeddings == "":
        found = next((k.split("@")[0] for k in keys if k.endswith("@text2vec")), None)
        embeddings = found or model
    if (need_llm and model is None) or embeddings == "" or (embeddings is None and not need_llm):
        raise UsageError("no model to check: give --model NAME (or --embeddings NAME)")
    return model, embeddings


def _listed_keys(endpoint: Endpoint) -> list[str]:
    """``name@type`` of every model the endpoint lists, from the first listing it has."""
    try:
        listing = endpoint.get("/api/controller/models?healthy_only=true")
    except CheckFailed:
        listing = []
    items = listing if isinstance(listing, list) else []
    keys = [str(item.get("model_name", "")) for item in items if isinstance(item, dict)]
    if keys:
        return keys
    try:
        supports = endpoint.get("/api/worker/models/supports")
    except CheckFailed:
        return []
    entries = supports if isinstance(supports, list) else []
    return [
        f"{model.get('model')}@{model.get('worker_type')}"
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get("models"), list)
        for model in entry["models"]
        if isinstance(model, dict)
    ]
