"""Per-request bookkeeping shared by every worker API route: metrics, drain, log context.

A ``Tracker`` is made when a request arrives and ``done`` once when its response has ended
(for a stream: after the last byte, or when the client left). Between the two the request
counts in ``requests_in_flight`` and in ``Runtime.inflight``. Trackers are made in one place,
``adapter/worker_api.py``'s route decorator.

Outcomes (the ``outcome`` label of ``requests``):

- ``ok``: answered as asked;
- ``rejected``: refused before any generation was sent upstream (invalid body, unknown model,
  context overflow, an unsupported operation);
- ``error``: a FastChat worker failed (or answered with its error object);
- ``client_gone``: the downstream client left before the response ended.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal

from adapter.logs import set_model

if TYPE_CHECKING:
    from adapter.runtime import Runtime

Outcome = Literal["ok", "rejected", "error", "client_gone"]

# Requests naming a model no worker serves are counted under one label, so arbitrary client
# strings cannot grow the metrics without bound.
UNKNOWN_MODEL: Final = "unknown"


def model_label(runtime: Runtime, model: object) -> str:
    """``model`` if a worker serves (or served) it, ``""`` for a request without one, else
    ``UNKNOWN_MODEL``."""
    if model is None:
        return ""
    if isinstance(model, str) and runtime.pool.knows(model):
        return model
    return UNKNOWN_MODEL


class Tracker:
    """Accounting of one request on ``route`` (``generate_stream``, ``embeddings``…).

    As a context manager (non-stream routes) it calls ``done(self.outcome)`` on exit, or
    ``done("error")`` if the block raised; set ``outcome`` inside the block."""

    def __init__(self, runtime: Runtime, route: str, model: object = None) -> None:
        self.runtime = runtime
        self.route = route
        self.model = model_label(runtime, model)
        self.outcome: Outcome = "ok"
        self.started = time.perf_counter()
        self._first_frame_seen = False
        self._done = False
        set_model(model if isinstance(model, str) else None)
        # Resolved once: ``labels()`` takes a lock and a dict lookup, too much per frame.
        self._frames = runtime.metrics.frames_relayed.labels(self.model)
        runtime.inflight.enter()
        runtime.metrics.requests_in_flight.labels(route, self.model).inc()

    def frame_relayed(self) -> None:
        """A frame of the upstream's output went downstream (keep-alives do not count)."""
        if not self._first_frame_seen:
            self._first_frame_seen = True
            elapsed = time.perf_counter() - self.started
            self.runtime.metrics.time_to_first_frame.labels(self.model).observe(elapsed)
        self._frames.inc()

    def done(self, outcome: Outcome) -> None:
        """Close the books; later calls are ignored."""
        if self._done:
            return
        self._done = True
        metrics = self.runtime.metrics
        metrics.requests_in_flight.labels(self.route, self.model).dec()
        metrics.requests.labels(self.route, self.model, outcome).inc()
        elapsed = time.perf_counter() - self.started
        metrics.request_duration.labels(self.route, self.model).observe(elapsed)
        self.runtime.inflight.leave()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.done(self.outcome if exc is None else "error")
