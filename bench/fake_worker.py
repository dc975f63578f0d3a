"""A fast fake model worker for bench/relay.py: FastChat's worker API or DB-GPT's, no model.

``/worker_generate_stream`` (FastChat) or ``/api/worker/generate_stream`` (DB-GPT) sends N
NUL-terminated JSON frames of cumulative text (one 3-character token per frame), then the text
again with ``finish_reason`` "length". Frames are encoded once per (N, prompt tokens) and cached,
so the worker's own cost per frame is a socket write; it yields to the event loop after every
frame, as a real worker does between tokens.

N and the pause between frames come from a directive anywhere in the raw body, so they survive
any relay that forwards the prompt or the messages: ``[[fake:frames=200,delay=0.02]]``; without
one, N is ``max_new_tokens`` (or ``max_tokens``) and there is no pause.

With ``--controller-address`` it registers with a FastChat controller (``--api fastchat``) or a
DB-GPT controller (``--api dbgpt``) and heartbeats. ``GET /__stats`` says how many streams are in
flight. Runs in any venv with fastapi, uvicorn and httpx (e.g. the FastChat peer venv).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

TOKENS = (" lo", " re", " mi", " fa", " so", " la", " ti", " do")
DIRECTIVE = re.compile(rb"\[\[fake:([^\]]*)\]\]")
VICUNA_V11 = {
    "name": "vicuna_v1.1",
    "system_template": "{system_message}",
    "system_message": "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "roles": ["USER", "ASSISTANT"],
    "messages": [],
    "offset": 0,
    "sep_style": 2,
    "sep": " ",
    "sep2": "</s>",
    "stop_str": None,
    "stop_token_ids": None,
}


class Config:
    api = "fastchat"
    model = "fake"
    host = "127.0.0.1"
    port = 0
    context_length = 4096
    controller: str | None = None


C = Config()
STATS = {"in_flight": 0, "streams": 0}


def plan(raw: bytes, body: dict[str, Any]) -> tuple[int, float]:
    """(frames, seconds between frames) for one request."""
    found: dict[str, float] = {}
    match = DIRECTIVE.search(raw)
    if match:
        for part in match.group(1).decode("ascii", "replace").split(","):
            key, _, value = part.partition("=")
            with contextlib.suppress(ValueError):
                found[key.strip()] = float(value)
    n = found.get("frames") or body.get("max_new_tokens") or body.get("max_tokens") or 1000
    return max(1, int(n)), max(0.0, found.get("delay", 0.0))


@lru_cache(maxsize=16)
def frames_for(api: str, n: int, prompt_tokens: int) -> tuple[bytes, ...]:
    objects: list[dict[str, Any]] = []
    text = ""
    for i in range(n):
        text += TOKENS[i % len(TOKENS)]
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": i,
            "total_tokens": prompt_tokens + i,
        }
        if api == "fastchat":
            objects.append({"text": text, "error_code": 0, "usage": usage, "finish_reason": None})
        else:
            objects.append(
                {
                    "text": text,
                    "error_code": 0,
                    "incremental": False,
                    "model_context": None,
                    "finish_reason": None,
                    "usage": usage,
                    "metrics": None,
                }
            )
    objects.append(dict(objects[-1], finish_reason="length"))
    return tuple(json.dumps(o).encode() + b"\0" for o in objects)


async def paced(frames: tuple[bytes, ...], delay: float) -> AsyncIterator[bytes]:
    STATS["in_flight"] += 1
    STATS["streams"] += 1
    try:
        for i, frame in enumerate(frames):
            if delay and i:
                await asyncio.sleep(delay)
            yield frame
            if not delay:
                await asyncio.sleep(0)  # let other streams and new requests in
    finally:
        STATS["in_flight"] -= 1


async def read(request: Request) -> tuple[bytes, dict[str, Any]]:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {}
    return raw, body if isinstance(body, dict) else {}


def prompt_tokens(body: dict[str, Any]) -> int:
    prompt = body.get("prompt")
    return max(1, len(prompt if isinstance(prompt, str) else json.dumps(body)) // 4)


async def stream(request: Request) -> StreamingResponse:
    raw, body = await read(request)
    n, delay = plan(raw, body)
    return StreamingResponse(paced(frames_for(C.api, n, prompt_tokens(body)), delay))


def status() -> dict[str, Any]:
    return {"model_names": [C.model], "speed": 1, "queue_length": STATS["in_flight"]}


async def heartbeat() -> None:
    me = f"http://{C.host}:{C.port}"
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if C.api == "fastchat":
                    await client.post(
                        f"{C.controller}/register_worker",
                        json={
                            "worker_name": me,
                            "check_heart_beat": True,
                            "worker_status": status(),
                            "multimodal": False,
                        },
                    )
                else:
                    instance = {
                        "model_name": f"{C.model}@llm",
                        "host": C.host,
                        "port": C.port,
                        "weight": 1.0,
                        "check_healthy": True,
                        "healthy": False,
                        "enabled": True,
                        "prompt_template": None,
                        "last_heartbeat": None,
                        "remove_from_registry": False,
                    }
                    await client.post(f"{C.controller}/api/controller/models", json=instance)
            await asyncio.sleep(10)


@contextlib.asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    task = asyncio.create_task(heartbeat()) if C.controller else None
    yield
    if task:
        task.cancel()


app = FastAPI(lifespan=lifespan)
app.post("/worker_generate_stream")(stream)
app.post("/api/worker/generate_stream")(stream)


@app.post("/worker_get_status")
async def get_status() -> dict[str, Any]:
    return status()


@app.post("/worker_get_conv_template")
async def conv_template() -> dict[str, Any]:
    return {"conv": VICUNA_V11}


@app.post("/model_details")
async def model_details() -> dict[str, Any]:
    return {"context_length": C.context_length}


@app.post("/count_token")
async def count_token(request: Request) -> dict[str, Any]:
    _raw, body = await read(request)
    return {"count": len(str(body.get("prompt", ""))) // 4 + 1, "error_code": 0}


@app.post("/api/worker/count_token")
async def dbgpt_count_token(request: Request) -> int:
    _raw, body = await read(request)
    return len(str(body.get("prompt", ""))) // 4 + 1


@app.post("/api/worker/model_metadata")
async def model_metadata() -> dict[str, Any]:
    return {
        "model": C.model,
        "context_length": C.context_length,
        "chat_model": True,
        "metadata": {},
        "ext_metadata": {},
    }


@app.post("/worker_generate")
@app.post("/api/worker/generate")
async def generate(request: Request) -> JSONResponse:
    raw, body = await read(request)
    n, _delay = plan(raw, body)
    return JSONResponse(json.loads(frames_for(C.api, n, prompt_tokens(body))[-1][:-1]))


@app.get("/__stats")
async def stats() -> dict[str, int]:
    return STATS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", choices=("fastchat", "dbgpt"), default="fastchat")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--controller-address")
    args = parser.parse_args()
    C.api, C.port, C.model = args.api, args.port, args.model
    C.controller = args.controller_address
    uvicorn.run(app, host=C.host, port=C.port, log_level="warning", access_log=False, backlog=4096)


if __name__ == "__main__":
    main()
