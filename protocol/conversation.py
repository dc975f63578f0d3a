"""FastChat's ``Conversation.get_prompt()``, re-implemented from docs/protocol.md §4.

A FastChat worker serves its conversation template as JSON (``/worker_get_conv_template``), and the
prompt it expects is whatever FastChat's own ``get_prompt()`` would build from that template. This
module rebuilds that string, character for character, for every separator style of fschat 0.2.36
and of FastChat main. It is checked against prompts rendered by FastChat itself
(tests/protocol/golden/).

The style travels as an *int* whose meaning depends on the worker's FastChat version (§4.1), so
decoding it needs a numbering: "0.2.36" or "main".

Errors: ``UnknownSeparatorStyle`` (a ``ValueError``) when the int is not a style of the chosen
numbering; a plain ``ValueError`` when the template itself is malformed (a system template that is
not a ``{system_message}`` format string, a separator the style needs but the template leaves null,
non-text content, a turn role other than 0 or 1).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from protocol.errors import UnknownSeparatorStyle

__all__ = [
    "STYLES_MAIN",
    "STYLES_V0_2_36",
    "Numbering",
    "SeparatorStyle",
    "UnknownSeparatorStyle",
    "decode_sep_style",
    "detect_numbering",
    "render_prompt",
]

Numbering = Literal["0.2.36", "main"]


class SeparatorStyle(enum.Enum):
    """Separator styles by name, declared in FastChat main's order.

    Values are the names, not FastChat's ints: an int means nothing without its numbering.
    """

    ADD_COLON_SINGLE = "ADD_COLON_SINGLE"
    ADD_COLON_TWO = "ADD_COLON_TWO"
    ADD_COLON_SPACE_SINGLE = "ADD_COLON_SPACE_SINGLE"
    NO_COLON_SINGLE = "NO_COLON_SINGLE"
    NO_COLON_TWO = "NO_COLON_TWO"
    ADD_NEW_LINE_SINGLE = "ADD_NEW_LINE_SINGLE"
    LLAMA2 = "LLAMA2"
    LLAMA3 = "LLAMA3"
    CHATGLM = "CHATGLM"
    CHATML = "CHATML"
    CHATINTERN = "CHATINTERN"
    DOLLY = "DOLLY"
    RWKV = "RWKV"
    PHOENIX = "PHOENIX"
    ROBIN = "ROBIN"
    FALCON_CHAT = "FALCON_CHAT"
    CHATGLM3 = "CHATGLM3"
    DEEPSEEK_CHAT = "DEEPSEEK_CHAT"
    METAMATH = "METAMATH"
    YUAN2 = "YUAN2"
    GEMMA = "GEMMA"
    CLLM = "CLLM"
    DEFAULT = "DEFAULT"


_S = SeparatorStyle
_MAIN_ONLY_STYLES = frozenset({_S.LLAMA3, _S.GEMMA, _S.CLLM, _S.DEFAULT})

# FastChat's SeparatorStyle is an IntEnum numbered by declaration order from 1. main inserted
# LLAMA3 after LLAMA2 and appended GEMMA, CLLM, DEFAULT, so every int from 8 up moved (§4.1).
STYLES_MAIN: Mapping[int, SeparatorStyle] = MappingProxyType(dict(enumerate(_S, start=1)))
STYLES_V0_2_36: Mapping[int, SeparatorStyle] = MappingProxyType(
    dict(enumerate((s for s in _S if s not in _MAIN_ONLY_STYLES), start=1))
)
_TABLES: Mapping[str, Mapping[int, SeparatorStyle]] = {
    "0.2.36": STYLES_V0_2_36,
    "main": STYLES_MAIN,
}

# Templates a 0.2.36 worker cannot serve (absent there, or registered with sep_style None), with
# their style on main. A worker serving one of them runs main even if its JSON predates the two
# fields that normally give main away (snapshots from 2024-04-23 to 2024-06).
# fmt: off
_MAIN_ONLY_TEMPLATES: Mapping[str, SeparatorStyle] = {
    "llama-3": _S.LLAMA3, "llava-chatml": _S.CHATML, "gemma": _S.GEMMA, "cllm": _S.CLLM,
    **dict.fromkeys([
        "api_based_default", "chatgpt", "gpt-4-turbo-2024-04-09", "gpt-mini", "pplxai",
        "claude-3-haiku-20240307", "claude-3-sonnet-20240229", "claude-3-5-sonnet-20240620-v2",
        "claude-3-5-sonnet-20240620", "claude-3-opus-20240229", "meta-llama-3.1",
        "meta-llama-3.1-sp", "bard", "gemini", "gemini-1.5-pro", "gemini-1.5-pro-002-test-sp",
        "steerlm", "grok-2", "grok-2-mini",
    ], _S.DEFAULT),
}
# fmt: on


def _style_hint(value: object, numbering: str) -> str:
    if value is None:
        return "FastChat cannot serve a template without a style"
    return (
        f"valid ints are 1..{len(_TABLES[numbering])}; if the worker runs another "
        "FastChat version, set the numbering explicitly"
    )


def decode_sep_style(
    value: object, numbering: str, *, template: str | None = None
) -> SeparatorStyle:
    """The style a worker's ``sep_style`` int means under ``numbering`` ("0.2.36" or "main")."""
    table = _TABLES.get(numbering)
    if table is None:
        raise ValueError(f"unknown FastChat numbering {numbering!r}: use '0.2.36' or 'main'")
    # bool is an int subclass; JSON true is not a style.
    if isinstance(value, int) and not isinstance(value, bool) and value in table:
        return table[value]
    raise UnknownSeparatorStyle(value, template, numbering, detail=_style_hint(value, numbering))


def detect_numbering(conv: Mapping[str, Any]) -> Numbering:
    """Guess the worker's numbering from its template JSON (§4.1).

    Only FastChat main's JSON carries ``system_message_vision`` / ``max_image_size_mb``. Without
    them, a template that only main can serve is still main if its int decodes to its main style.
    """
    if "system_message_vision" in conv or "max_image_size_mb" in conv:
        return "main"
    name, value = conv.get("name"), conv.get("sep_style")
    expected = _MAIN_ONLY_TEMPLATES.get(name) if isinstance(name, str) else None
    if expected is not None and isinstance(value, int) and STYLES_MAIN.get(value) is expected:
        return "main"
    return "0.2.36"


@dataclass(frozen=True)
class _Conv:
    """What ``get_prompt`` reads, with the conversation's turns already appended."""

    name: str
    system: str  # S: system_template formatted with the system message
    system_message: str  # the raw system message; some styles test it rather than S (§4.3)
    roles: tuple[str, ...]
    messages: tuple[tuple[str, str | None], ...]
    seps: tuple[str | None, str | None]

    def sep(self, i: int = 0) -> str:
        """``sep`` for even ``i``, ``sep2`` for odd ``i``: parity by index, whatever the role."""
        value = self.seps[i % 2]
        if value is None:
            # FastChat itself would fail here with a TypeError (str + None).
            field = "sep2" if i % 2 else "sep"
            raise ValueError(f"conversation template {self.name!r} needs {field} but it is null")
        return value


def _str_field(conv: Mapping[str, Any], key: str, name: str) -> str:
    value = conv.get(key)
    if not isinstance(value, str):
        raise ValueError(f"conversation template {name!r}: {key} must be a string, not {value!r}")
    return value


def _text(value: object, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(
        f"conversation template {name!r}: only text content is supported, not {value!r}"
    )


def _build(
    conv: Mapping[str, Any], turns: Sequence[tuple[int, str | None]], system: str | None
) -> _Conv:
    name = _str_field(conv, "name", "?")
    template = _str_field(conv, "system_template", name)
    message = _str_field(conv, "system_message", name) if system is None else system
    try:
        # str.format on the template only: braces inside the system message stay literal.
        formatted = template.format(system_message=message)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"conversation template {name!r}: system_template {template!r} is not a format "
            f"string of {{system_message}} alone ({exc!r})"
        ) from exc
    roles = tuple(str(r) for r in conv.get("roles") or ())
    # The template's few-shot messages always come first: get_prompt ignores `offset`.
    messages = [(str(role), _text(text, name)) for role, text in conv.get("messages") or ()]
    for role, text in turns:
        if role not in (0, 1) or len(roles) <= role:
            raise ValueError(
                f"conversation template {name!r}: turn role must be 0 or 1, not {role!r}"
            )
        messages.append((roles[role], _text(text, name)))
    return _Conv(
        name, formatted, message, roles, tuple(messages), (conv.get("sep"), conv.get("sep2"))
    )


_Present = Callable[[int, str, str], str]  # (index, role, text) of a message with content
_Absent = Callable[[int, str], str]  # (index, role) of a message without: None or "" (§4.2)


def _each(messages: Sequence[tuple[str, str | None]], present: _Present, absent: _Absent) -> str:
    return "".join(
        present(i, role, text) if text else absent(i, role)
        for i, (role, text) in enumerate(messages)
    )


def _add_colon_single(c: _Conv) -> str:
    body = _each(c.messages, lambda i, r, m: f"{r}: {m}{c.sep()}", lambda i, r: f"{r}:")
    return c.system + c.sep() + body


def _add_colon_two(c: _Conv) -> str:
    body = _each(c.messages, lambda i, r, m: f"{r}: {m}{c.sep(i)}", lambda i, r: f"{r}:")
    return c.system + c.sep() + body


def _add_colon_space_single(c: _Conv) -> str:
    body = _each(c.messages, lambda i, r, m: f"{r}: {m}{c.sep()}", lambda i, r: f"{r}: ")
    return c.system + c.sep() + body


def _no_colon_single(c: _Conv) -> str:
    return c.system + _each(c.messages, lambda i, r, m: f"{r}{m}{c.sep()}", lambda i, r: r)


def _no_colon_two(c: _Conv) -> str:
    return c.system + _each(c.messages, lambda i, r, m: f"{r}{m}{c.sep(i)}", lambda i, r: r)


def _add_new_line_single(c: _Conv) -> str:
    prefix = c.system + c.sep() if c.system else ""
    return prefix + _each(c.messages, lambda i, r, m: f"{r}\n{m}{c.sep()}", lambda i, r: f"{r}\n")


def _llama2(c: _Conv) -> str:
    # The stored role is ignored: the tag comes from the index, and the first message has none
    # because "[INST]" already opens the prefix.
    def present(i: int, role: str, text: str) -> str:
        return f"{text} " if i == 0 else f"{c.roles[i % 2]} {text}{c.sep(i)}"

    prefix = c.system if c.system_message else "[INST] "
    return prefix + _each(c.messages, present, lambda i, r: c.roles[i % 2])


def _llama3(c: _Conv) -> str:
    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    body = _each(
        c.messages, lambda i, r, m: f"{header(r)}{m.strip()}<|eot_id|>", lambda i, r: header(r)
    )
    return "<|begin_of_text|>" + (c.system if c.system_message else "") + body


def _chatglm(c: _Conv) -> str:
    first_round = 1 if c.name == "chatglm2" else 0  # chatglm2's prompt counts rounds from 1

    def round_header(i: int) -> str:
        return f"[Round {i // 2 + first_round}]{c.sep()}" if i % 2 == 0 else ""

    body = _each(
        c.messages,
        lambda i, r, m: f"{round_header(i)}{r}：{m}{c.sep()}",
        lambda i, r: f"{round_header(i)}{r}：",
    )
    return (c.system + c.sep() if c.system else "") + body


def _chatml(c: _Conv) -> str:
    prefix = c.system + c.sep() + "\n" if c.system else ""
    return prefix + _each(c.messages, lambda i, r, m: f"{r}\n{m}{c.sep()}\n", lambda i, r: f"{r}\n")


def _chatintern(c: _Conv) -> str:
    def bos(i: int) -> str:
        return "<s>" if i % 2 == 0 else ""

    body = _each(
        c.messages, lambda i, r, m: f"{bos(i)}{r}:{m}{c.sep(i)}\n", lambda i, r: f"{bos(i)}{r}:"
    )
    return c.system + body


def _dolly(c: _Conv) -> str:
    def present(i: int, role: str, text: str) -> str:
        return f"{role}:\n{text}{c.sep(i)}" + ("\n\n" if i % 2 else "")

    return c.system + _each(c.messages, present, lambda i, r: f"{r}:\n")


def _rwkv(c: _Conv) -> str:
    def present(i: int, role: str, text: str) -> str:
        return f"{role}: " + text.replace("\r\n", "\n").replace("\n\n", "\n") + "\n\n"

    return c.system + _each(c.messages, present, lambda i, r: f"{r}:")


def _phoenix(c: _Conv) -> str:
    return c.system + _each(
        c.messages, lambda i, r, m: f"{r}: <s>{m}</s>", lambda i, r: f"{r}: <s>"
    )


def _robin(c: _Conv) -> str:
    body = _each(c.messages, lambda i, r, m: f"{r}:\n{m}{c.sep()}", lambda i, r: f"{r}:\n")
    return c.system + c.sep() + body


def _falcon_chat(c: _Conv) -> str:
    prefix = c.system + c.sep() if c.system_message else ""
    return prefix + _each(c.messages, lambda i, r, m: f"{r}: {m}{c.sep()}", lambda i, r: f"{r}:")


def _chatglm3(c: _Conv) -> str:
    prefix = c.system if c.system_message else ""
    return prefix + _each(c.messages, lambda i, r, m: f"{r}\n{m}", lambda i, r: r)


def _deepseek_chat(c: _Conv) -> str:
    return c.system + _each(c.messages, lambda i, r, m: f"{r}: {m}{c.sep(i)}", lambda i, r: f"{r}:")


def _metamath(c: _Conv) -> str:
    # sep2 ("Let's think step by step.") opens the answer instead of closing it.
    def opening(i: int, role: str) -> str:
        return f"{role}: {c.sep(1)}" if i % 2 else f"{role}:\n"

    def present(i: int, role: str, text: str) -> str:
        return opening(i, role) + text + ("" if i % 2 else c.sep())

    prefix = c.system + c.sep() if c.system else ""
    return prefix + _each(c.messages, present, opening)


def _yuan2(c: _Conv) -> str:
    prefix = c.system + c.sep(1) if c.system_message else ""
    body = _each(c.messages, lambda i, r, m: f"{m}<n>", lambda i, r: "")
    # rstrip takes a character set: it also eats a final "n", "<" or ">" of the text itself.
    return (prefix + body).rstrip("<n>") + c.sep()


def _gemma(c: _Conv) -> str:
    # The system message is dropped entirely (§4.3).
    body = _each(
        c.messages,
        lambda i, r, m: f"<start_of_turn>{r}\n{m}{c.sep()}",
        lambda i, r: f"<start_of_turn>{r}\n",
    )
    return "<bos>" + body


def _cllm(c: _Conv) -> str:
    # Only the last exchange is rendered, re-indexed from 0 for the separator parity.
    body = _each(c.messages[-2:], lambda i, r, m: f"{r}: {m}{c.sep(i)}", lambda i, r: f"{r}:")
    return c.system + c.sep() + body


def _default(c: _Conv) -> str:
    return c.system + "\n" + _each(c.messages, lambda i, r, m: f"{r}: {m}\n", lambda i, r: f"{r}:")


_RENDERERS: Mapping[SeparatorStyle, Callable[[_Conv], str]] = {
    _S.ADD_COLON_SINGLE: _add_colon_single,
    _S.ADD_COLON_TWO: _add_colon_two,
    _S.ADD_COLON_SPACE_SINGLE: _add_colon_space_single,
    _S.NO_COLON_SINGLE: _no_colon_single,
    _S.NO_COLON_TWO: _no_colon_two,
    _S.ADD_NEW_LINE_SINGLE: _add_new_line_single,
    _S.LLAMA2: _llama2,
    _S.LLAMA3: _llama3,
    _S.CHATGLM: _chatglm,
    _S.CHATML: _chatml,
    _S.CHATINTERN: _chatintern,
    _S.DOLLY: _dolly,
    _S.RWKV: _rwkv,
    _S.PHOENIX: _phoenix,
    _S.ROBIN: _robin,
    _S.FALCON_CHAT: _falcon_chat,
    _S.CHATGLM3: _chatglm3,
    _S.DEEPSEEK_CHAT: _deepseek_chat,
    _S.METAMATH: _metamath,
    _S.YUAN2: _yuan2,
    _S.GEMMA: _gemma,
    _S.CLLM: _cllm,
    _S.DEFAULT: _default,
}


def render_prompt(
    conv: Mapping[str, Any],
    turns: list[tuple[int, str | None]],
    system_message: str | None = None,
    *,
    numbering: str | None = None,
) -> str:
    """The prompt FastChat's ``get_prompt()`` builds for ``conv`` plus ``turns``.

    ``conv`` is the template JSON a worker serves (the value of "conv"). Each turn is
    ``(0 | 1, content)`` for ``roles[0]`` (user) or ``roles[1]`` (assistant); a ``None`` or ``""``
    content is an open turn, so end with ``(1, None)`` to ask for a reply. ``system_message=None``
    keeps the template's own; a string replaces it. ``numbering`` ("0.2.36" or "main") decodes
    ``sep_style``; ``None`` detects it with ``detect_numbering``.
    """
    name = conv.get("name")
    chosen = detect_numbering(conv) if numbering is None else numbering
    style = decode_sep_style(
        conv.get("sep_style"), chosen, template=name if isinstance(name, str) else None
    )
    return _RENDERERS[style](_build(conv, turns, system_message))


IMAGE_PLACEHOLDER = "$$<image>$$"
"""What FastChat 0.2.36's ``get_prompt`` puts before a user turn's text, once per image, when the
turn carries images; only the ``ADD_COLON_TWO`` (Vicuna) style does. sglang_worker, the one
0.2.36 worker that reads ``images``, checks that the counts match."""


def places_images(conv: Mapping[str, Any], *, numbering: str | None = None) -> bool:
    """Whether FastChat 0.2.36 marks images in the prompt for this template (see above)."""
    chosen = detect_numbering(conv) if numbering is None else numbering
    return decode_sep_style(conv.get("sep_style"), chosen) is SeparatorStyle.ADD_COLON_TWO
