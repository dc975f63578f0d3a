"""``adapter/logs.py``: one handler and format for every logger (ours and uvicorn's), JSON or
text lines, request ids, and the access log without the probes, on the real app in-process."""

from __future__ import annotations

import io
import logging
import re

from adapter.app import create_app
from adapter.logs import setup_logging
from tests.adapter.helpers import eventually, in_process, log_lines, settings_for, status_is
from tests.support.servers import LoopbackServer

PROBES = ("/livez", "/readyz", "/metrics")


async def test_json_log_lines_parse_and_probes_stay_out_of_the_access_log(
    ref_worker: LoopbackServer, json_log: io.StringIO
) -> None:
    app = create_app(settings_for(ref_worker.url, status_interval=0.05))
    async with in_process(app) as client:
        await eventually(lambda: status_is(client, "/readyz", 200), what="ready")
        for path in PROBES:
            assert (await client.get(path)).status_code == 200
        reply = await client.get("/api/controller/models", headers={"x-request-id": "req-42"})
        assert reply.headers["x-request-id"] == "req-42"
        traced = {"db-gpt-trace-span-id": "trace1:span1"}
        await client.get("/api/controller/models", headers=traced)
        generated = (await client.get("/api/controller/models")).headers["x-request-id"]

    lines = log_lines(json_log)  # every line is one JSON object
    assert lines, "nothing was logged"
    for line in lines:
        assert {"ts", "level", "logger", "message", "request_id", "model"} <= set(line)
    access = [line for line in lines if line["logger"] == "fastchat_adapter.access"]
    assert [line["path"] for line in access] == ["/api/controller/models"] * 3
    assert [line["request_id"] for line in access] == ["req-42", "trace1:span1", generated]
    first = access[0]
    assert first["method"] == "GET" and first["status"] == 200
    assert isinstance(first["duration_ms"], float)
    assert first["message"].startswith("GET /api/controller/models 200 ")
    assert any(line["logger"] == "fastchat_adapter.pool" for line in lines)


def test_uvicorn_logs_go_through_our_handler(json_log: io.StringIO) -> None:
    stray = logging.StreamHandler(io.StringIO())
    logging.getLogger("uvicorn.error").addHandler(stray)  # as uvicorn's own log config does
    setup_logging("json", "info", json_log)
    assert stray not in logging.getLogger("uvicorn.error").handlers
    logging.getLogger("uvicorn.error").info("Uvicorn running", extra={"color_message": "ansi"})
    [line] = log_lines(json_log)
    assert line["logger"] == "uvicorn.error" and line["message"] == "Uvicorn running"
    assert "color_message" not in line
    logging.getLogger("httpx").info("HTTP Request: POST ...")  # status polls: too chatty
    assert len(log_lines(json_log)) == 1


def test_text_log_format_is_one_plain_line(json_log: io.StringIO) -> None:
    stream = io.StringIO()
    setup_logging("text", "info", stream)  # replaces the JSON handler of the fixture
    logging.getLogger("fastchat_adapter.test").info("hello %s", "there", extra={"k": 1})
    line = stream.getvalue()
    assert line.count("\n") == 1
    assert "INFO fastchat_adapter.test hello there k=1" in line
    assert json_log.getvalue() == ""


async def test_access_line_of_an_in_band_failure_says_outcome_and_error_code(
    ref_worker: LoopbackServer, json_log: io.StringIO
) -> None:
    """HTTP 200 with an error frame: the access line must not look like a success."""
    app = create_app(settings_for(ref_worker.url, status_interval=0.05))
    chat = {"messages": [{"role": "human", "content": "Hi"}], "max_new_tokens": 4}
    async with in_process(app) as client:
        await eventually(lambda: status_is(client, "/readyz", 200), what="ready")
        for model in ("nope", "ref"):
            reply = await client.post("/api/worker/generate_stream", json={**chat, "model": model})
            assert reply.status_code == 200
        text = io.StringIO()
        setup_logging("text", "info", text)
        await client.post("/api/worker/generate", json={**chat, "model": "nope"})

    failed, ok = [
        line for line in log_lines(json_log) if line["logger"] == "fastchat_adapter.access"
    ]
    assert (failed["status"], failed["outcome"], failed["error_code"]) == (200, "rejected", 40301)
    assert failed["message"].endswith(" outcome=rejected error_code=40301"), failed["message"]
    assert (ok["status"], ok["outcome"], ok["error_code"]) == (200, "ok", None)
    assert ok["message"].endswith(" outcome=ok"), ok["message"]
    [line] = [line for line in text.getvalue().splitlines() if "fastchat_adapter.access" in line]
    assert " POST /api/worker/generate 200 " in line
    assert line.endswith(" outcome=rejected error_code=40301"), line


# --- log forging (issue 12, item 8) ---------------------------------------------------------

FORGED = "2026-12-07 12:00:00,000 ERROR fastchat_adapter.pool forged"
LINE_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


async def test_text_log_lines_cannot_be_forged_by_client_values(
    ref_worker: LoopbackServer, json_log: io.StringIO
) -> None:
    stream = io.StringIO()
    setup_logging("text", "info", stream)
    app = create_app(settings_for(ref_worker.url, status_interval=0.05))
    async with in_process(app) as client:
        await client.post("/api/worker/generate", json={"model": f"m\n{FORGED}", "prompt": "x"})
        await client.get(f"/api/worker/x%0d%0a{FORGED.replace(' ', '%20')}")
        rid = {"x-request-id": b"r\x7f\x1b[2J\x85"}  # terminal escapes, DEL, NEL
        await client.get("/api/worker/parameter/descriptions", headers=rid)
    lines = stream.getvalue().splitlines()
    assert lines and all(LINE_START.match(line) for line in lines), lines
    forged = [line for line in lines if FORGED in line]
    assert len(forged) >= 2 and all("\\x0a" in line for line in forged), forged
    assert any("r\\x7f\\x1b[2J\\x85" in line for line in lines), lines
