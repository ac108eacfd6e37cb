"""Prometheus plumbing shared by both servers: RPC metrics, and the HTTP endpoint Prometheus scrapes.

Each service names its own metrics beside its code (worker/metrics.py, orchestrator/metrics.py);
every server has its own registry.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from coolfusion.serving.interceptors import CallObservingInterceptor, final_code, split_method

logger = logging.getLogger(__name__)

# Worker calls take milliseconds to seconds; a whole fusion takes seconds to many minutes on CPU.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


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
