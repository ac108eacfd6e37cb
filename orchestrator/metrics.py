"""The orchestrator's Prometheus metrics: its RPCs, the fusion's steps, drops and worker calls."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from coolfusion.serving.metrics import LATENCY_BUCKETS_S, RpcMetrics

# One step is a segment of up to 16 tokens from every model plus one scoring pass.
STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Why the orchestrator drops a worker from a request: a fixed set, never the error's text. A busy
# worker (RESOURCE_EXHAUSTED) is never dropped: it is waited for, or the request fails whole.
DROP_REASONS = ("unavailable", "deadline", "invalid_answer", "rejected", "session_lost", "other")


class OrchestratorMetrics:
    """Everything the orchestrator exports: its RPCs, the fusion's steps, drops and worker calls."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.rpc = RpcMetrics(registry)
        self.fusions_in_flight = Gauge(
            "coolfusion_fusions_in_flight", "Fusion requests (Fuse and FuseStream) running now.", registry=registry
        )
        self.fusions_waiting = Gauge(
            "coolfusion_fusions_waiting",
            "Fusion requests waiting for a slot (--max-running-fusions).",
            registry=registry,
        )
        self.fusions_refused = Counter(
            "coolfusion_fusions_refused",
            "Fusion requests refused with RESOURCE_EXHAUSTED before they started, by reason "
            "(queue_full: too many waiting; wait_timeout: no slot freed in time).",
            ["reason"],
            registry=registry,
        )
        self.step_seconds = Histogram(
            "coolfusion_fusion_step_seconds",
            "Wall time of one fusion step, by loop (fused, or solo with Cool+R).",
            ["loop"],
            buckets=STEP_BUCKETS_S,
            registry=registry,
        )
        self.step_phase_seconds = Histogram(
            "coolfusion_fusion_step_phase_seconds",
            "Parts of a step: generate and score (wall time of each fan-out; score only when candidates differ) "
            "and overhead (step time minus the slowest worker's reported compute).",
            ["loop", "phase"],
            buckets=STEP_BUCKETS_S,
            registry=registry,
        )
        self.dropped_workers = Counter(
            "coolfusion_fusion_dropped_workers",
            f"Workers dropped from a request, by worker and reason ({', '.join(DROP_REASONS)}).",
            ["worker", "reason"],
            registry=registry,
        )
        self.worker_call_seconds = Histogram(
            "coolfusion_worker_call_seconds",
            "RPCs from this orchestrator to workers, by worker, method and status code.",
            ["worker", "grpc_method", "grpc_code"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
