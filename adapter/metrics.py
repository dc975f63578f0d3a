"""Prometheus metrics, named like vLLM's under one ``fastchat_adapter_`` prefix.

The request metrics carry vLLM's names and its ``model_name`` label
(``vllm:time_to_first_token_seconds`` is ``fastchat_adapter_time_to_first_token_seconds``, and
so on for ``e2e_request_latency_seconds``, ``num_requests_running``, ``num_requests_waiting``,
``prompt_tokens_total``, ``generation_tokens_total``, ``request_success_total`` with
``finished_reason``), so dashboards written for vLLM need only the prefix changed. Base units
(seconds); no ``_created`` series. Each process (and each test app) owns its own registry, so
two apps never collide; it also holds the standard ``process_*`` and ``python_*`` collectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar, cast

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "fastchat_adapter_"

# From cache hits (ms) to cold CPU prompts (tens of seconds) and, for whole requests, past the
# 600 s default --generate-timeout, so a request cut by that timeout lands in a real bucket.
_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1800,
)  # fmt: skip

CONTENT_TYPE = CONTENT_TYPE_LATEST
_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)

# ``*_created`` series double every counter and histogram and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


@dataclass
class Metrics:
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )
    _children: dict[tuple[int, tuple[str, ...]], object] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        r = self.registry
        # The standard process_* and python_* families, in this registry as in the default one.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)

        def gauge(name: str, doc: str, labels: list[str]) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r)

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        def histogram(name: str, doc: str, labels: list[str]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=_LATENCY_BUCKETS, registry=r)

        # --- FastChat workers (status polls) -------------------------------------------
        self.upstream_queue_length = gauge(
            "upstream_queue_length",
            "Requests running or waiting in the FastChat worker (its /worker_get_status).",
            ["worker", "model_name"],
        )
        self.upstream_speed = gauge(
            "upstream_speed",
            "Relative speed the FastChat worker reports (its /worker_get_status).",
            ["worker", "model_name"],
        )
        self.upstream_up = gauge(
            "upstream_up",
            "1 when the FastChat worker answered its last status poll, else 0.",
            ["worker"],
        )
        self.status_poll_failures = counter(
            "status_poll_failures",
            "Status polls a FastChat worker did not answer, by reason "
            "(unreachable, http_status, broken_stream, malformed, idle_timeout).",
            ["worker", "reason"],
        )
        # --- DB-GPT worker API requests (vLLM's names) ---------------------------------
        self.num_requests_running = gauge(
            "num_requests_running",
            "DB-GPT worker API requests being served, except streams still waiting for "
            "their first token (num_requests_waiting).",
            ["route", "model_name"],
        )
        self.num_requests_waiting = gauge(
            "num_requests_waiting",
            "generate_stream requests waiting for their first token (queued in the FastChat "
            "worker or in prefill).",
            ["model_name"],
        )
        self.requests = counter(
            "requests",
            "DB-GPT worker API requests by route and outcome (ok, error, client_gone, rejected).",
            ["route", "model_name", "outcome"],
        )
        self.request_success = counter(
            "request_success",
            "Generations that ended with a finish reason, by that reason (stop, length).",
            ["model_name", "finished_reason"],
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "From request arrival to the first non-empty frame relayed downstream.",
            ["model_name"],
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds",
            "From request arrival to the last byte of the response.",
            ["route", "model_name"],
        )
        self.prompt_tokens = counter(
            "prompt_tokens",
            "Prompt tokens of generations, as the FastChat worker's usage reports them.",
            ["model_name"],
        )
        self.generation_tokens = counter(
            "generation_tokens",
            "Generated tokens, as the FastChat worker's usage reports them (completion_tokens).",
            ["model_name"],
        )
        self.frames_relayed = counter(
            "frames_relayed",
            "Stream frames relayed from FastChat to DB-GPT (keep-alive frames excluded).",
            ["model_name"],
        )
        self.upstream_errors = counter(
            "upstream_errors",
            "Failures talking to FastChat workers while serving requests, by reason "
            "(unreachable, http_status, broken_stream, malformed, idle_timeout, in_band).",
            ["worker", "model_name", "reason"],
        )
        # --- DB-GPT controllers (registration) -----------------------------------------
        self.heartbeats = counter(
            "heartbeats",
            "Heartbeats sent to DB-GPT controllers, by result (ok, error, skipped_dead).",
            ["controller", "result"],
        )
        self.registration_failures = counter(
            "registration_failures",
            "Calls a DB-GPT controller did not accept, by operation (register, heartbeat, "
            "delete) and reason (unreachable, timeout, http_status, broken).",
            ["controller", "operation", "reason"],
        )
        self.registered_models = gauge(
            "registered_models",
            "Model instances currently registered (healthy) with each DB-GPT controller.",
            ["controller"],
        )
        self.controller_failovers = counter(
            "controller_failovers",
            "Switches of the active DB-GPT controller (--controller-mode failover), by the "
            "controller switched to.",
            ["controller"],
        )
        self.images_dropped = counter(
            "images_dropped",
            "Image parts of messages not sent on, because the model's worker is not known to "
            "take images (--multimodal-models).",
            ["model_name"],
        )
        self.build_info = gauge(
            "build_info",
            "Always 1; the labels carry the adapter version.",
            ["version"],
        )
        # --- hardening (issue 12): refusals and cut-offs that protect the process ----------
        self.controller_writes_refused = counter(
            "controller_writes_refused",
            "Writes to the standalone controller API refused with 403, by reason "
            "(own_entry, disabled, host, api_key).",
            ["reason"],
        )
        self.connections_timed_out = counter(
            "connections_timed_out",
            "Connections closed because the request head did not complete in time (head) or "
            "the body stopped making progress (body).",
            ["phase"],
        )
        self.streams_cut_at_shutdown = counter(
            "streams_cut_at_shutdown",
            "Streams ended with an error frame because the shutdown grace ran out.",
            [],
        )

    def child(self, metric: _Metric, *labels: str) -> _Metric:
        """``metric.labels(*labels)``, resolved once per label set: ``labels()`` validates,
        builds a tuple and takes a lock every call, a dozen times per request (py-spy, the
        fixed cost in bench/relay.py). Label sets are bounded (unknown models share one)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return cast(_Metric, found)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def exposed_names(self) -> dict[str, str]:
        """Every sample name ``/metrics`` can show -> its family's type (``X_total`` for a
        counter, ``X_bucket``/``X_sum``/``X_count`` for a histogram): what the README, the
        Grafana dashboard and the Prometheus rules may name."""
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("_sum", "_count"),
            "info": ("_info",),
        }
        return {
            family.name + suffix: family.type
            for family in self.registry.collect()
            for suffix in suffixes.get(family.type, ("",))
        }
