"""Prometheus metrics, named after vLLM's and TGI's conventions.

One ``fastchat_adapter_`` prefix, base units (seconds), a ``model`` label wherever a model is
involved. Each process (and each test app) owns its own registry, so two apps never collide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "fastchat_adapter_"

# Time to first frame spans cache hits (ms) to cold CPU prompts (tens of seconds).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass
class Metrics:
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        r = self.registry

        def gauge(name: str, doc: str, labels: list[str]) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r)

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        def histogram(name: str, doc: str, labels: list[str]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=_LATENCY_BUCKETS, registry=r)

        self.upstream_queue_length = gauge(
            "upstream_queue_length",
            "Requests running or waiting in the FastChat worker (its /worker_get_status).",
            ["worker", "model"],
        )
        self.upstream_speed = gauge(
            "upstream_speed",
            "Relative speed the FastChat worker reports (its /worker_get_status).",
            ["worker", "model"],
        )
        self.upstream_up = gauge(
            "upstream_up",
            "1 when the FastChat worker answered its last status poll, else 0.",
            ["worker"],
        )
        self.requests_in_flight = gauge(
            "requests_in_flight",
            "DB-GPT worker API requests being served.",
            ["route", "model"],
        )
        self.requests = counter(
            "requests",
            "DB-GPT worker API requests by route and outcome (ok, error, client_gone, rejected).",
            ["route", "model", "outcome"],
        )
        self.time_to_first_frame = histogram(
            "time_to_first_frame_seconds",
            "From request arrival to the first non-empty frame relayed downstream.",
            ["model"],
        )
        self.request_duration = histogram(
            "request_duration_seconds",
            "From request arrival to the last byte of the response.",
            ["route", "model"],
        )
        self.frames_relayed = counter(
            "frames_relayed",
            "Stream frames relayed from FastChat to DB-GPT (keep-alive frames excluded).",
            ["model"],
        )
        self.upstream_errors = counter(
            "upstream_errors",
            "Failures talking to FastChat workers, by reason "
            "(unreachable, http_status, broken_stream, malformed, idle_timeout, in_band).",
            ["worker", "model", "reason"],
        )
        self.heartbeats = counter(
            "heartbeats",
            "Heartbeats sent to DB-GPT controllers, by result (ok, error, skipped_dead).",
            ["controller", "result"],
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
            ["model"],
        )
        self.build_info = gauge(
            "build_info",
            "Always 1; the labels carry the adapter version.",
            ["version"],
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
