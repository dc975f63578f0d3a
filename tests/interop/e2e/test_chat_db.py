"""Chat-DB over a small SQLite database registered in the app: the prompt that reaches the
worker carries the table's schema; with a scripted answer (the reference worker's replies file)
the app runs the SQL and shows the rows."""

from __future__ import annotations

import html
import json
import re
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.interop.e2e.app_api import chat, generations, ok, poll
from tests.interop.e2e.app_stack import REFERENCE_MODEL, AppStack

QUESTION = "Which ships are in the harbour?"  # scripted in docs/examples/scripted-replies.toml
SHIPS = [("Albatross", 1200, "A1"), ("Kestrel", 800, "B2"), ("Osprey", 950, "A3")]
SUMMARY_DONE = "db summary embedding success"  # the app's log line when a schema is indexed
CHART_VIEW = re.compile(r'<chart-view content="([^"]*)"')


def harbour_database(app_http: httpx.Client, app_stack: AppStack, folder: Path) -> str:
    """Create harbour.db and register it in the app; its name in the app, once the app has
    embedded its schema (in the background, with the FastChat embedding worker)."""
    path = folder / "harbour.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE ships (name TEXT PRIMARY KEY, tonnage INTEGER, berth TEXT)")
        db.executemany("INSERT INTO ships VALUES (?, ?, ?)", SHIPS)
    db_name = f"harbour_{uuid.uuid4().hex[:8]}"
    body = {"db_type": "sqlite", "db_name": db_name, "db_path": str(path),
            "comment": "ships in the harbour"}  # fmt: skip
    done_before = app_stack.app.log_count(SUMMARY_DONE)
    embed_mark = app_stack.embed_proxy.mark()
    ok(app_http.post(app_stack.url + "/api/v2/serve/datasources", json=body))
    poll(
        lambda: app_stack.app.log_count(SUMMARY_DONE) > done_before or None,
        "the app to embed the database schema",
    )
    records = app_stack.embed_proxy.since(embed_mark, "/worker_get_embeddings")
    embedded = [text for record in records for text in record.body["input"]]
    assert any("tonnage" in text for text in embedded), embedded
    return db_name


def assert_schema_in(prompt: str) -> None:
    assert "ships" in prompt
    for column in ("name", "tonnage", "berth"):
        assert column in prompt, column


def chart(content: str) -> dict[str, Any]:
    match = CHART_VIEW.search(content)
    assert match, f"no <chart-view> in the answer: {content!r}"
    view = json.loads(html.unescape(match.group(1)))
    assert isinstance(view, dict)
    return view


@pytest.mark.deadline(600)
def test_chat_db_runs_the_scripted_sql_and_shows_the_rows(
    app_stack: AppStack, app_http: httpx.Client, tmp_path: Path
) -> None:
    db_name = harbour_database(app_http, app_stack, tmp_path)
    mark = app_stack.reference_proxy.mark()
    reply = chat(
        app_http, app_stack.url, mode="chat_with_db_execute", model=REFERENCE_MODEL,
        user_input=QUESTION, select_param=db_name,
    )  # fmt: skip
    [generation] = generations(app_stack.reference_proxy, mark)
    assert_schema_in(generation.body["prompt"])
    view = chart(reply.content)
    assert view["sql"] == "SELECT name, tonnage FROM ships ORDER BY name"
    assert view["data"] == [{"name": n, "tonnage": t} for n, t, _ in SHIPS]
    assert reply.content.startswith("List the ships in the harbour.")  # the scripted thoughts


@pytest.mark.deadline(600)
def test_chat_db_sends_the_schema_to_the_fastchat_worker(
    app_stack: AppStack, app_http: httpx.Client, tmp_path: Path
) -> None:
    db_name = harbour_database(app_http, app_stack, tmp_path)
    mark = app_stack.llm_proxy.mark()
    # tiny-vicuna writes no SQL: only its prompt is checked.
    chat(
        app_http, app_stack.url, mode="chat_with_db_execute", model=app_stack.fastchat.model,
        user_input=QUESTION, select_param=db_name,
    )  # fmt: skip
    [generation] = generations(app_stack.llm_proxy, mark)
    assert_schema_in(generation.body["prompt"])
    assert QUESTION in generation.body["prompt"]
