"""protocol/conversation.py against FastChat's own get_prompt() output and docs/protocol.md §4."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.conversation import (
    STYLES_MAIN,
    STYLES_V0_2_36,
    SeparatorStyle,
    UnknownSeparatorStyle,
    decode_sep_style,
    detect_numbering,
    render_prompt,
)
from tests.protocol.helpers import (
    GOLDEN_FILES,
    describe_mismatch,
    golden_cases,
    golden_templates,
    make_conv,
)

# --- golden files: every line, one test per template ------------------------------------------


def _golden_params() -> list[Any]:
    params = []
    for version in GOLDEN_FILES:
        templates = golden_templates(version)
        if not templates:  # missing file: fail loudly instead of collecting nothing
            params.append(pytest.param(version, None, id=f"{version}-missing-file"))
        params += [pytest.param(version, t, id=f"{version}-{t}") for t in templates]
    return params


@pytest.mark.parametrize(("version", "template"), _golden_params())
def test_golden_prompts(version: str, template: str | None) -> None:
    cases = golden_cases(version)  # raises FileNotFoundError naming the path
    assert template is not None
    failures = []
    for case in cases[template]:
        numbering = detect_numbering(case.conv)
        if numbering != case.fastchat:
            failures.append(f"{case.path.name}:{case.lineno} detected numbering {numbering!r}")
            continue
        actual = render_prompt(case.conv, case.turns, case.system_message)
        if actual != case.prompt:
            failures.append(describe_mismatch(case, actual))
    if failures:
        summary = f"{template}: {len(failures)} of {len(cases[template])} cases differ"
        pytest.fail("\n".join([summary, *failures]), pytrace=False)


# Counts from golden/README.md: a truncated file would otherwise pass with fewer cases.
@pytest.mark.parametrize(
    ("version", "templates", "lines"), [("0.2.36", 78, 1950), ("main", 101, 2525)]
)
def test_golden_files_are_complete(version: str, templates: int, lines: int) -> None:
    cases = golden_cases(version)
    assert len(cases) == templates
    assert sum(len(c) for c in cases.values()) == lines


@pytest.mark.parametrize(
    ("version", "table"),
    [("0.2.36", STYLES_V0_2_36), ("main", STYLES_MAIN)],
    ids=["0.2.36", "main"],
)
def test_golden_files_cover_every_style(version: str, table: Any) -> None:
    used = {
        decode_sep_style(cases[0].conv["sep_style"], version)
        for cases in golden_cases(version).values()
    }
    assert used == set(table.values())


# --- §4.1 numbering tables ----------------------------------------------------------------------

# name: (fschat 0.2.36, main since 2024-04-23), copied from docs/protocol.md §4.1.
SECTION_4_1 = {
    "ADD_COLON_SINGLE": (1, 1),
    "ADD_COLON_TWO": (2, 2),
    "ADD_COLON_SPACE_SINGLE": (3, 3),
    "NO_COLON_SINGLE": (4, 4),
    "NO_COLON_TWO": (5, 5),
    "ADD_NEW_LINE_SINGLE": (6, 6),
    "LLAMA2": (7, 7),
    "LLAMA3": (None, 8),
    "CHATGLM": (8, 9),
    "CHATML": (9, 10),
    "CHATINTERN": (10, 11),
    "DOLLY": (11, 12),
    "RWKV": (12, 13),
    "PHOENIX": (13, 14),
    "ROBIN": (14, 15),
    "FALCON_CHAT": (15, 16),
    "CHATGLM3": (16, 17),
    "DEEPSEEK_CHAT": (17, 18),
    "METAMATH": (18, 19),
    "YUAN2": (19, 20),
    "GEMMA": (None, 21),
    "CLLM": (None, 22),
    "DEFAULT": (None, 23),
}


def test_style_tables_match_section_4_1() -> None:
    assert {s.name for s in SeparatorStyle} == set(SECTION_4_1)
    old = {v: SeparatorStyle[k] for k, (v, _) in SECTION_4_1.items() if v is not None}
    new = {v: SeparatorStyle[k] for k, (_, v) in SECTION_4_1.items() if v is not None}
    assert dict(STYLES_V0_2_36) == old
    assert dict(STYLES_MAIN) == new


def test_decode_sep_style_uses_the_given_numbering() -> None:
    assert decode_sep_style(8, "0.2.36") is SeparatorStyle.CHATGLM
    assert decode_sep_style(8, "main") is SeparatorStyle.LLAMA3
    assert (
        decode_sep_style(2, "0.2.36") is decode_sep_style(2, "main") is SeparatorStyle.ADD_COLON_TWO
    )


# --- §4.4 reference renderings --------------------------------------------------------------------

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA = make_conv("vicuna_v1.1", 2, " ", "</s>", system_message=VICUNA_SYSTEM)
ZERO_SHOT = make_conv(
    "zero_shot", 1, "\n### ", roles=("Human", "Assistant"), system_message="A chat ..."
)
LLAMA_2_SYSTEM = "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n"
LLAMA_2 = make_conv(
    "llama-2", 7, " ", " </s><s>", roles=("[INST]", "[/INST]"), system_template=LLAMA_2_SYSTEM
)
MISTRAL = make_conv(
    "mistral",
    7,
    " ",
    "</s>",
    roles=("[INST]", "[/INST]"),
    system_template="[INST] {system_message}\n",
)
QWEN_KW: dict[str, Any] = {
    "roles": ("<|im_start|>user", "<|im_start|>assistant"),
    "system_template": "<|im_start|>system\n{system_message}",
    "system_message": "You are a helpful assistant.",
}
QWEN = make_conv("qwen-7b-chat", 9, "<|im_end|>", **QWEN_KW)
QWEN_MAIN = make_conv("qwen-7b-chat", 10, "<|im_end|>", **QWEN_KW, main=True)
CHATGLM3_KW: dict[str, Any] = {
    "roles": ("<|user|>", "<|assistant|>"),
    "system_template": "<|system|>\n{system_message}",
}
CHATGLM3 = make_conv("chatglm3", 16, "\n", **CHATGLM3_KW)
CHATGLM3_MAIN = make_conv("chatglm3", 17, "\n", **CHATGLM3_KW, main=True)

LLAMA_2_MAIN = {**LLAMA_2, "system_message_vision": "", "max_image_size_mb": None}
LLAMA_3 = make_conv(
    "llama-3",
    8,
    "",
    roles=("user", "assistant"),
    system_template="<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>",
    main=True,
)
CHATGLM2 = make_conv("chatglm2", 9, "\n\n", roles=("问", "答"), main=True)
YUAN2 = make_conv("yuan2", 20, "<sep>", "\n", roles=("user", "assistant"), main=True)
GEMMA = make_conv("gemma", 21, "<end_of_turn>\n", roles=("user", "model"), main=True)
API_DEFAULT = make_conv("api_based_default", 23, None, roles=("user", "assistant"), main=True)

LLAMA3_EXPECTED = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHow?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)

SYS_TURNS: list[tuple[int, str | None]] = [(0, "U1"), (1, "A1"), (0, "U2"), (1, None)]
HI_TURNS: list[tuple[int, str | None]] = [(0, "Hi"), (1, "Hello"), (0, "How?"), (1, None)]


@pytest.mark.parametrize(
    ("conv", "expected"),
    [
        pytest.param(VICUNA, "SYS USER: U1 ASSISTANT: A1</s>USER: U2 ASSISTANT:", id="vicuna_v1.1"),
        pytest.param(
            ZERO_SHOT,
            "SYS\n### Human: U1\n### Assistant: A1\n### Human: U2\n### Assistant:",
            id="zero_shot",
        ),
        pytest.param(
            LLAMA_2,
            "[INST] <<SYS>>\nSYS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]",
            id="llama-2",
        ),
        pytest.param(MISTRAL, "[INST] SYS\nU1 [/INST] A1</s>[INST] U2 [/INST]", id="mistral"),
        *(
            pytest.param(
                conv,
                "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
                "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n"
                "<|im_start|>assistant\n",
                id=f"qwen-7b-chat-{conv['sep_style']}",
            )
            for conv in (QWEN, QWEN_MAIN)
        ),
        *(
            pytest.param(
                conv,
                "<|system|>\nSYS<|user|>\nU1<|assistant|>\nA1<|user|>\nU2<|assistant|>",
                id=f"chatglm3-{conv['sep_style']}",
            )
            for conv in (CHATGLM3, CHATGLM3_MAIN)
        ),
    ],
)
def test_reference_renderings_with_system(conv: dict[str, Any], expected: str) -> None:
    assert render_prompt(conv, SYS_TURNS, "SYS") == expected


def test_reference_rendering_keeps_default_system() -> None:
    turns: list[tuple[int, str | None]] = [(0, "Hi"), (1, "Hello there."), (0, "How are you?")]
    prompt = render_prompt(VICUNA, [*turns, (1, None)])
    assert prompt == (
        f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello there.</s>USER: How are you? ASSISTANT:"
    )


@pytest.mark.parametrize(
    ("conv", "expected"),
    [
        pytest.param(
            LLAMA_2_MAIN, "[INST] Hi [/INST] Hello </s><s>[INST] How? [/INST]", id="llama-2"
        ),
        pytest.param(LLAMA_3, LLAMA3_EXPECTED, id="llama-3"),
        pytest.param(
            CHATGLM2,
            "[Round 1]\n\n问：Hi\n\n答：Hello\n\n[Round 2]\n\n问：How?\n\n答：",
            id="chatglm2",
        ),
        pytest.param(YUAN2, "Hi<n>Hello<n>How?<sep>", id="yuan2"),
        pytest.param(
            GEMMA,
            "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
            "<start_of_turn>user\nHow?<end_of_turn>\n<start_of_turn>model\n",
            id="gemma",
        ),
        pytest.param(
            API_DEFAULT,
            "\nuser: Hi\nassistant: Hello\nuser: How?\nassistant:",
            id="api_based_default",
        ),
    ],
)
def test_reference_renderings_on_main(conv: dict[str, Any], expected: str) -> None:
    assert render_prompt(conv, HI_TURNS) == expected


# --- §4.3 details the golden files exercise only in passing ---------------------------------------

RWKV = make_conv("rwkv", 12, "", roles=("Bob", "Alice"), system_message="S")
CLLM = make_conv("cllm", 22, " ", "</s>", system_message="S", main=True)
METAMATH = make_conv("metamath", 18, "\n\n", "Let's think.", roles=("### I", "### R"))


@pytest.mark.parametrize(
    ("conv", "turns", "expected"),
    [
        # sep[i] follows the index, not the role; the stored role is used as is.
        pytest.param(
            VICUNA, [(0, "a"), (0, "b"), (1, None)], "S USER: a USER: b</s>ASSISTANT:", id="parity"
        ),
        # "" mid-conversation renders exactly like an open turn.
        pytest.param(
            VICUNA,
            [(0, "a"), (1, ""), (0, "b"), (1, None)],
            "S USER: a ASSISTANT:USER: b ASSISTANT:",
            id="empty",
        ),
        # LLAMA2 ignores the stored role: the tag follows the index.
        pytest.param(
            LLAMA_2,
            [(1, "x"), (1, "y"), (1, None)],
            "[INST] <<SYS>>\nS\n<</SYS>>\n\nx [/INST] y </s><s>[INST]",
            id="llama2-tags",
        ),
        # rstrip of a character set: a last message ending in "n" loses it.
        pytest.param(
            make_conv("yuan2", 19, "<sep>", "\n"),
            [(0, "Fun"), (1, None)],
            "S\nFu<sep>",
            id="yuan2-fun",
        ),
        # One non-overlapping pass: "\n\n\n" becomes "\n\n".
        pytest.param(
            RWKV, [(0, "a\r\n\r\nb\n\n\nc"), (1, None)], "SBob: a\nb\n\nc\n\nAlice:", id="rwkv"
        ),
        pytest.param(
            CLLM,
            [(0, "a"), (1, "b"), (0, "c"), (1, None)],
            "S USER: c ASSISTANT:",
            id="cllm-last-two",
        ),
        pytest.param(
            METAMATH,
            [(0, "q"), (1, "a"), (0, "q2"), (1, None)],
            "S\n\n### I:\nq\n\n### R: Let's think.a### I:\nq2\n\n### R: Let's think.",
            id="metamath",
        ),
    ],
)
def test_style_details(
    conv: dict[str, Any], turns: list[tuple[int, str | None]], expected: str
) -> None:
    assert render_prompt(conv, turns, "S") == expected


# --- numbering: auto-detection and override -------------------------------------------------------


def test_detects_main_by_either_field() -> None:
    assert detect_numbering(QWEN) == "0.2.36"
    assert detect_numbering(QWEN_MAIN) == "main"
    assert detect_numbering({**QWEN, "system_message_vision": ""}) == "main"
    assert detect_numbering({**QWEN, "max_image_size_mb": None}) == "main"


def _without_main_fields(conv: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in conv.items() if k not in ("system_message_vision", "max_image_size_mb")
    }


# A main snapshot from 2024-04-23 to 2024-06 serves main's ints without either field.
@pytest.mark.parametrize(
    ("conv", "style"),
    [
        (LLAMA_3, SeparatorStyle.LLAMA3),
        (GEMMA, SeparatorStyle.GEMMA),
        (API_DEFAULT, SeparatorStyle.DEFAULT),
        (
            make_conv("llava-chatml", 10, "<|im_end|>", **QWEN_KW, main=True),
            SeparatorStyle.CHATML,
        ),
    ],
    ids=lambda v: v["name"] if isinstance(v, dict) else v.name,
)
def test_detects_main_only_templates_by_name(conv: dict[str, Any], style: SeparatorStyle) -> None:
    bare = _without_main_fields(conv)
    assert detect_numbering(bare) == "main"
    assert decode_sep_style(bare["sep_style"], "main") is style
    assert render_prompt(bare, HI_TURNS) == render_prompt(conv, HI_TURNS)


def test_name_alone_does_not_force_main() -> None:
    bare = _without_main_fields(LLAMA_3)
    # "llama-3" at 9 is not LLAMA3 on main, so nothing contradicts the 0.2.36 default.
    assert detect_numbering({**bare, "sep_style": 9}) == "0.2.36"
    assert detect_numbering({**bare, "name": "my-llama-3"}) == "0.2.36"


# The same template with 8 read as 0.2.36's CHATGLM: what a wrong numbering renders.
CHATGLM_EXPECTED = (
    "<|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>"
    "[Round 0]user：Hiassistant：Hello[Round 1]user：How?assistant："
)


def test_explicit_numbering_overrides_detection() -> None:
    unnamed = {**_without_main_fields(LLAMA_3), "name": "my-llama-3"}
    assert render_prompt(unnamed, HI_TURNS) == CHATGLM_EXPECTED
    assert render_prompt(unnamed, HI_TURNS, numbering="main") == LLAMA3_EXPECTED
    assert render_prompt(LLAMA_3, HI_TURNS) == LLAMA3_EXPECTED
    assert render_prompt(LLAMA_3, HI_TURNS, numbering="0.2.36") == CHATGLM_EXPECTED
    assert render_prompt(QWEN, SYS_TURNS, "SYS", numbering="0.2.36") == render_prompt(
        QWEN_MAIN, SYS_TURNS, "SYS", numbering="main"
    )


def test_unknown_numbering_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown FastChat numbering '0\.2\.35'"):
        render_prompt(QWEN, HI_TURNS, numbering="0.2.35")


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conv", "value"),
    [
        (make_conv("steerlm", None, None), None),
        (make_conv("odd", 0, " "), 0),
        (make_conv("odd", 20, " "), 20),  # main's YUAN2, but nothing says main
        (make_conv("odd", 24, " ", main=True), 24),
        (make_conv("odd", "2", " "), "2"),
        (make_conv("odd", True, " "), True),
    ],
    ids=repr,
)
def test_unknown_style_names_value_and_template(conv: dict[str, Any], value: object) -> None:
    with pytest.raises(UnknownSeparatorStyle) as info:
        render_prompt(conv, HI_TURNS)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert f"sep_style {value!r}" in message
    assert repr(conv["name"]) in message
    assert info.value.value == value
    assert info.value.template == conv["name"]


def test_malformed_templates_raise_value_error() -> None:
    with pytest.raises(ValueError, match="system_template"):
        render_prompt({**VICUNA, "system_template": "{other} {system_message}"}, HI_TURNS)
    with pytest.raises(ValueError, match="needs sep2"):
        render_prompt({**VICUNA, "sep2": None}, HI_TURNS)
    with pytest.raises(ValueError, match="turn role"):
        render_prompt(VICUNA, [(2, "Hi")])
    with pytest.raises(ValueError, match="only text content"):
        render_prompt({**VICUNA, "messages": [["USER", ["Hi", ["img"]]]]}, HI_TURNS)


# --- system message and few-shot messages --------------------------------------------------------


def test_system_message_none_keeps_default_and_string_replaces_it() -> None:
    turns: list[tuple[int, str | None]] = [(0, "Hi"), (1, None)]
    assert render_prompt(VICUNA, turns) == f"{VICUNA_SYSTEM} USER: Hi ASSISTANT:"
    assert render_prompt(VICUNA, turns, None) == render_prompt(VICUNA, turns, VICUNA_SYSTEM)
    assert render_prompt(VICUNA, turns, "") == " USER: Hi ASSISTANT:"
    # Only the template is formatted: braces in the message itself stay literal.
    assert render_prompt(VICUNA, turns, "{x} {system_message}") == (
        "{x} {system_message} USER: Hi ASSISTANT:"
    )
    assert VICUNA["system_message"] == VICUNA_SYSTEM  # the template is not modified


def test_few_shot_messages_come_first_whatever_offset() -> None:
    conv = make_conv(
        "one_shot",
        1,
        "\n### ",
        roles=("Human", "Assistant"),
        system_message="SYS",
        messages=(("Human", "Q0"), ("Assistant", "A0")),
    )
    expected = "SYS\n### Human: Q0\n### Assistant: A0\n### Human: Hi\n### Assistant:"
    for offset in (0, 2):
        assert render_prompt({**conv, "offset": offset}, [(0, "Hi"), (1, None)]) == expected


# --- purity -------------------------------------------------------------------------------------
