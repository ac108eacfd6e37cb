"""Prometheus metrics of both services, each server with its own registry and HTTP endpoint.

Every metric name lives in this file, so that dashboards and alerts have one place to look.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coolfusion.serving.interceptors import CallObservingInterceptor, final_code, split_method

if TYPE_CHECKING:
    from coolfusion.worker.sessions import Load

logger = logging.getLogger(__name__)

# Worker calls take milliseconds to seconds; a whole fusion takes seconds to many minutes on CPU.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# One step is a segment of up to 16 tokens from every model plus one scoring pass.
STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Why the orchestrator drops a worker from a request: a fixed set, never the error's text.
DROP_REASONS = ("unavailable", "deadline", "invalid_answer", "rejected", "session_lost", "overloaded", "other")


class RpcMetrics:
    """The calls a server handled, by gRPC service, method and status code, and how long they took."""

    def __init__(self, registry: CollectorRegistry):
        labels = ["grpc_service", "grpc_method", "grpc_code"]
        self.handled = Counter(
            "coolfusion_grpc_server_handled", "RPCs completed, by method and status code.", labels, registry=registry
        )
        self.seconds = Histogram(
            "coolfusion_grpc_server_handling_seconds",
            "Time from the start of an RPC to its status, by method and status code.",
            labels,
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )

    def record(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        labels = (*split_method(method), code.name)
        self.handled.labels(*labels).inc()
        self.seconds.labels(*labels).observe(seconds)


class RpcMetricsInterceptor(CallObservingInterceptor):
    """Records every call into RpcMetrics. Goes first in the chain, so that the status it sees is
    the one the caller gets (refused by authentication, or mapped by ErrorMappingInterceptor)."""

    def __init__(self, metrics: RpcMetrics):
        self._metrics = metrics

    @contextmanager
    def observe(self, method: str, context: grpc.aio.ServicerContext) -> Iterator[None]:
        started = time.perf_counter()
        error = None
        try:
            yield
        except BaseException as raised:
            error = raised
            raise
        finally:
            self._metrics.record(method, final_code(context, error), time.perf_counter() - started)


class SessionLoadCollector(Collector):
    """The worker's session-cache figures, as sampled on the model thread after its last call.

    The session store is not thread-safe, so a scrape (on the HTTP server's thread) never reads
    it: `sample` runs on the model thread (ModelThread's `after_each`) and `collect` reads the copy.
    """

    def __init__(self) -> None:
        self._read_load: Callable[[], Load] | None = None
        self._load: Load | None = None

    def watch(self, read_load: Callable[[], Load]) -> None:
        """Starts sampling `read_load` (the store's `load`), once the model is attached."""
        self._read_load = read_load

    def sample(self) -> None:
        if self._read_load is not None:
            self._load = self._read_load()

    def collect(self) -> Iterator[Metric]:
        load = self._load
        yield GaugeMetricFamily(
            "coolfusion_worker_sessions", "Sessions open on this worker.", value=load.open_sessions if load else 0
        )
        yield GaugeMetricFamily(
            "coolfusion_worker_cached_tokens",
            "Tokens held in the KV caches of all sessions.",
            value=load.cached_tokens if load else 0,
        )
        evictions = CounterMetricFamily(
            "coolfusion_worker_session_evictions",
            "Sessions evicted, by cause: ttl (idle too long), token_budget (LRU, to make room), max_sessions.",
            labels=["cause"],
        )
        for cause, count in (load.evicted_by_cause if load else {}).items():
            evictions.add_metric([cause], count)
        yield evictions


class WorkerMetrics:
    """Everything a worker exports: its RPCs, its session cache and its model thread's queue."""

    def __init__(self, registry: CollectorRegistry, token_budget: int):
        self.registry = registry
        self.rpc = RpcMetrics(registry)
        self.sessions = SessionLoadCollector()
        registry.register(self.sessions)
        self._queue_depth = Gauge(
            "coolfusion_worker_model_queue_depth",
            "Model calls waiting for the model thread or running on it.",
            registry=registry,
        )
        budget = Gauge("coolfusion_worker_token_budget", "Cached tokens allowed over all sessions.", registry=registry)
        budget.set(token_budget)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Reads the queue depth at each scrape (a plain integer read, safe from any thread)."""
        self._queue_depth.set_function(depth)


class OrchestratorMetrics:
    """Everything the orchestrator exports: its RPCs, the fusion's steps, drops and worker calls."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.rpc = RpcMetrics(registry)
        self.fusions_in_flight = Gauge(
            "coolfusion_fusions_in_flight", "Fusion requests (Fuse and FuseStream) running now.", registry=registry
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


@dataclass
class MetricsEndpoint:
    """The HTTP server Prometheus scrapes: prometheus_client's own, on a daemon thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    async def stop(self) -> None:
        # shutdown() waits for the serving loop to notice (up to half a second): not on the event loop.
        await asyncio.to_thread(self.server.shutdown)
        self.server.server_close()


def start_metrics_endpoint(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Serves `registry` at http://host:port/metrics; port 0 picks a free port."""
    server, thread = start_http_server(port, addr=host.strip("[]"), registry=registry)
    endpoint = MetricsEndpoint(server, thread)
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    logger.info("metrics on http://%s:%d/metrics", shown, endpoint.port)
    return endpoint
