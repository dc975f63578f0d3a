"""Reasoning split: ``<think>…</think>`` out of the answer, as DB-GPT's own workers do (§7.4).

DB-GPT expects its *worker* to separate a reasoning model's thinking from its answer and to send
both as ``content: [{"type": "thinking"…}, {"type": "text"…}]`` (0.7.1+); its apiserver turns the
thinking part into ``reasoning_content``. FastChat workers relay the raw text, so the adapter
re-parses the cumulative text of every frame here, the way DB-GPT's ``parse_chat_message`` does,
with three tag shapes:

- **start and end tag**: ``<think>reasoning</think>answer``;
- **end tag only**: the prompt ends with ``<think>`` (the template pre-fills it), so the output
  starts inside the block: ``reasoning</think>answer``;
- **start tag only** while the model is still thinking: ``<think>reasoning so fa``.

Two rules DB-GPT's own parser does not keep, because its apiserver computes stream deltas by
*length* (§8.4): the thinking and the answer only ever grow by appending. So a partial tag at
the end of the text (``…</thi``) is held back until the next frame says what it is, and a block
is only recognised where it can be recognised from its first character on (at the start of the
output, or anywhere when the model is known to reason), never retroactively.

Which requests are split (``ReasoningMode``): ``auto`` splits for the models DB-GPT itself treats
as reasoning models (``is_reasoning_model``) and for any output that *starts* a think block;
``split`` always; ``strip`` splits the same way as ``split`` but drops the thinking and keeps the
legacy ``text`` form; ``pass`` relays the text untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

__all__ = [
    "THINK_END",
    "THINK_START",
    "ReasoningMode",
    "ReasoningParser",
    "ReasoningRule",
    "Split",
    "is_reasoning_model",
    "split_reasoning",
]

ReasoningMode = Literal["auto", "split", "strip", "pass"]

THINK_START: Final = "<think>"
THINK_END: Final = "</think>"


def is_reasoning_model(name: str) -> bool:
    """DB-GPT's own rule (``model/adapter/base.py``, ``is_reasoning_model``) on the model name:
    deepseek with r1, reasoning or reasoner; qwq; qwen3."""
    lower = name.lower()
    deepseek = "deepseek" in lower and any(k in lower for k in ("r1", "reasoning", "reasoner"))
    return deepseek or "qwq" in lower or "qwen3" in lower


class Split(NamedTuple):
    """One frame's text, parsed. ``thinking`` is None when no think block has been seen.
    (A tuple: a third of a frozen dataclass's cost to make, and one is made per frame.)"""

    thinking: str | None
    answer: str


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest proper prefix of ``tag`` that ``text`` ends with (0: none)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


def split_reasoning(text: str, *, prefilled: bool = False, anywhere: bool = False) -> Split:
    """Parse one cumulative text. ``prefilled``: the prompt ended with ``<think>``, so the text
    starts inside the block. ``anywhere``: a block may start after some answer text (DB-GPT's
    parser looks for it anywhere); otherwise only at the start of the output.

    Only the first block is taken, as DB-GPT does; later tags stay in the answer. Once a block is
    seen, the thinking is stripped of surrounding whitespace and the answer of leading whitespace
    (both still only grow); text without a block is left as it is."""
    if prefilled:
        before, inside = "", text
    else:
        start = text.find(THINK_START)
        if start < 0 or (not anywhere and text[:start].strip()):
            return Split(None, _held_answer(text, anywhere=anywhere))
        before, inside = text[:start], text[start + len(THINK_START) :]
    end = inside.find(THINK_END)
    if end < 0:
        held = _partial_suffix(inside, THINK_END)
        thinking, after = inside[: len(inside) - held], ""
    else:
        thinking, after = inside[:end], inside[end + len(THINK_END) :]
    return Split(thinking.strip(), (before + after).lstrip())


def _held_answer(text: str, *, anywhere: bool) -> str:
    """The answer when no block has started: hold back what may still become ``<think>``."""
    if anywhere:
        return text[: len(text) - _partial_suffix(text, THINK_START)]
    opening = text.lstrip()
    return "" if opening and THINK_START.startswith(opening) else text


@dataclass(frozen=True)
class ReasoningRule:
    """How one generation's text is split (see ``ReasoningRule.for_request``)."""

    prefilled: bool = False  # the prompt ends with <think>: the output starts inside the block
    anywhere: bool = False  # a block may start after some answer text, not only at the start
    keep_thinking: bool = True  # False (``strip``): drop the thinking, send the answer only

    @classmethod
    def for_request(
        cls, mode: ReasoningMode, *, model: str, prompt: str, completion: bool
    ) -> ReasoningRule | None:
        """The rule for one generation, or None to relay the text untouched (``pass``). The
        raw-completion path is never split: its text continues the caller's own prompt, and
        DB-GPT's completions route reads only ``text``."""
        if mode == "pass" or completion:
            return None
        return cls(
            prefilled=prompt.rstrip().endswith(THINK_START),
            anywhere=mode != "auto" or is_reasoning_model(model),
            keep_thinking=mode != "strip",
        )


class ReasoningParser:
    """``split_reasoning`` over a stream, with the guarantee the apiserver's length-based deltas
    need: the thinking and the answer never get shorter from one frame to the next (a frame whose
    re-parse would shrink one keeps the previous value). Without a rule, text passes through.
    """

    def __init__(self, rule: ReasoningRule | None) -> None:
        self._rule = rule
        self._thinking: str | None = None
        self._answer = ""
        # Only at the start (not ``anywhere``, not ``prefilled``): once the output opens with
        # something that is not ``<think>``, no block can come, and the text is the answer
        # (what ``split_reasoning`` would find, without scanning the whole text every frame).
        self._undecided = rule is not None and not rule.anywhere and not rule.prefilled
        self._plain = False

    def feed(self, text: str) -> Split:
        """The split of this frame's cumulative text (thinking None in ``strip`` mode)."""
        rule = self._rule
        if rule is None:
            return Split(None, text)
        if self._plain:
            if _visible(text) >= _visible(self._answer):
                self._answer = text
            return Split(None, self._answer)
        if self._undecided:
            self._decide(text)
        parsed = split_reasoning(text, prefilled=rule.prefilled, anywhere=rule.anywhere)
        if parsed.thinking is not None and _visible(parsed.thinking) >= _visible(self._thinking):
            self._thinking = parsed.thinking
        if _visible(parsed.answer) >= _visible(self._answer):
            self._answer = parsed.answer
        return Split(self._thinking if rule.keep_thinking else None, self._answer)

    def _decide(self, text: str) -> None:
        opening = text.lstrip()
        if not opening or opening[0] == "\ufffd":  # (a partial character may yet be a space)
            return
        if opening.startswith(THINK_START):
            self._undecided = False  # a block: parsed frame by frame from now on
        elif not THINK_START.startswith(opening):
            self._undecided = False
            self._plain = self._thinking is None


def _visible(text: str | None) -> int:
    # DB-GPT drops U+FFFD before taking lengths (§8.4): a replacement character that becomes a
    # real one is growth, not shrinkage.
    if not text:
        return 0
    return len(text) if "\ufffd" not in text else len(text.replace("\ufffd", ""))
