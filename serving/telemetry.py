"""A server's telemetry: its Prometheus endpoint and its tracing, started and stopped together."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry

from coolfusion.serving.metrics import MetricsEndpoint, RpcMetrics, RpcMetricsInterceptor, start_metrics_endpoint
from coolfusion.serving.tracing import Tracing, TracingInterceptor, TracingSettings, start_tracing


@dataclass
class ServerTelemetry:
    """A server's Prometheus endpoint (None without --metrics-port) and its tracing, which start
    and stop with the server."""

    endpoint: MetricsEndpoint | None
    tracing: Tracing

    @property
    def metrics_port(self) -> int | None:
        return self.endpoint.port if self.endpoint else None

    def interceptors(self, rpc: RpcMetrics) -> list[grpc.aio.ServerInterceptor]:
        """The observing interceptors. They go first, so that they see calls refused by
        authentication and the status ErrorMappingInterceptor gives an exception."""
        tracer = self.tracing.tracer
        return [RpcMetricsInterceptor(rpc), *([TracingInterceptor(tracer)] if tracer else [])]

    async def stop(self) -> None:
        """After draining: the last scrapes see the drain, the last spans are exported."""
        if self.endpoint:
            await self.endpoint.stop()
        await self.tracing.shutdown()


def start_telemetry(
    registry: CollectorRegistry,
    host: str,
    metrics_port: int | None,
    tracing: TracingSettings,
    service_name: str,
) -> ServerTelemetry:
    """Serves `registry` on `host:metrics_port` (when a port is given) and starts tracing (when an
    exporter is configured); `service_name` is the traces' default service.name."""
    endpoint = start_metrics_endpoint(registry, host, metrics_port) if metrics_port is not None else None
    return ServerTelemetry(endpoint, start_tracing(tracing, service_name))
