"""Discovery through a FastChat controller (``--fastchat-controller-address``).

The adapter mirrors the models a FastChat controller lists and, per request, asks that
controller's own ``/get_worker_address`` which worker to use (PROTOCOLS.md §2), so one adapter
fronts a whole FastChat fleet. A small FastChat-controller double on loopback hands out the
address of a fake worker and records what it was asked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request

from tests.adapter.helpers import (
    MODEL,
    UPSTREAM_STREAM,
    chat,
    serving,
    settings,
    stream,
    vicuna_prompt,
)
from tests.support.fake_worker import FakeWorker
from tests.support.servers import LoopbackServer


@dataclass
class FastChatController:
    """Answers like fastchat.serve.controller: list_models, aggregate status, dispatch."""

    worker_url: str
    models: list[str]
    address: str | None = None  # what /get_worker_address answers; None: the worker's URL
    asked: list[str] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/list_models")
        async def list_models() -> dict[str, Any]:
            return {"models": self.models}

        @app.post("/worker_get_status")
        async def status() -> dict[str, Any]:
            return {"model_names": sorted(self.models), "speed": 1, "queue_length": 0}

        @app.post("/get_worker_address")
        async def get_worker_address(request: Request) -> dict[str, Any]:
            model = (await request.json())["model"]
            self.asked.append(model)
            address = self.worker_url if self.address is None else self.address
            return {"address": address if model in self.models else ""}

        return app


async def test_requests_are_dispatched_by_the_fastchat_controller(
    fake_worker: Callable[..., FakeWorker], serve_app: Callable[..., LoopbackServer]
) -> None:
    worker = fake_worker()
    controller = FastChatController(worker.url, [MODEL])
    fastchat = serve_app(controller.app())
    async with serving(settings(fastchat_controller_address=fastchat.url)) as adapter:
        status, frames = await stream(adapter.client, chat("Hello"))
    assert status == 200
    assert (
        frames
        and frames[-1]["error_code"] == 0
        and frames[-1]["finish_reason"]
        in (
            "stop",
            "length",
        )
    )
    assert controller.asked == [MODEL]  # one dispatch for the one request
    sent = worker.bodies(UPSTREAM_STREAM)
    assert [body["prompt"] for body in sent] == [vicuna_prompt("Hello")]
    assert sent[0]["model"] == MODEL and sent[0]["echo"] is False


async def test_a_model_the_fastchat_controller_does_not_list_is_named_in_band(
    fake_worker: Callable[..., FakeWorker], serve_app: Callable[..., LoopbackServer]
) -> None:
    worker = fake_worker()
    controller = FastChatController(worker.url, [MODEL])
    fastchat = serve_app(controller.app())
    async with serving(settings(fastchat_controller_address=fastchat.url)) as adapter:
        status, frames = await stream(adapter.client, chat("Hello") | {"model": "nope"})
    assert status == 200 and len(frames) == 1
    assert frames[0]["error_code"] == 40301
    assert "'nope'" in frames[0]["text"] and MODEL in frames[0]["text"]
    assert controller.asked == []  # decided from the mirrored list, no dispatch needed
    assert worker.bodies(UPSTREAM_STREAM) == []


async def test_an_empty_dispatch_answer_is_no_worker(
    fake_worker: Callable[..., FakeWorker], serve_app: Callable[..., LoopbackServer]
) -> None:
    worker = fake_worker()
    controller = FastChatController(worker.url, [MODEL], address="")
    fastchat = serve_app(controller.app())
    async with serving(settings(fastchat_controller_address=fastchat.url)) as adapter:
        status, frames = await stream(adapter.client, chat("Hello"))
    assert status == 200 and len(frames) == 1
    assert frames[0]["error_code"] == 50005
    assert controller.asked == [MODEL]
    assert worker.bodies(UPSTREAM_STREAM) == []
