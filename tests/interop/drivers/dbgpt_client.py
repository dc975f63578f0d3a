"""Drive DB-GPT 0.8.2's own LLM client against a model controller. Runs under the DB-GPT venv.

    $DBGPT_VENV/bin/python tests/interop/drivers/dbgpt_client.py < spec.json

stdin (JSON):
    {"controller": "http://127.0.0.1:PORT",     # RemoteLLMClient(controller_address=...)
     "wait_s": 1.2,                              # let its registry client's health check pass
     "ops": [
       {"op": "models"},
       {"op": "count_token", "model": "tiny-vicuna", "prompt": "hello"},
       {"op": "generate", "model": "tiny-vicuna",
        "messages": [{"role": "system"|"human"|"ai", "content": "..."}],
        "params": {"temperature": 1e-6, "max_new_tokens": 16, "stop": ["###"]}},
       {"op": "generate_stream", ...same keys as generate...}]}
A message's "content" may also be a list of DB-GPT media parts, as its webserver, AWEL flows and
agents build them: [{"type": "text"|"image", "object": {"data": ..., "format": ...}}].

stdout (JSON): {"results": [{"op": ..., "ok": true, "value": ...} |
                             {"op": ..., "ok": false, "error": "<Type>: <message>"}]}
Values: `models` -> list of ModelMetadata dicts; `count_token` -> int; `generate` -> one output
dict; `generate_stream` -> list of output dicts, one per chunk. An output dict is
{"text", "error_code", "finish_reason", "usage", "incremental"}.
Each op has its own try/except, so one failure does not hide the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from typing import Any

# Whatever DB-GPT prints goes to stderr, from the first import on: stdout carries only the JSON
# result. (dbgpt.configs prints "Setting random seed to 42" on import when CI is set.)
REAL_STDOUT = sys.stdout
sys.stdout = sys.stderr

from dbgpt.core import ModelMessage, ModelRequest  # noqa: E402
from dbgpt.core.interface.media import MediaContent  # noqa: E402
from dbgpt.model.cluster.client import RemoteLLMClient  # noqa: E402


def _output(out: Any) -> dict[str, Any]:
    try:
        text = out.text
    except ValueError:
        text = out.gen_text_with_thinking()
    return {
        "text": text,
        "error_code": out.error_code,
        "finish_reason": out.finish_reason,
        "usage": out.usage,
        "incremental": out.incremental,
    }


def _request(op: dict[str, Any], stream: bool) -> ModelRequest:
    messages = [
        ModelMessage(role=m["role"], content=_content(m["content"])) for m in op["messages"]
    ]
    return ModelRequest.build_request(op["model"], messages, stream=stream, **op.get("params", {}))


def _content(content: Any) -> Any:
    """A string as it is; a list of media-part dicts as DB-GPT's own MediaContent objects."""
    return MediaContent.parse_content(content) if isinstance(content, list) else content


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return repr(obj)


async def _run_op(client: RemoteLLMClient, op: dict[str, Any]) -> Any:
    kind = op["op"]
    if kind == "models":
        return [_jsonable(m) for m in await client.models()]
    if kind == "count_token":
        return await client.count_token(op["model"], op["prompt"])
    if kind == "generate":
        return _output(await client.generate(_request(op, stream=False)))
    if kind == "generate_stream":
        return [_output(chunk) async for chunk in client.generate_stream(_request(op, True))]
    raise ValueError(f"unknown op {kind!r}")


async def main() -> int:
    spec = json.load(sys.stdin)
    client = RemoteLLMClient(controller_address=spec["controller"])
    await asyncio.sleep(float(spec.get("wait_s", 1.2)))
    results = []
    for op in spec["ops"]:
        timeout = float(op.get("timeout_s", 60))
        try:
            value = await asyncio.wait_for(_run_op(client, op), timeout)
            results.append({"op": op["op"], "ok": True, "value": value})
        except Exception as exc:  # reported, not raised: the test decides
            results.append({"op": op["op"], "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    json.dump({"results": results}, REAL_STDOUT, ensure_ascii=True)
    REAL_STDOUT.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
