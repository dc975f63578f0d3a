"""Scripted replies of the reference worker's model: matching, tokens, finish, file loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapter.tools.scripted_model import (
    EOS,
    GenerationParams,
    ScriptedModel,
    ScriptedReply,
    generation_steps,
    load_replies,
)

SQL = ScriptedReply(match=r"(?i)how many ships", reply='{"sql": "SELECT count(*) FROM ships"}')
THINKER = ScriptedReply(match="riddle", reply="A map.", think="Cities without houses...")
MODEL = ScriptedModel(replies=(SQL, THINKER))


def final_chunk(model: ScriptedModel, prompt: str, max_new_tokens: int = 64) -> dict[str, object]:
    params = GenerationParams(prompt=prompt, max_new_tokens=max_new_tokens, echo=False)
    steps = list(generation_steps(model, params))
    assert steps[-1].final and steps[-1].chunk is not None
    return steps[-1].chunk


def test_a_matching_prompt_gets_the_reply_then_eos() -> None:
    chunk = final_chunk(MODEL, "USER: How many ships are in port? ASSISTANT:")
    assert chunk["text"] == '{"sql": "SELECT count(*) FROM ships"}'
    assert chunk["finish_reason"] == "stop"
    assert MODEL.reply("how many ships", 10)[-1] == EOS


def test_the_first_matching_reply_wins_in_file_order() -> None:
    both = "a riddle: how many ships?"
    assert MODEL.scripted_reply(both) is SQL
    assert ScriptedModel(replies=(THINKER, SQL)).scripted_reply(both) is THINKER


def test_a_think_block_comes_before_the_answer() -> None:
    chunk = final_chunk(MODEL, "Tell me a riddle")
    assert chunk["text"] == "<think> Cities without houses... </think> A map."


def test_whitespace_in_a_reply_comes_out_as_single_spaces() -> None:
    model = ScriptedModel(replies=(ScriptedReply(match="x", reply="line one\n\n  line two"),))
    assert final_chunk(model, "x")["text"] == "line one line two"


def test_other_prompts_keep_the_stable_words() -> None:
    prompt = "USER: something else ASSISTANT:"
    assert MODEL.reply(prompt, 8) == ScriptedModel().reply(prompt, 8)


def test_length_says_the_reply_again_until_max_new_tokens() -> None:
    longer = ScriptedReply(match="go", reply="one two", finish_reason="length")
    model = ScriptedModel(replies=(longer,))
    assert model.reply("go on", 5) == ["one", "two", "one", "two", "one"]
    assert final_chunk(model, "go on", 5)["finish_reason"] == "length"


def test_max_new_tokens_cuts_a_long_reply() -> None:
    chunk = final_chunk(MODEL, "how many ships", max_new_tokens=2)
    assert chunk["text"] == '{"sql": "SELECT'
    assert chunk["finish_reason"] == "length"


def test_eos_after_ends_scripted_replies_too() -> None:
    model = ScriptedModel(eos_after=1, replies=(SQL,))
    assert model.reply("how many ships", 5) == ['{"sql":', EOS]
    assert len(model.reply("other", 5)) == 2


def test_in_order_is_the_script_for_prompts_no_reply_matches() -> None:
    """``--in-order`` (the script from its first word, whatever the prompt) is one more
    scripted reply, after the file's, that matches everything and goes on."""
    script = ("<think>", "{a}", "</think>", "42")
    model = ScriptedModel(script=script, in_order=True, eos_after=4, replies=(SQL,))
    for prompt in ("one prompt", "another"):
        assert model.reply(prompt, 10) == [*script, EOS]
    assert ScriptedModel(script=script, in_order=True).reply("x", 6) == [*script, *script[:2]]
    assert model.scripted_reply("how many ships?") is SQL


TOML = """
[[reply]]
match = "(?i)how many ships"
reply = '{"sql": "SELECT count(*) FROM ships"}'

[[reply]]
match = "riddle"
think = "Cities without houses..."
reply = "A map."
finish_reason = "stop"
tokens_per_second = 20
first_token_delay = 0.5
"""


def test_toml_and_json_files_load_in_order(tmp_path: Path) -> None:
    (tmp_path / "r.toml").write_text(TOML)
    replies = load_replies(tmp_path / "r.toml")
    assert replies[0] == SQL
    assert replies[1] == ScriptedReply(
        match="riddle", reply="A map.", think="Cities without houses...",
        tokens_per_second=20, first_token_delay=0.5,
    )  # fmt: skip
    as_json = [{"match": r.match, "reply": r.reply} for r in replies]
    (tmp_path / "r.json").write_text(json.dumps(as_json))
    assert [r.reply for r in load_replies(tmp_path / "r.json")] == [SQL.reply, "A map."]
    (tmp_path / "o.json").write_text(json.dumps({"reply": as_json}))
    assert load_replies(tmp_path / "o.json") == load_replies(tmp_path / "r.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[reply]]\nmatch = "x"\n', "needs match and reply"),
        ('[[reply]]\nmatch = "x"\nreply = "y"\npace = 3\n', "unknown: pace"),
        ('[[reply]]\nmatch = "("\nreply = "y"\n', "not a regular expression"),
        ('[[reply]]\nmatch = "x"\nreply = "   "\n', "non-empty"),
        ('[[reply]]\nmatch = "x"\nreply = "a </s> b"\n', "must not hold"),
        ('[[reply]]\nmatch = "x"\nreply = "y"\nfinish_reason = "eos"\n', "stop or length"),
        ('[[reply]]\nmatch = "x"\nreply = "y"\ntokens_per_second = -1\n', ">= 0"),
        ("reply = 3\n", "expected a list"),
        ("[[reply]\n", "r.toml"),
    ],
)
def test_a_bad_file_is_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "r.toml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_replies(tmp_path / "r.toml")
