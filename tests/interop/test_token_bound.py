"""``protocol.translate.prompt_tokens_bound`` never under-counts: the adapter skips
``/count_token`` when that bound plus ``max_new_tokens`` fits the context (adapter/relay.py), so
a real tokenizer making more tokens than the bound would change ``max_new_tokens``. Checked with
the interop models' own tokenizers (tiny-vicuna: Llama SentencePiece with byte fallback;
MiniLM: WordPiece), counted as fschat's model_worker counts, on text built to be expensive:
scripts without spaces, emoji, NFKC expansions, special-token strings, random Unicode.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from protocol.translate import prompt_tokens_bound
from tests.interop.peers import DRIVERS, Peers
from tests.interop.procs import run_json

_HARD = [
    "", " ", "a", "\n", "\t\t\t", " " * 50, "\u4e2d\u6587" * 40, "\U0001f600" * 40,
    "\ufdfa" * 20, "\ufb01" * 30, "\u337f" * 20, "\u200b" * 30, "</s>" * 10, "<s>" * 10,
    "<unk>" * 10, "\u0301" * 30, "e\u0301" * 30, "\ud7a3" * 30, "\x00\x01\x7f" * 10,
    "ǅ" * 20, "x" * 500, "USER: hi ASSISTANT:", "\U00010348" * 20, "İ" * 30,
]  # fmt: skip


def _random_texts(count: int) -> list[str]:
    collected: list[str] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.text(st.characters(codec="utf-8"), max_size=200))
    def collect(text: str) -> None:
        collected.append(text)

    collect()
    return collected


@pytest.mark.parametrize("model", ["tiny_llm", "embedding"])
def test_no_tokenizer_makes_more_tokens_than_the_bound(peers: Peers, model: str) -> None:
    prompts = _HARD + _random_texts(300)
    path = getattr(peers.models, model)
    counts = run_json(
        [peers.fastchat.python, DRIVERS / "count_tokens.py"],
        {"model": str(path), "prompts": prompts},
    )["counts"]
    over = [
        (prompt[:40], count, prompt_tokens_bound(prompt))
        for prompt, count in zip(prompts, counts, strict=True)
        if count > prompt_tokens_bound(prompt)
    ]
    assert not over, over
    # The bound is not vacuous: it is the bytes plus a small margin.
    assert prompt_tokens_bound("x" * 500) == 500 + 16
