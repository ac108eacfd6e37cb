"""Builds and runs the worker's gRPC server: model loading, warm-up, TTL sweeps and draining."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

import grpc
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry

from coolfusion.serving.interceptors import ErrorMappingInterceptor
from coolfusion.serving.lifecycle import add_health_and_reflection, drain, set_serving, stop_event_on_signals
from coolfusion.serving.security import bind, security_interceptors
from coolfusion.serving.telemetry import ServerTelemetry, start_telemetry
from coolfusion.v1 import worker_pb2, worker_pb2_grpc
from coolfusion.worker import errors
from coolfusion.worker.backend import ModelBackend, PromptSpec, load_backend
from coolfusion.worker.metrics import WorkerMetrics
from coolfusion.worker.servicer import WorkerServicer
from coolfusion.worker.sessions import Expectation, SessionStore
from coolfusion.worker.settings import FALLBACK_TOKEN_BUDGET, SessionLimits, WorkerSettings

logger = logging.getLogger(__name__)

SERVICE_NAMES = [worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name]
STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.SessionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.SessionConflict: grpc.StatusCode.ALREADY_EXISTS,
    errors.StaleContext: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OverCapacity: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
}
# WorkerLimits.session_token_budget is a uint32.
_UINT32_MAX = 2**32 - 1
# Candidate batches and long prompts exceed gRPC's 4 MB default only through abuse; 16 MB bounds it.
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass
class RunningWorker:
    """A started worker server."""

    server: grpc.aio.Server
    port: int
    servicer: WorkerServicer
    health: health.aio.HealthServicer
    settings: WorkerSettings
    metrics: WorkerMetrics
    telemetry: ServerTelemetry
    backend: ModelBackend | None = None
    store: SessionStore | None = None
    _sweeper: asyncio.Task | None = None

    @property
    def metrics_port(self) -> int | None:
        """The port serving /metrics; None without --metrics-port."""
        return self.telemetry.metrics_port

    async def attach_model(self, backend: ModelBackend) -> None:
        """Serves `backend`: warms it up, then reports SERVING."""
        self.backend = backend  # from here on, stop() shuts it down, also if serving it fails
        await _warm_up(backend)
        budget = _token_budget(backend, self.settings.limits)
        limits = replace(self.settings.limits, token_budget=budget)
        self.metrics.set_token_budget(budget)
        self.store = store = SessionStore(backend, limits, on_change=self.metrics.sessions.sample)
        self.metrics.sessions.watch(store.load)
        self.metrics.sessions.sample()  # so that the first scrape sees the store
        self.metrics.watch_queue(lambda: backend.queue_depth)
        self.metrics.grammar_compiles.read = lambda: backend.grammar_compiles
        backend.observe_passes(self.metrics.observe_pass)
        self.servicer.attach(backend, store)
        self._sweeper = asyncio.create_task(_sweep_idle(store, self.settings.limits.idle_ttl_s))
        await set_serving(self.health, SERVICE_NAMES, serving=True)
        logger.info("worker ready: model %s on %s:%d", backend.description.model_id, self.settings.host, self.port)

    async def stop(self, grace_s: float | None = None) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        await drain(self.server, self.health, SERVICE_NAMES, self.settings.grace_s if grace_s is None else grace_s)
        if self.backend is not None:
            await asyncio.to_thread(self.backend.shutdown)  # waits for the pass in progress
        await self.telemetry.stop()


async def start_worker(settings: WorkerSettings, backend: ModelBackend | None = None) -> RunningWorker:
    """Starts the server (NOT_SERVING); serves `backend` at once when given. Port 0 picks a free port."""
    metrics = WorkerMetrics(CollectorRegistry())
    telemetry = start_telemetry(
        metrics.registry, settings.host, settings.metrics_port, settings.tracing, "coolfusion-worker"
    )
    server = grpc.aio.server(
        interceptors=[
            *telemetry.interceptors(metrics.rpc),
            *security_interceptors(settings.auth_tokens),
            ErrorMappingInterceptor(STATUS_CODES),
        ],
        options=[
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ],
    )
    servicer = WorkerServicer(settings.limits)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    health_servicer = add_health_and_reflection(server, SERVICE_NAMES)
    await set_serving(health_servicer, SERVICE_NAMES, serving=False)
    port = bind(server, f"{settings.host}:{settings.port}", settings.tls)
    await server.start()
    running = RunningWorker(server, port, servicer, health_servicer, settings, metrics, telemetry)
    if backend is not None:
        try:
            await running.attach_model(backend)
        except BaseException:
            await running.stop(0)
            raise
    return running


async def _warm_up(backend: ModelBackend) -> None:
    """One tiny prefill + segment, so the first real request does not pay for lazy initialisation."""
    store = SessionStore(backend, SessionLimits())
    opened = await store.open("warm-up", PromptSpec(text="Hello"), "")
    await store.generate(opened.session_id, Expectation(opened.context_tokens), "", 2, ())


def _token_budget(backend: ModelBackend, limits: SessionLimits) -> int:
    """--token-budget; else what the memory left free after loading and warm-up holds, never more
    than `max_sessions` full contexts (or the protocol's uint32); else a fixed fallback."""
    if limits.token_budget is not None:
        logger.info("session token budget: %s tokens (--token-budget)", f"{limits.token_budget:,}")
        return limits.token_budget
    sized = backend.token_budget(limits.memory_headroom)
    if sized is None:
        logger.info(
            "session token budget: %s tokens (the engine cannot tell its free memory)", f"{FALLBACK_TOKEN_BUDGET:,}"
        )
        return FALLBACK_TOKEN_BUDGET
    cap = min(limits.max_sessions * backend.description.max_context_tokens, _UINT32_MAX)
    if sized > cap:
        logger.info(
            "session token budget: %s tokens, %d sessions of %s tokens (memory holds more)",
            f"{cap:,}",
            limits.max_sessions,
            f"{backend.description.max_context_tokens:,}",
        )
    return min(sized, cap)


async def _sweep_idle(store: SessionStore, ttl_s: float) -> None:
    while True:
        await asyncio.sleep(max(1.0, min(ttl_s / 4, 30.0)))
        if evicted := store.evict_idle():
            logger.info("evicted %d idle sessions", evicted)


async def serve(settings: WorkerSettings) -> None:
    """The worker process: listen at once, load the model, serve until SIGTERM, drain."""
    stop = stop_event_on_signals()
    running = await start_worker(settings)
    logger.info("listening on %s:%d; loading model", settings.host, running.port)
    try:
        backend = await asyncio.to_thread(load_backend, settings)
        await running.attach_model(backend)
    except BaseException:
        await running.stop(0)  # settings it cannot serve: close the server before the error ends the process
        raise
    await stop.wait()
    await running.stop()
