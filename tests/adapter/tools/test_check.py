"""``adapter/tools/check*.py``, run as ``fastchat-adapter check`` (through ``adapter.cli.main``):
exit codes and reports against real loopback workers, good and broken, FastChat and DB-GPT."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from fastapi import FastAPI, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapter.app import create_app as create_adapter
from adapter.cli import main
from adapter.settings import Settings
from adapter.tools.reference_worker import ReferenceWorkerConfig, create_app
from tests.support.fake_controller import FakeController
from tests.support.servers import LoopbackServer

Corruption = Callable[[bytes], bytes]


class CorruptStream:
    """Wraps a good worker and rewrites the body of ``/worker_generate_stream``."""

    def __init__(self, app: ASGIApp, corrupt: Corruption) -> None:
        self.app, self.corrupt = app, corrupt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("path") != "/worker_generate_stream":
            await self.app(scope, receive, send)
            return
        body = bytearray()

        async def collect(message: Message) -> None:
            if message["type"] == "http.response.start":
                await send(message)
                return
            body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                await send({"type": "http.response.body", "body": self.corrupt(bytes(body))})

        await self.app(scope, receive, collect)


def _frames(body: bytes) -> list[bytes]:
    return [piece for piece in body.split(b"\0") if piece]


CORRUPTIONS: dict[str, Corruption] = {
    # A FastChat generator that raised: the body ends without the final chunk.
    "no final chunk": lambda body: b"".join(f + b"\0" for f in _frames(body)[:-1]),
    # The last frame lost its NUL: DB-GPT's reader drops it.
    "no trailing NUL": lambda body: body.rstrip(b"\0"),
    # Newline-delimited instead of NUL-delimited: a silently empty answer downstream.
    "newline framing": lambda body: body.replace(b"\0", b"\n"),
    # Deltas instead of cumulative text: the text shrinks.
    "text shrinks": lambda body: b"".join(f + b"\0" for f in reversed(_frames(body))),
    # An error chunk without error_code.
    "no error_code": lambda body: body.replace(b'"error_code": 0, ', b""),
}


@pytest.fixture(scope="module")
def worker() -> Iterator[LoopbackServer]:
    config = ReferenceWorkerConfig(model_names=("ref-model", "alias"))
    with LoopbackServer(create_app(config)) as server:
        yield server


def test_check_passes_against_the_reference_worker(
    worker: LoopbackServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", worker.url, "--embeddings"]) == 0
    out = capsys.readouterr().out
    for name in ("status", "conv template", "model details", "count_token", "generate_stream"):
        assert f"PASS  {name}" in out
    assert "PASS  embeddings" in out
    assert "FAIL" not in out
    assert "models ref-model, alias" in out


def test_check_of_a_named_model_and_an_embedding_worker(
    worker: LoopbackServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", worker.url + "/", "--model", "alias"]) == 0
    assert main(["check", worker.url, "--embeddings-only"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS  generate_stream") == 1  # --embeddings-only generates nothing
    assert "PASS  embeddings" in out


def test_check_fails_for_a_model_the_worker_does_not_serve(
    worker: LoopbackServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", worker.url, "--model", "gpt-5"]) == 1
    assert "FAIL  status" in capsys.readouterr().out


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_check_fails_on_a_broken_stream(
    corruption: str, capsys: pytest.CaptureFixture[str]
) -> None:
    app = CorruptStream(create_app(ReferenceWorkerConfig()), CORRUPTIONS[corruption])
    with LoopbackServer(app) as broken:
        assert main(["check", broken.url]) == 1
    out = capsys.readouterr().out
    assert "FAIL  generate_stream" in out
    assert "PASS  generate " in out  # only the stream was broken
    assert "1 failed" in out


def test_check_of_a_dead_worker_fails_and_skips_the_rest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = LoopbackServer(create_app(ReferenceWorkerConfig()))
    server.start()
    server.stop()  # the port is now known and closed
    assert main(["check", server.url, "--timeout", "2"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  status" in out and "SKIP  generate_stream" in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "localhost:21002"]) == 2
    assert "not an http(s) URL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["check", "http://127.0.0.1:1", "--kind", "openai"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["check"])
    assert exc.value.code == 2


def test_dbgpt_check_without_a_model_to_check_exits_2(
    worker: LoopbackServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # A FastChat worker has no controller listing to discover a model from.
    assert main(["check", worker.url, "--kind", "dbgpt"]) == 2
    assert "--model" in capsys.readouterr().err


def fastchat_shaped_dbgpt_worker() -> FastAPI:
    """A DB-GPT worker endpoint that answers in shapes DB-GPT clients break on."""
    app = FastAPI()
    text = {"type": "text", "object": {"data": "Hello", "format": "text"}}

    @app.post("/api/worker/model_metadata")
    async def metadata() -> dict[str, object]:
        return {"model": "m", "context_length": 2048, "ext_metadata": None}

    @app.post("/api/worker/count_token")
    async def count_token() -> dict[str, int]:
        return {"count": 3, "error_code": 0}  # FastChat's shape, not a bare int

    @app.post("/api/worker/generate_stream")
    async def generate_stream() -> Response:
        frame = {"text": "Hello", "error_code": 0, "finish_reason": "stop", "logprobs": None}
        return Response(json.dumps(frame).encode() + b"\0")

    @app.post("/api/worker/generate")
    async def generate() -> dict[str, object]:
        return {"content": text, "error_code": 0, "finish_reason": "stop"}

    return app


def test_dbgpt_check_fails_on_shapes_dbgpt_clients_reject(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with LoopbackServer(fastchat_shaped_dbgpt_worker()) as server:
        assert main(["check", server.url, "--kind", "dbgpt", "--model", "m"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  model_metadata   ext_metadata" in out
    assert "FAIL  count_token      expected a bare integer" in out
    assert "FAIL  generate_stream  frame 1: keys <= 0.6 clients reject: ['logprobs']" in out
    assert "FAIL  generate         reply carries 'content'" in out


def test_dbgpt_check_passes_against_the_adapter(
    worker: LoopbackServer, capsys: pytest.CaptureFixture[str]
) -> None:
    embed = LoopbackServer(create_app(ReferenceWorkerConfig(model_names=("embed",))))
    with embed:
        settings = Settings(worker_address=[worker.url], embedding_worker_address=[embed.url])
        with LoopbackServer(create_adapter(settings)) as adapter:
            deadline = time.monotonic() + 5
            while httpx.get(adapter.url + "/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the adapter did not get ready"
                time.sleep(0.02)
            # Standalone: model names are discovered from the adapter's own controller API.
            assert main(["check", adapter.url, "--kind", "dbgpt", "--embeddings"]) == 0
    out = capsys.readouterr().out
    for name in ("model_metadata", "count_token", "generate_stream", "generate", "embeddings"):
        assert f"PASS  {name}" in out


def test_dbgpt_check_of_a_registered_adapter_discovers_its_models(
    worker: LoopbackServer, controller: FakeController, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's `check URL --kind dbgpt` on an adapter registered with a DB-GPT controller
    (no controller API of its own): the models come from /api/worker/models/supports."""
    settings = Settings(worker_address=[worker.url], controller_address=[controller.url])
    with LoopbackServer(create_adapter(settings)) as adapter:
        deadline = time.monotonic() + 10
        while httpx.get(adapter.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the adapter did not get ready"
            time.sleep(0.02)
        assert main(["check", adapter.url, "--kind", "dbgpt"]) == 0
    out = capsys.readouterr().out
    assert "PASS  generate_stream" in out and "FAIL" not in out


@pytest.mark.parametrize("timeout", ["-1", "0", "nan"])
def test_check_timeout_must_be_positive(timeout: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "http://127.0.0.1:1", "--timeout", timeout]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--timeout" in err, err
