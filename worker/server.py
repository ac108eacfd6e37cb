"""Builds and runs the worker's gRPC server: model loading, warm-up, TTL sweeps and draining."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry

from coolfusion.serving.interceptors import ErrorMappingInterceptor
from coolfusion.serving.lifecycle import add_health_and_reflection, drain, set_serving, stop_event_on_signals
from coolfusion.serving.security import bind, security_interceptors
from coolfusion.serving.telemetry import ServerTelemetry, start_telemetry
from coolfusion.v1 import worker_pb2, worker_pb2_grpc
from coolfusion.worker import errors, loading
from coolfusion.worker.metrics import WorkerMetrics
from coolfusion.worker.model import LanguageModel, PromptSpec
from coolfusion.worker.model_thread import ModelThread
from coolfusion.worker.servicer import WorkerServicer
from coolfusion.worker.sessions import Expectation, SessionStore
from coolfusion.worker.settings import SessionLimits, WorkerSettings

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
# Candidate batches and long prompts exceed gRPC's 4 MB default only through abuse; 16 MB bounds it.
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass
class RunningWorker:
    """A started worker server."""

    server: grpc.aio.Server
    port: int
    servicer: WorkerServicer
    health: health.aio.HealthServicer
    thread: ModelThread
    settings: WorkerSettings
    metrics: WorkerMetrics
    telemetry: ServerTelemetry
    _sweeper: asyncio.Task | None = None

    @property
    def metrics_port(self) -> int | None:
        """The port serving /metrics; None without --metrics-port."""
        return self.telemetry.metrics_port

    async def attach_model(self, lm: LanguageModel) -> None:
        """Serves `lm`: warms it up, then reports SERVING."""
        store = SessionStore(lm, self.settings.limits)
        await self.thread.run(_warm_up, lm)
        self.metrics.sessions.watch(store.load)
        await self.thread.run(self.metrics.sessions.sample)  # so that the first scrape sees the store
        self.servicer.attach(lm, store)
        self._sweeper = asyncio.create_task(_sweep_idle(store, self.thread, self.settings.limits.idle_ttl_s))
        await set_serving(self.health, SERVICE_NAMES, serving=True)
        logger.info("worker ready: model %s on %s:%d", lm.model_id, self.settings.host, self.port)

    async def stop(self, grace_s: float | None = None) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        await drain(self.server, self.health, SERVICE_NAMES, self.settings.grace_s if grace_s is None else grace_s)
        self.thread.shutdown()
        await self.telemetry.stop()


async def start_worker(settings: WorkerSettings, lm: LanguageModel | None = None) -> RunningWorker:
    """Starts the server (NOT_SERVING); serves `lm` at once when given. Port 0 picks a free port."""
    metrics = WorkerMetrics(CollectorRegistry(), settings.limits.token_budget)
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
    thread = ModelThread(settings.limits.max_queued_calls, after_each=metrics.sessions.sample)
    metrics.watch_queue(lambda: thread.queued)
    servicer = WorkerServicer(thread, settings.limits, settings.dtype)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    health_servicer = add_health_and_reflection(server, SERVICE_NAMES)
    await set_serving(health_servicer, SERVICE_NAMES, serving=False)
    port = bind(server, f"{settings.host}:{settings.port}", settings.tls)
    await server.start()
    running = RunningWorker(server, port, servicer, health_servicer, thread, settings, metrics, telemetry)
    if lm is not None:
        await running.attach_model(lm)
    return running


def _warm_up(lm: LanguageModel) -> None:
    """One tiny prefill + segment, so the first real request does not pay for lazy initialisation."""
    store = SessionStore(lm, SessionLimits())
    opened = store.open("warm-up", PromptSpec(text="Hello"), "")
    store.generate(opened.session_id, Expectation(opened.context_tokens), "", 2, ())


async def _sweep_idle(store: SessionStore, thread: ModelThread, ttl_s: float) -> None:
    while True:
        await asyncio.sleep(max(1.0, min(ttl_s / 4, 30.0)))
        with contextlib.suppress(errors.OverCapacity):
            evicted = await thread.run(store.evict_idle)
            if evicted:
                logger.info("evicted %d idle sessions", evicted)


def load_language_model(settings: WorkerSettings) -> LanguageModel:
    """Resolves the preset or path (converting GGUF once) and loads it."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    folder = loading.resolve_model_folder(preset=settings.preset, model=settings.model, cache_dir=settings.cache_dir)
    model, tokenizer = loading.load_model(folder, device=settings.device, dtype=settings.dtype)
    return LanguageModel(model, tokenizer, model_id=settings.preset or folder.name)


async def serve(settings: WorkerSettings) -> None:
    """The worker process: listen at once, load the model, serve until SIGTERM, drain."""
    stop = stop_event_on_signals()
    running = await start_worker(settings)
    logger.info("listening on %s:%d; loading model", settings.host, running.port)
    lm = await asyncio.get_running_loop().run_in_executor(None, load_language_model, settings)
    await running.attach_model(lm)
    await stop.wait()
    await running.stop()
