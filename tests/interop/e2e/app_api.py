"""DB-GPT app's HTTP API as its web UI calls it (0.8.2), and what the workers were sent.

`chat` posts `/api/v1/chat/completions` and reads the server-sent events the UI reads: each
`data:` line carries the whole message so far (`content`, and `reasoning_content` once the
thinking is split off).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from tests.interop.recording_proxy import Recorded, RecordingProxy

GENERATE_PATHS = ("/worker_generate_stream", "/worker_generate")
CHAT_TIMEOUT_S = 300.0  # a hang guard: tiny-vicuna on 2 busy cores
T = TypeVar("T")


@dataclass(frozen=True)
class ChatReply:
    content: str
    reasoning: str | None
    events: int  # how many data events carried the message (a stream has several)


def ok(reply: httpx.Response) -> Any:
    """The `data` of the app's `Result` envelope, after checking it says success."""
    reply.raise_for_status()
    body = reply.json()
    assert body.get("success"), body
    return body["data"]


def chat(
    http: httpx.Client,
    base: str,
    *,
    mode: str,
    model: str,
    user_input: str,
    select_param: str = "",
) -> ChatReply:
    body = {
        "conv_uid": "",
        "chat_mode": mode,
        "model_name": model,
        "user_input": user_input,
        "select_param": select_param,
    }
    with http.stream(
        "POST", base + "/api/v1/chat/completions", json=body, timeout=CHAT_TIMEOUT_S
    ) as reply:
        reply.raise_for_status()
        return last_message(reply.iter_lines())


def last_message(lines: Iterable[str]) -> ChatReply:
    """The message of the last `data:` event of the app's chat stream."""
    message: dict[str, Any] = {}
    events = 0
    for line in lines:
        if not line.startswith("data:") or line.strip() == "data: [DONE]":
            continue
        message = json.loads(line[len("data:") :])["choices"][0]["message"]
        events += 1
    assert message, "the app streamed no message"
    return ChatReply(message.get("content") or "", message.get("reasoning_content"), events)


def generations(proxy: RecordingProxy, mark: int) -> list[Recorded]:
    return [r for r in proxy.since(mark) if r.path in GENERATE_PATHS]


def worker_text(proxy: RecordingProxy, record: Recorded) -> str | None:
    """The text a FastChat worker produced for `record` (its last frame's cumulative text), or
    None while the answer is still streaming."""
    raw = proxy.response_body(record)
    if raw is None:
        return None
    if record.path == "/worker_generate":
        return str(json.loads(raw)["text"])
    frames = [json.loads(piece) for piece in raw.split(b"\0") if piece.strip()]
    assert frames and all(f["error_code"] == 0 for f in frames), frames[-1:]
    return str(frames[-1]["text"])


def poll(check: Callable[[], T | None], what: str, timeout: float = 300.0) -> T:
    """`check`'s first value that is not None; AssertionError naming `what` after `timeout`
    (a hang guard on a busy machine, not a speed expectation)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(0.5)
