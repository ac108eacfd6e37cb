"""The gateway's Prometheus metrics: its HTTP requests, streams and the tokens it served."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from coolfusion.serving.metrics import LATENCY_BUCKETS_S
from coolfusion.v1 import orchestrator_pb2


class GatewayMetrics:
    """Everything the gateway exports, in its own registry."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        labels = ["route", "method", "status"]
        self.requests = Counter(
            "coolfusion_gateway_requests", "HTTP requests answered, by route, method and status.", labels,
            registry=registry,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "coolfusion_gateway_request_seconds",
            "Time from a request's arrival to the end of its answer (a stream's last byte), by route, method and status.",
            labels,
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.in_flight = Gauge(
            "coolfusion_gateway_requests_in_flight", "HTTP requests being answered now.", registry=registry
        )
        self.first_chunk_seconds = Histogram(
            "coolfusion_gateway_first_chunk_seconds",
            "Streamed completions: time from the request to the first chunk of answer text.",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.tokens = Counter(
            "coolfusion_gateway_tokens",
            "Tokens of finished completions, counted by each answer's lead worker, by kind (prompt, completion).",
            ["kind"],
            registry=registry,
        )
        self.disconnects = Counter(
            "coolfusion_gateway_client_disconnects",
            "Completions whose client went away before the answer was finished; their fusion was cancelled.",
            registry=registry,
        )

    def count_tokens(self, result: orchestrator_pb2.FuseResult) -> None:
        if result.HasField("usage"):
            self.tokens.labels("prompt").inc(result.usage.prompt_tokens)
            self.tokens.labels("completion").inc(result.usage.completion_tokens)
