"""HTTP calls the scenarios make: OpenAI-style chat/completions (FastChat's openai_api_server
and DB-GPT's apiserver), SSE reading, and DB-GPT controller listings. Every call has a timeout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

CALL_TIMEOUT = httpx.Timeout(60.0, connect=5.0)


@dataclass
class Answer:
    """One chat or completion answer, streamed or not, reduced to what the tests compare."""

    text: str  # message.content / text; for streams the concatenated deltas
    finish_reasons: list[str | None] = field(default_factory=list)
    errors: list[Any] = field(default_factory=list)  # error events / error bodies
    done: bool = False  # stream: `data: [DONE]` seen
    status: int = 0
    events: list[Any] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def finish_reason(self) -> str | None:
        reasons = [r for r in self.finish_reasons if r]
        return reasons[-1] if reasons else None


def chat_body(model: str, content: str, max_tokens: int, *, stream: bool) -> dict[str, Any]:
    """One greedy user turn for an OpenAI-style /chat/completions endpoint."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
    }


def sse_data(response: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of an SSE body, in order."""
    for line in response.iter_lines():
        if line.startswith("data:"):
            yield line[5:].strip()


def _piece(choice: dict[str, Any]) -> str | None:
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content")
    if "message" in choice:
        return (choice.get("message") or {}).get("content")
    return choice.get("text")


def post_openai(
    http: httpx.Client,
    url: str,
    body: dict[str, Any],
    *,
    on_event: Callable[[Any], None] | None = None,
    timeout: httpx.Timeout | float = CALL_TIMEOUT,
) -> Answer:
    """POST an OpenAI-style request; streams (body["stream"]) are read to their end.

    Error events (a JSON object with a non-zero `error_code`, as DB-GPT's apiserver relays a
    worker error, or an `object: "error"` body) go to `errors`, not into the text."""
    started = time.monotonic()
    if not body.get("stream"):
        reply = http.post(url, json=body, timeout=timeout)
        answer = Answer(text="", status=reply.status_code)
        data = reply.json()
        if reply.status_code != 200 or data.get("object") == "error":
            answer.errors.append(data)
        else:
            choice = data["choices"][0]
            answer.text = _piece(choice) or ""
            answer.finish_reasons.append(choice.get("finish_reason"))
        answer.events.append(data)
        answer.elapsed = time.monotonic() - started
        return answer
    pieces: list[str] = []
    with http.stream("POST", url, json=body, timeout=timeout) as reply:
        answer = Answer(text="", status=reply.status_code)
        if reply.status_code != 200:
            reply.read()
            answer.errors.append(reply.text)
            answer.elapsed = time.monotonic() - started
            return answer
        for data in sse_data(reply):
            if data == "[DONE]":
                answer.done = True
                answer.events.append(data)
                continue
            event = json.loads(data)
            answer.events.append(event)
            if on_event is not None:
                on_event(event)
            if event.get("error_code") or event.get("object") == "error":
                answer.errors.append(event)
                continue
            for choice in event.get("choices", []):
                piece = _piece(choice)
                if piece:
                    pieces.append(piece)
                answer.finish_reasons.append(choice.get("finish_reason"))
    answer.text = "".join(pieces)
    answer.elapsed = time.monotonic() - started
    return answer


def reasoning_of(answer: Answer) -> str:
    """The `reasoning_content` of an answer: a non-stream message's, or the stream's deltas
    concatenated (DB-GPT's apiserver puts a worker's thinking part there)."""
    pieces: list[str] = []
    for event in answer.events:
        if not isinstance(event, dict):
            continue
        for choice in event.get("choices", []):
            part = choice.get("delta") or choice.get("message") or {}
            pieces.append(part.get("reasoning_content") or "")
    return "".join(pieces)


# --- DB-GPT controller ------------------------------------------------------------------------


def controller_instances(
    http: httpx.Client, controller_url: str, *, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Every instance the DB-GPT controller lists (unhealthy ones included)."""
    reply = http.get(controller_url + "/api/controller/models", timeout=timeout)
    reply.raise_for_status()
    instances = reply.json()
    assert isinstance(instances, list), instances
    return instances


def instances_at(
    http: httpx.Client, controller_url: str, host: str, port: int
) -> dict[str, dict[str, Any]]:
    """Worker key -> instance, for the instances registered at host:port."""
    return {
        i["model_name"]: i
        for i in controller_instances(http, controller_url)
        if i["host"] == host and int(i["port"]) == port
    }


def wait_for(
    predicate: Callable[[], Any],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> tuple[Any, float]:
    """Poll until `predicate()` is truthy (exceptions count as false); (its value, seconds)."""
    started = time.monotonic()
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except (httpx.HTTPError, ValueError, KeyError, AssertionError) as exc:
            value, last_error = None, exc
        if value:
            return value, time.monotonic() - started
        if time.monotonic() - started > timeout:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"{what} not reached within {timeout:g} s{detail}")
        time.sleep(interval)


def metric_values(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of one metric in Prometheus text format: [(labels, value)]."""
    samples = []
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        labels: dict[str, str] = {}
        if "{" in head:
            metric, _, rest = head.partition("{")
            for pair in rest.rstrip("}").split(","):
                if pair:
                    key, _, raw = pair.partition("=")
                    labels[key] = raw.strip('"')
        else:
            metric = head
        if metric == name:
            samples.append((labels, float(value)))
    return samples
