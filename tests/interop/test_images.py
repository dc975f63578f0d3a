"""Images in messages (issue 10 part 4), sent by DB-GPT's own client code: `RemoteLLMClient`, which
DB-GPT's webserver, AWEL flows and agents use, run under the real DB-GPT 0.8.2 venv. Its media
parts reach the adapter; a worker the adapter knows to be multimodal gets them as FastChat's
`images` parameter, any other has them dropped with a warning and a count (docs/decisions.md).
DB-GPT's apiserver itself refuses image parts ("Image message is not supported now"), so this is
the path on which DB-GPT sends images at all.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.interop.calls import metric_values
from tests.interop.peers import DRIVERS, Peers
from tests.interop.procs import run_json
from tests.interop.recording_proxy import RecordingProxy
from tests.interop.stacks import FastChatStack

IMAGE_URL = "https://example.invalid/cat.png"
PARTS = [
    {"type": "text", "object": {"data": "What is in this picture?", "format": "text"}},
    {"type": "image", "object": {"data": IMAGE_URL, "format": "url"}},
]


def _ask(peers: Peers, controller: str, model: str) -> dict[str, Any]:
    generation = {
        "model": model,
        "messages": [{"role": "human", "content": PARTS}],
        "params": {"max_new_tokens": 4},
    }
    spec = {"controller": controller, "ops": [{"op": "generate_stream", **generation}]}
    out = run_json([peers.dbgpt.python, DRIVERS / "dbgpt_client.py"], spec, timeout=90)
    [result] = out["results"]
    assert result["ok"], result
    chunks: list[dict[str, Any]] = result["value"]
    assert chunks and all(c["error_code"] == 0 for c in chunks), chunks
    return chunks[-1]


@pytest.mark.deadline(150)
@pytest.mark.parametrize("multimodal", [True, False], ids=["multimodal", "text-only"])
def test_dbgpt_clients_images_reach_a_multimodal_worker_else_are_dropped_and_counted(
    peers: Peers, fastchat_stack: FastChatStack, adapter_factory: Any, multimodal: bool
) -> None:
    model = fastchat_stack.model
    proxy = RecordingProxy(fastchat_stack.worker_url).start()
    try:
        extra = ["--multimodal-models", model] if multimodal else []
        adapter = adapter_factory(workers=[proxy.url], extra_args=extra)  # standalone
        mark = proxy.mark()
        last = _ask(peers, adapter.url, model)
        [body] = proxy.generate_bodies(mark)
        metrics = adapter.metrics_text()
    finally:
        proxy.stop()
    assert last["finish_reason"] in ("stop", "length"), last
    dropped = sum(
        v for labels, v in metric_values(metrics, "fastchat_adapter_images_dropped_total")
    )
    if multimodal:
        assert body["images"] == [IMAGE_URL]
        assert "$$<image>$$What is in this picture?" in body["prompt"]  # 0.2.36, Vicuna style
        assert dropped == 0
    else:
        assert "images" not in body and "$$<image>$$" not in body["prompt"]
        assert "What is in this picture?" in body["prompt"]
        assert dropped == 1
