"""Scenario 11: `protocol.render_prompt` against fschat 0.2.36's own `Conversation`.

Hypothesis generates conversations (deterministically: `derandomize=True`), spread round-robin
over every template fschat 0.2.36 registers (those a worker can start with). The real
`Conversation.get_prompt()` renders them all in one driver call under the FastChat venv; our
renderer must produce the same string, character for character, for every case.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from protocol.conversation import render_prompt
from tests.interop.peers import DRIVERS, Peers
from tests.interop.procs import run_json

CASES_PER_TEMPLATE = 30

# Pieces that stress separators and templates: braces (str.format), newlines, special tokens.
_TRICKY = st.sampled_from(
    [
        "", " ", "\n", "\r\n", "\n\n\n", "\t", "{x}", "{system_message}", "{{double}}", "}{",
        "<n>", "ends in n", "</s>", "<s>", "###", "<|im_end|>", "[INST]", "USER:", "ASSISTANT:",
        "\u4e2d\u6587", "\U0001f600", "\u200b", "$$<image>$$",
    ]
)  # fmt: skip
_TEXT = st.text(st.characters(codec="utf-8"), max_size=30)
_CONTENT = st.one_of(
    _TRICKY, _TEXT, st.lists(st.one_of(_TRICKY, _TEXT), min_size=2, max_size=5).map("".join)
)


@st.composite
def conversations(draw: st.DrawFn) -> dict[str, Any]:
    """A system message choice and finished turns, then the open assistant turn that
    openai_api_server always appends. Roles mostly alternate from the user, as OpenAI-style
    clients send them; sometimes not (DB-GPT splits content parts into consecutive turns)."""
    system = draw(st.one_of(st.none(), st.just(""), _CONTENT))
    count = draw(st.integers(min_value=0, max_value=6))
    alternate = draw(st.integers(min_value=0, max_value=3)) > 0
    turns: list[list[Any]] = []
    for index in range(count):
        role = index % 2 if alternate else draw(st.integers(min_value=0, max_value=1))
        turns.append([role, draw(_CONTENT)])
    turns.append([1, None])
    return {"system_message": system, "turns": turns}


def generate_conversations(count: int) -> list[dict[str, Any]]:
    collected: list[dict[str, Any]] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(conversations())
    def collect(case: dict[str, Any]) -> None:
        collected.append(case)

    collect()
    return collected


@pytest.fixture(scope="module")
def fschat_templates(peers: Peers) -> dict[str, Any]:
    return run_json([peers.fastchat.python, DRIVERS / "fschat_render.py", "templates"])


def test_every_registered_template_is_covered(fschat_templates: dict[str, Any]) -> None:
    assert fschat_templates["fastchat"] == "0.2.36"
    # 83 registered; 5 have sep_style None and cannot be served by a worker.
    assert len(fschat_templates["templates"]) == 78
    assert sorted(fschat_templates["skipped"]) == ["bard", "chatgpt", "gemini", "pplxai", "steerlm"]


def test_render_prompt_matches_fschat(peers: Peers, fschat_templates: dict[str, Any]) -> None:
    templates = fschat_templates["templates"]
    convs = generate_conversations(CASES_PER_TEMPLATE * len(templates))
    assert len(convs) >= 20 * len(templates), len(convs)
    cases = [
        {"template": templates[i % len(templates)]["name"],
         "conv": templates[i % len(templates)]["conv"], **conv}
        for i, conv in enumerate(convs)
    ]  # fmt: skip
    expected = run_json(
        [peers.fastchat.python, DRIVERS / "fschat_render.py", "render"], {"cases": cases}
    )["results"]
    assert len(expected) == len(cases)

    differences = []
    for case, want in zip(cases, expected, strict=True):
        turns = [(role, content) for role, content in case["turns"]]
        try:
            got: dict[str, str] = {
                "prompt": render_prompt(case["conv"], turns, case["system_message"])
            }
        except Exception as exc:
            got = {"error": f"{type(exc).__name__}: {exc}"}
        # Where fschat raises, ours must raise too (any exception type).
        if ("error" in want) != ("error" in got) or got.get("prompt") != want.get("prompt"):
            differences.append((case, want, got))
    report = "\n".join(
        f"- {c['template']} system={c['system_message']!r} turns={c['turns']!r}\n"
        f"    fschat: {w!r}\n    ours:   {g!r}"
        for c, w, g in differences[:10]
    )
    assert not differences, f"{len(differences)} of {len(cases)} cases differ:\n{report}"
