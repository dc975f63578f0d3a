"""``/api/worker/embeddings``: DB-GPT's bare ``[[float]]`` from FastChat's embeddings route.

- **One input per upstream call by default** (``embedding_batch_size`` 1): FastChat's BERT
  path runs the forward pass without an attention mask, so a padded batch gives different
  vectors for its shorter inputs than the same inputs sent alone (docs/protocol.md §1.7). A larger
  ``embedding_batch_size`` trades that exactness for fewer calls.
- **Concurrently, bounded.** The calls of one request run at most ``CONCURRENCY`` at a time
  (each one holds a worker slot while it runs; FastChat's model_worker has 5). Each call is
  routed on its own, so the calls of a big request spread over the workers by queue length.
- **Input order** is kept: vector *i* answers input *i*, whatever order the calls finish in.
  The first failing call cancels the others and fails the request.
- **Which workers.** Embedding workers (``--embedding-worker-address``, registered as
  ``name@text2vec``) first; a name only an LLM worker serves falls back to that worker, which
  is what FastChat's own API server does (model_worker answers with the LLM's mean hidden
  state; vLLM-type workers have no embeddings route and answer 404, reported as such).
- **Rerank** is refused by the route before this module is reached: FastChat has none.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from adapter.errors import UpstreamError
from protocol import dbgpt, fastchat
from protocol.translate import embeddings_request

if TYPE_CHECKING:
    from adapter.runtime import Runtime
    from adapter.tracking import Tracker

__all__ = ["CONCURRENCY", "embed"]

CONCURRENCY: Final = 4
"""Upstream calls one embeddings request may have running at once."""


async def embed(
    runtime: Runtime, request: dbgpt.EmbeddingsRequest, tracker: Tracker
) -> list[list[float]]:
    """The vectors of ``request.input``, in order. Raises ``NoWorker`` or ``UpstreamError``."""
    whole = embeddings_request(request, model=request.model)
    size = runtime.settings.embedding_batch_size
    batches = [
        whole.model_copy(update={"input": whole.input[start : start + size]})
        for start in range(0, len(whole.input), size)
    ]
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(batch: fastchat.EmbeddingsRequest) -> list[list[float]]:
        async with limit:
            route = await runtime.pool.resolve_first(request.model, ("text2vec", "llm"))
            try:
                return await runtime.client.embeddings(route.worker, batch)
            except UpstreamError as exc:
                labels = (exc.worker, tracker.model, exc.reason)
                runtime.metrics.upstream_errors.labels(*labels).inc()
                await runtime.pool.report_failure(exc.worker, exc)
                raise

    if len(batches) == 1:  # the common DB-GPT case: no task to spawn
        return await one(batches[0])
    tasks = [asyncio.ensure_future(one(batch)) for batch in batches]
    try:
        results = await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # after a failure, stop the calls still queued or running
            task.cancel()
    return [vector for result in results for vector in result]
