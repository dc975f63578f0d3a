"""Render prompts with fschat 0.2.36's own `Conversation`. Runs under the FastChat venv.

$FC_VENV/bin/python tests/interop/drivers/fschat_render.py templates
    stdout: {"fastchat": "0.2.36",
             "templates": [{"name": str, "conv": {...}}, ...],   # registry order
             "skipped": [str, ...]}    # sep_style None: a worker cannot start with these
    Each `conv` is what `POST /worker_get_conv_template` returns under "conv" for a worker
    started with `--conv-template NAME`: the registry copy with `sep_style` turned into an int
    (as the worker's constructor does), encoded by FastAPI's `jsonable_encoder`.

$FC_VENV/bin/python tests/interop/drivers/fschat_render.py render < cases.json
    stdin:  {"cases": [{"conv": {...}, "system_message": str|null,
                        "turns": [[0|1, str|null], ...]}, ...]}
    stdout: {"results": [{"prompt": str} | {"error": "<Type>: <message>"}, ...]}
    Built the way openai_api_server builds a chat prompt: a new Conversation from the JSON
    with SeparatorStyle(int), set_system_message(s) unless null, append_message(roles[r], c)
    for each turn, then get_prompt().
"""

from __future__ import annotations

import json
import sys
from typing import Any

import fastchat
from fastapi.encoders import jsonable_encoder
from fastchat.conversation import (
    Conversation,
    SeparatorStyle,
    conv_templates,
    get_conv_template,
)

REAL_STDOUT = sys.stdout


def dump_templates() -> dict[str, Any]:
    templates, skipped = [], []
    for name in conv_templates:
        conv = get_conv_template(name)
        if conv.sep_style is None:
            skipped.append(name)
            continue
        conv.sep_style = int(conv.sep_style)
        served = json.loads(json.dumps(jsonable_encoder({"conv": conv})))
        templates.append({"name": name, "conv": served["conv"]})
    return {"fastchat": fastchat.__version__, "templates": templates, "skipped": skipped}


def render(case: dict[str, Any]) -> str:
    data = case["conv"]
    conv = Conversation(
        name=data["name"],
        system_template=data["system_template"],
        system_message=data["system_message"],
        roles=data["roles"],
        messages=list(data["messages"]),
        offset=data["offset"],
        sep_style=SeparatorStyle(data["sep_style"]),
        sep=data["sep"],
        sep2=data["sep2"],
        stop_str=data["stop_str"],
        stop_token_ids=data["stop_token_ids"],
    )
    if case.get("system_message") is not None:
        conv.set_system_message(case["system_message"])
    for role, content in case["turns"]:
        conv.append_message(conv.roles[role], content)
    return conv.get_prompt()


def render_all(cases: list[dict[str, Any]]) -> dict[str, Any]:
    results: list[dict[str, str]] = []
    for case in cases:
        try:
            results.append({"prompt": render(case)})
        except Exception as exc:  # reported per case: the test compares behaviour
            results.append({"error": f"{type(exc).__name__}: {exc}"})
    return {"results": results}


def main(argv: list[str]) -> int:
    if argv == ["templates"]:
        out = dump_templates()
    elif argv == ["render"]:
        out = render_all(json.load(sys.stdin)["cases"])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    json.dump(out, REAL_STDOUT, ensure_ascii=True)
    REAL_STDOUT.write("\n")
    return 0


if __name__ == "__main__":
    sys.stdout = sys.stderr  # stray prints must not corrupt the JSON on stdout
    sys.exit(main(sys.argv[1:]))
