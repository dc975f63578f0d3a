"""``/api/worker/embeddings``: DB-GPT's bare ``[[float]]`` from FastChat's embeddings route.

- **One input per upstream call by default** (``embedding_batch_size`` 1): FastChat's BERT
  path runs the forward pass without an attention mask, so a padded batch gives different
  vectors for its shorter inputs than the same inputs sent alone (docs/protocol.md §1.7). A larger
  ``embedding_batch_size`` trades that exactness for fewer calls.
- **Bounded.** A request carries at most ``max_embedding_inputs`` inputs (more is a 413 naming
  the setting), and its calls run at most ``embedding_concurrency`` at a time (each one holds
  a worker slot while it runs; FastChat's model_worker has 5): that many tasks take the batches
  one after another, so a huge request costs neither a task nor a copy per input up front.
  Each call is routed on its own, so the calls of a big request spread over the workers by
  queue length. When the client leaves, the route cancels this work: no call starts after.
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
from typing import TYPE_CHECKING

from adapter.errors import Refused, UpstreamError
from protocol import dbgpt
from protocol.translate import embeddings_request

if TYPE_CHECKING:
    from adapter.runtime import Runtime
    from adapter.tracking import Tracker

__all__ = ["embed"]


async def embed(
    runtime: Runtime, request: dbgpt.EmbeddingsRequest, tracker: Tracker
) -> list[list[float]]:
    """The vectors of ``request.input``, in order. Raises ``Refused`` (too many inputs),
    ``NoWorker`` or ``UpstreamError``."""
    settings = runtime.settings
    if len(request.input) > settings.max_embedding_inputs:
        raise Refused(
            413,
            f"{len(request.input)} inputs exceed the limit of {settings.max_embedding_inputs} "
            "per embeddings request (setting max_embedding_inputs); send them in smaller "
            "requests",
        )
    whole = embeddings_request(request, model=request.model)
    size = settings.embedding_batch_size
    starts = range(0, len(whole.input), size)
    results: list[list[list[float]]] = [[] for _ in starts]

    async def one(start: int) -> list[list[float]]:
        batch = whole.model_copy(update={"input": whole.input[start : start + size]})
        route = await runtime.pool.resolve_first(request.model, ("text2vec", "llm"))
        try:
            return await runtime.client.embeddings(route.worker, batch)
        except UpstreamError as exc:
            labels = (exc.worker, tracker.model, exc.reason)
            runtime.metrics.upstream_errors.labels(*labels).inc()
            await runtime.pool.report_failure(exc.worker, exc)
            raise

    if len(starts) == 1:  # the common DB-GPT case: no task to spawn
        return await one(0)
    pending = iter(enumerate(starts))  # shared: each batch is taken by exactly one task

    async def take_turns() -> None:
        for index, start in pending:
            results[index] = await one(start)

    tasks = [asyncio.ensure_future(take_turns()) for _ in range(settings.embedding_concurrency)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # after a failure or a cancel, stop the calls still running
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [vector for result in results for vector in result]
