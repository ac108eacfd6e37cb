"""Builds and runs the orchestrator's gRPC server."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry

from coolfusion.orchestrator.admission import Admission, Overloaded
from coolfusion.orchestrator.calibrations import CalibrationRefused, CalibrationUncheckable
from coolfusion.orchestrator.metrics import OrchestratorMetrics
from coolfusion.orchestrator.registry import WorkerPool
from coolfusion.orchestrator.servicer import InvalidFusionRequest, OrchestratorServicer, RequestTimedOut
from coolfusion.orchestrator.sessions import NoWorkersLeft, RejectedByAllWorkers, WorkersOverloaded
from coolfusion.orchestrator.settings import OrchestratorSettings
from coolfusion.orchestrator.structured import InvalidStructure
from coolfusion.orchestrator.telemetry import FusionTelemetry
from coolfusion.serving.interceptors import ErrorMappingInterceptor
from coolfusion.serving.lifecycle import add_health_and_reflection, drain, set_serving, stop_event_on_signals
from coolfusion.serving.security import bind, security_interceptors
from coolfusion.serving.telemetry import ServerTelemetry, start_telemetry
from coolfusion.v1 import orchestrator_pb2, orchestrator_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAMES = [orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name]
STATUS_CODES = {  # first match wins: the subclass comes before its base
    InvalidFusionRequest: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidStructure: grpc.StatusCode.INVALID_ARGUMENT,
    CalibrationRefused: grpc.StatusCode.INVALID_ARGUMENT,
    CalibrationUncheckable: grpc.StatusCode.UNAVAILABLE,
    RejectedByAllWorkers: grpc.StatusCode.INVALID_ARGUMENT,
    NoWorkersLeft: grpc.StatusCode.UNAVAILABLE,
    RequestTimedOut: grpc.StatusCode.DEADLINE_EXCEEDED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    WorkersOverloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@dataclass
class RunningOrchestrator:
    server: grpc.aio.Server
    port: int
    pool: WorkerPool
    health: health.aio.HealthServicer
    settings: OrchestratorSettings
    metrics: OrchestratorMetrics
    telemetry: ServerTelemetry

    @property
    def metrics_port(self) -> int | None:
        """The port serving /metrics; None without --metrics-port."""
        return self.telemetry.metrics_port

    async def stop(self, grace_s: float | None = None) -> None:
        await drain(self.server, self.health, SERVICE_NAMES, self.settings.grace_s if grace_s is None else grace_s)
        await self.pool.close()
        await self.telemetry.stop()


async def start_orchestrator(settings: OrchestratorSettings) -> RunningOrchestrator:
    """Starts a SERVING orchestrator; port 0 picks a free port."""
    metrics = OrchestratorMetrics(CollectorRegistry())
    telemetry = start_telemetry(
        metrics.registry, settings.host, settings.metrics_port, settings.tracing, "coolfusion-orchestrator"
    )
    server = grpc.aio.server(
        interceptors=[
            *telemetry.interceptors(metrics.rpc),
            *security_interceptors(settings.auth_tokens),
            ErrorMappingInterceptor(STATUS_CODES),
        ],
        # No grace limit: a connection past its age takes no new calls, and those in flight finish.
        options=[("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000))],
    )
    pool = WorkerPool(settings.workers)
    admission = Admission(settings.admission, on_refused=lambda reason: metrics.fusions_refused.labels(reason).inc())
    metrics.fusions_waiting.set_function(lambda: admission.waiting)
    servicer = OrchestratorServicer(pool, settings, admission, FusionTelemetry(metrics, telemetry.tracing.tracer))
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, server)
    health_servicer = add_health_and_reflection(server, SERVICE_NAMES)
    port = bind(server, f"{settings.host}:{settings.port}", settings.tls)
    await server.start()
    await set_serving(health_servicer, SERVICE_NAMES, serving=True)
    logger.info("orchestrator ready on %s:%d with workers %s", settings.host, port, [e.name for e in settings.workers])
    return RunningOrchestrator(server, port, pool, health_servicer, settings, metrics, telemetry)


async def serve(settings: OrchestratorSettings) -> None:
    """The orchestrator process: serve until SIGTERM, then drain."""
    stop = stop_event_on_signals()
    running = await start_orchestrator(settings)
    await stop.wait()
    await running.stop()
