"""Per-request bookkeeping shared by every worker API route: metrics, drain, log context.

A ``Tracker`` is made when a request arrives and ``done`` once when its response has ended
(for a stream: after the last byte, or when the client left). Between the two the request
counts in ``Runtime.inflight`` and in ``num_requests_running``, or, for a stream that has not
relayed its first token yet, in ``num_requests_waiting``. Every generation output goes through
``observe``: its ``usage`` becomes the token counters and its finish reason
``request_success_total`` when the request is done, and the outcome and error code end up on
the request's access log line. Trackers are made in one place, ``adapter/worker_api.py``'s
route decorator.

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

from prometheus_client import Gauge

from adapter.logs import current_request, set_model

if TYPE_CHECKING:
    from adapter.runtime import Runtime
    from protocol.dbgpt import ModelOutput

Outcome = Literal["ok", "rejected", "error", "client_gone"]

# Requests naming a model no worker serves are counted under one label, so arbitrary client
# strings cannot grow the metrics without bound.
UNKNOWN_MODEL: Final = "unknown"

FRAMES_PER_INC: Final = 32
"""Frames relayed between two increments of ``frames_relayed`` (and at the end of a request)."""


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

    def __init__(
        self, runtime: Runtime, route: str, model: object = None, *, streams: bool = False
    ) -> None:
        self.runtime = runtime
        self.route = route
        self.model = model_label(runtime, model)
        self.outcome: Outcome = "ok"
        self.error_code = 0  # of the last error output observed
        self.started = time.perf_counter()
        self._first_frame_seen = False
        self._waiting = streams  # a stream waits for its first token, then runs
        self._tokens: tuple[int, int] | None = None  # prompt, completion: the newest usage
        self._finish_reason: str | None = None
        self._done = False
        set_model(model if isinstance(model, str) else None)
        self._context = current_request()
        metrics = runtime.metrics
        self._frames = metrics.child(metrics.frames_relayed, self.model)
        self._unsent_frames = 0  # relayed, not yet added to _frames
        runtime.inflight.enter()
        self._gauge().inc()

    def _gauge(self) -> Gauge:
        metrics = self.runtime.metrics
        if self._waiting:
            return metrics.child(metrics.num_requests_waiting, self.model)
        return metrics.child(metrics.num_requests_running, self.route, self.model)

    def frame_relayed(self, count: int = 1) -> None:
        """``count`` frames of the upstream's output went downstream (keep-alives and error
        frames do not count); negative for frames counted before that were superseded while
        kept for a slow client (``Downstream.write``), never sent."""
        if count > 0 and not self._first_frame_seen:
            self._first_frame_seen = True
            elapsed = time.perf_counter() - self.started
            metrics = self.runtime.metrics
            metrics.child(metrics.time_to_first_token, self.model).observe(elapsed)
            if self._waiting:
                self._gauge().dec()
                self._waiting = False
                self._gauge().inc()
        # Counted in batches: a counter's inc takes its lock, and the relay calls this for
        # nearly every upstream read. A scrape may miss an open stream's last few frames.
        self._unsent_frames += count
        if self._unsent_frames >= FRAMES_PER_INC:
            self._frames.inc(self._unsent_frames)
            self._unsent_frames = 0

    def observe(self, output: ModelOutput) -> None:
        """A generation output on its way downstream: keep its usage (cumulative; the last
        frame may lack it), finish reason and error code."""
        if output.usage is not None:
            self._tokens = output.usage.prompt_tokens, output.usage.completion_tokens
        if output.finish_reason:
            self._finish_reason = output.finish_reason
        if output.error_code:
            self.error_code = output.error_code

    def observe_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The usage of a frame relayed without a ``ModelOutput`` (``observe`` for the rest)."""
        self._tokens = prompt_tokens, completion_tokens

    def done(self, outcome: Outcome) -> None:
        """Close the books; later calls are ignored."""
        if self._done:
            return
        self._done = True
        metrics = self.runtime.metrics
        if self._unsent_frames > 0:
            self._frames.inc(self._unsent_frames)
            self._unsent_frames = 0
        self._gauge().dec()
        metrics.child(metrics.requests, self.route, self.model, outcome).inc()
        elapsed = time.perf_counter() - self.started
        metrics.child(metrics.e2e_request_latency, self.route, self.model).observe(elapsed)
        if self._tokens is not None:  # tokens were spent even if the client left
            prompt_tokens, completion_tokens = self._tokens
            metrics.child(metrics.prompt_tokens, self.model).inc(prompt_tokens)
            metrics.child(metrics.generation_tokens, self.model).inc(completion_tokens)
        if self._finish_reason and outcome == "ok":
            success = metrics.child(metrics.request_success, self.model, self._finish_reason)
            success.inc()
        if self._context is not None:  # for the access log line
            self._context.outcome = outcome
            self._context.error_code = self.error_code or None
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
