"""Test data for prompt rendering: the golden files in tests/protocol/golden/, and templates;
and ``wire_text``, the strings the fast frame paths are checked with.

The golden files are gzip-compressed JSON Lines, read from the repository (no outside folder, no
environment variable). Each line is a conversation and the prompt FastChat's own
`Conversation.get_prompt()` rendered for it. tests/protocol/golden/README.md says which FastChat
rendered each file and how; scripts/render_golden.py regenerates the fschat 0.2.36 one.
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"

GOLDEN_FILES = {
    "0.2.36": "fastchat-v0.2.36-prompts.jsonl.gz",
    "main": "fastchat-main-prompts.jsonl.gz",
}


def golden_path(version: str) -> Path:
    return GOLDEN_DIR / GOLDEN_FILES[version]


@dataclass(frozen=True)
class GoldenCase:
    """One line of a golden file: a conversation and the prompt FastChat rendered for it."""

    path: Path
    lineno: int
    template: str
    fastchat: str
    conv: dict[str, Any]
    system_message: str | None
    turns: list[tuple[int, str | None]]
    prompt: str


@functools.cache
def golden_cases(version: str) -> dict[str, list[GoldenCase]]:
    """The golden cases of one FastChat version, grouped by template in file order."""
    path = golden_path(version)
    if not path.is_file():
        raise FileNotFoundError(f"golden file {path} is missing from the repository")
    grouped: dict[str, list[GoldenCase]] = {}
    # Split on "\n" only: the files escape the other Unicode line breaks, and universal-newline
    # reading would also rewrite any raw "\r".
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line:
            continue
        raw = json.loads(line)
        case = GoldenCase(
            path=path,
            lineno=lineno,
            template=raw["template"],
            fastchat=raw["fastchat"],
            conv=raw["conv"],
            system_message=raw["system_message"],
            turns=[(role, text) for role, text in raw["turns"]],
            prompt=raw["prompt"],
        )
        grouped.setdefault(case.template, []).append(case)
    return grouped


def golden_templates(version: str) -> list[str]:
    """Template names for parametrizing; empty if the file is missing (a test reports that)."""
    try:
        return list(golden_cases(version))
    except FileNotFoundError:
        return []


def describe_mismatch(case: GoldenCase, actual: str) -> str:
    """A failure report that names the case and points at the first differing character."""
    at = next(
        (i for i, (a, b) in enumerate(zip(actual, case.prompt, strict=False)) if a != b),
        min(len(actual), len(case.prompt)),
    )
    return (
        f"{case.path.name}:{case.lineno} template={case.template!r} "
        f"system_message={case.system_message!r} turns={case.turns!r}\n"
        f"  first difference at index {at}: expected {case.prompt[at : at + 40]!r}, "
        f"got {actual[at : at + 40]!r}\n"
        f"  expected: {case.prompt!r}\n"
        f"  actual:   {actual!r}"
    )


def make_conv(
    name: str,
    sep_style: object,
    sep: str | None,
    sep2: str | None = None,
    *,
    roles: tuple[str, str] = ("USER", "ASSISTANT"),
    system_template: str = "{system_message}",
    system_message: str = "",
    messages: tuple[tuple[str, str], ...] = (),
    main: bool = False,
) -> dict[str, Any]:
    """Template JSON shaped like a worker's: 0.2.36 fields, plus main's two extra ones if `main`."""
    conv: dict[str, Any] = {
        "name": name,
        "system_template": system_template,
        "system_message": system_message,
        "roles": list(roles),
        "messages": [list(m) for m in messages],
        "offset": len(messages),
        "sep_style": sep_style,
        "sep": sep,
        "sep2": sep2,
        "stop_str": None,
        "stop_token_ids": None,
    }
    if main:
        conv["system_message_vision"] = ""
        conv["max_image_size_mb"] = None
    return conv


# Characters JSON escapes or that have no UTF-8 form, and pieces streams are full of.
AWKWARD_PIECES = (
    "\ufffd",  # what a worker sends for a partial UTF-8 sequence (§1.3)
    "\ud83d",  # lone surrogates: no UTF-8 form, so the frame falls back to ASCII escapes
    "\udc00",
    "\x00",
    "\x1f",
    "\x7f",
    "\n",
    "\t",
    '"',
    "\\",
    "/",
    "\u2028",
    "😀",
    "中",
    "é",
    "<think>",
    "</think>",
)


def wire_text() -> st.SearchStrategy[str]:
    """Text as a worker may stream it: any code point, lone surrogates included, with the awkward
    ones above often."""
    piece = st.one_of(st.sampled_from(AWKWARD_PIECES), st.characters(exclude_categories=()))
    return st.lists(piece, max_size=30).map("".join)
