"""``fastchat-adapter check URL``: a conformance check of one worker endpoint.

``--kind fastchat`` (default) checks a FastChat worker the way the adapter uses it (PROTOCOLS.md
§1): status, conversation template (and that it renders), model details, count_token, a short
greedy stream and a non-stream generate, and embeddings when asked. ``--kind dbgpt`` checks a
DB-GPT worker API endpoint (§6, §7) such as the adapter itself: model_metadata (exact key set),
count_token (bare int), generate_stream frames in the legacy ``text`` form, generate, and
embeddings when asked.

Stream frames are validated as a reader needs them: NUL framing (the body ends on a NUL), every
frame a JSON object with ``error_code`` 0, cumulative text never shrinking, and a final frame
with a ``finish_reason``. Prints a PASS/FAIL table; exits 0 if all passed, 1 on any failure, 2
on a usage error (bad URL, no model to check).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import httpx

from protocol import dbgpt, fastchat
from protocol.conversation import render_prompt
from protocol.errors import ProtocolError
from protocol.framing import FrameDecoder

PROMPT: Final = "Hello! Who are you?"
MAX_NEW_TOKENS: Final = 8
# DB-GPT clients rebuild these with cls(**data): the key sets both 0.4-0.6 and 0.7+ accept.
_METADATA_KEYS: Final = frozenset(dbgpt.ModelMetadata.model_fields)
_EXT_METADATA_KEYS: Final = frozenset(dbgpt.ExtMetadata.model_fields)
_MODEL_OUTPUT_KEYS: Final = frozenset(dbgpt.ModelOutput.model_fields)


class CheckFailed(Exception):
    """One check failed; the message says why in one line."""


class Unreachable(CheckFailed):
    """The endpoint does not answer at all: later checks are skipped."""


class UsageError(Exception):
    """Nothing can be checked as asked (exit status 2)."""


@dataclass
class Outcome:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str


@dataclass
class Endpoint:
    """HTTP to the endpoint under test; every failure becomes a ``CheckFailed``."""

    url: str
    client: httpx.Client
    max_frame_bytes: int = 1 << 20

    def post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            response = self.client.post(self.url + path, json=body)
        except httpx.TransportError as exc:
            raise Unreachable(f"POST {path}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise CheckFailed(f"POST {path}: HTTP {response.status_code}: {response.text[:200]}")
        try:
            return response.json()
        except ValueError:
            raise CheckFailed(f"POST {path}: not JSON: {response.text[:200]!r}") from None

    def get(self, path: str) -> Any:
        try:
            response = self.client.get(self.url + path)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise CheckFailed(f"GET {path}: {exc}") from None

    def stream(self, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        decoder = FrameDecoder(max_frame_bytes=self.max_frame_bytes)
        frames: list[dict[str, Any]] = []
        try:
            with self.client.stream("POST", self.url + path, json=body) as response:
                if response.status_code != 200:
                    raise CheckFailed(f"POST {path}: HTTP {response.status_code}")
                for data in response.iter_raw():
                    frames += decoder.feed(data)
            decoder.close()
        except httpx.TransportError as exc:
            raise CheckFailed(f"stream broke after {len(frames)} frames: {exc}") from None
        except ProtocolError as exc:
            raise CheckFailed(f"framing: {exc}") from None
        if not frames:
            raise CheckFailed("the stream held no frame")
        return frames


def validate_stream(frames: list[dict[str, Any]]) -> str:
    """Error codes, cumulative text, final finish_reason; returns a one-line summary."""
    previous = ""
    for index, frame in enumerate(frames, 1):
        if not isinstance(frame.get("error_code"), int):
            raise CheckFailed(f"frame {index} has no integer error_code: {frame!r:.200}")
        if frame["error_code"] != 0:
            raise CheckFailed(f"frame {index}: error {frame['error_code']}: {frame.get('text')}")
        text = frame.get("text")
        if not isinstance(text, str):
            raise CheckFailed(f"frame {index} has no string 'text': {frame!r:.200}")
        # A trailing U+FFFD may become a real character once its remaining bytes arrive.
        if len(text) < len(previous) or not text.startswith(previous.rstrip("\ufffd")):
            raise CheckFailed(f"frame {index}: cumulative text shrank or changed: {text!r:.80}")
        previous = text
    final = frames[-1].get("finish_reason")
    if not final:
        raise CheckFailed(f"the last of {len(frames)} frames has no finish_reason")
    return f"{len(frames)} frames, finish_reason {final}, text {previous[:40]!r}"


@dataclass
class Run:
    """Steps run in order; after an Unreachable the rest are skipped."""

    outcomes: list[Outcome] = field(default_factory=list)
    _gone: bool = False

    def step(self, name: str, check: Callable[[], str]) -> None:
        if self._gone:
            self.outcomes.append(Outcome(name, "SKIP", "endpoint unreachable"))
            return
        try:
            self.outcomes.append(Outcome(name, "PASS", check()))
        except Unreachable as exc:
            self._gone = True
            self.outcomes.append(Outcome(name, "FAIL", str(exc)))
        except (CheckFailed, ProtocolError) as exc:
            self.outcomes.append(Outcome(name, "FAIL", str(exc)))

    @property
    def ok(self) -> bool:
        return all(o.status == "PASS" for o in self.outcomes)


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


def check_fastchat(
    endpoint: Endpoint, model: str | None, embeddings: str | None, *, embeddings_only: bool = False
) -> Run:
    checks, run = FastChatChecks(endpoint, model, embeddings or None), Run()
    run.step("status", checks.status)
    run.step("conv template", checks.template)
    run.step("model details", checks.details)
    run.step("count_token", checks.count_token)
    if not embeddings_only:  # generating on an embedding worker leaks a slot (PEERS §3.7)
        run.step("generate_stream", checks.stream)
        run.step("generate", checks.generate)
    if embeddings is not None:
        run.step("embeddings", checks.embeddings)
    return run


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
    """Fill in missing names from the endpoint's controller listing, if it has one (the
    adapter in standalone mode does); ``embeddings == ""`` means "asked, name unknown"."""
    if (model is not None or not need_llm) and embeddings != "":
        return model, embeddings
    try:
        listing = endpoint.get("/api/controller/models?healthy_only=true")
    except CheckFailed:
        listing = []
    items = listing if isinstance(listing, list) else []
    keys = [str(item.get("model_name", "")) for item in items if isinstance(item, dict)]
    if model is None:
        model = next((k.split("@")[0] for k in keys if k.endswith("@llm")), None)
    if embeddings == "":
        found = next((k.split("@")[0] for k in keys if k.endswith("@text2vec")), None)
        embeddings = found or model
    if (need_llm and model is None) or embeddings == "" or (embeddings is None and not need_llm):
        raise UsageError("no model to check: give --model NAME (or --embeddings NAME)")
    return model, embeddings


def render_table(url: str, kind: str, run: Run, out: TextIO) -> None:
    width = max(len(o.name) for o in run.outcomes)
    print(f"fastchat-adapter check {url} ({kind})", file=out)
    for outcome in run.outcomes:
        print(f"  {outcome.status:4}  {outcome.name:{width}}  {outcome.detail}", file=out)
    counts = {s: sum(o.status == s for o in run.outcomes) for s in ("PASS", "FAIL", "SKIP")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped", file=out)


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="Worker base URL, e.g. http://127.0.0.1:21002")
    parser.add_argument(
        "--kind",
        choices=["fastchat", "dbgpt"],
        default="fastchat",
        help="fastchat: a FastChat worker; dbgpt: a DB-GPT worker API endpoint.",
    )
    parser.add_argument("--model", help="Model to check (default: the first one served).")
    parser.add_argument(
        "--embeddings",
        nargs="?",
        const="",
        default=None,
        metavar="MODEL",
        help="Also check embeddings (optionally of another model).",
    )
    parser.add_argument(
        "--embeddings-only",
        action="store_true",
        help="Check an embedding worker: no generation requests.",
    )
    parser.add_argument("--api-key", help="Bearer token for a DB-GPT endpoint that needs one.")
    parser.add_argument("--timeout", type=float, default=60.0, help="Seconds per request.")


def run_check(ns: argparse.Namespace, out: TextIO | None = None) -> int:
    url = str(ns.url).rstrip("/")
    if not url.startswith(("http://", "https://")):
        print(f"fastchat-adapter check: not an http(s) URL: {ns.url}", file=sys.stderr)
        return 2
    only: bool = ns.embeddings_only
    embeddings = "" if only and ns.embeddings is None else ns.embeddings
    headers = {"authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    with httpx.Client(timeout=ns.timeout, headers=headers, trust_env=False) as client:
        checks = check_fastchat if ns.kind == "fastchat" else check_dbgpt
        try:
            run = checks(Endpoint(url, client), ns.model, embeddings, embeddings_only=only)
        except UsageError as exc:
            print(f"fastchat-adapter check: {exc}", file=sys.stderr)
            return 2
    render_table(url, ns.kind, run, out or sys.stdout)
    return 0 if run.ok else 1
