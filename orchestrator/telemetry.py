"""The orchestrator's FusionObserver: fusion events as Prometheus metrics and, when tracing is on,
as OpenTelemetry spans (a span per step and per worker call, under the Fuse call's span)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer

from coolfusion.orchestrator.domain import Step
from coolfusion.orchestrator.metrics import OrchestratorMetrics
from coolfusion.orchestrator.observer import FusionObserver, Metadata
from coolfusion.orchestrator.worker_client import (
    InvalidAnswer,
    SessionLost,
    WorkerRejected,
    WorkerUnavailable,
)
from coolfusion.serving.interceptors import split_method
from coolfusion.serving.tracing import record_status, rpc_attributes, trace_headers

# Failures that are not one of WorkerFailed's subclasses, by the status their message starts with.
_REASON_BY_CODE = {"DEADLINE_EXCEEDED": "deadline"}


def drop_reason(error: Exception) -> str:
    """One of metrics.DROP_REASONS: why a worker was dropped, as a bounded label value."""
    if isinstance(error, WorkerUnavailable):
        return "unavailable"
    if isinstance(error, WorkerRejected):
        return "rejected"
    if isinstance(error, InvalidAnswer):
        return "invalid_answer"
    if isinstance(error.__cause__, SessionLost):  # lost again right after being re-opened
        return "session_lost"
    cause = error.__cause__
    # Worker-side failures keep their gRPC error; the fusion's own deadline check has none, but its
    # message starts with the status name like every WorkerFailed's ("DEADLINE_EXCEEDED: ...").
    code = cause.code().name if isinstance(cause, grpc.aio.AioRpcError) else str(error).partition(":")[0]
    return _REASON_BY_CODE.get(code, "other")


class FusionTelemetry(FusionObserver):
    """Records fusion events into OrchestratorMetrics; makes spans only when given a tracer."""

    def __init__(self, metrics: OrchestratorMetrics, tracer: Tracer | None):
        self._metrics = metrics
        self._tracer = tracer

    @contextmanager
    def fusion(self, request_id: str) -> Iterator[None]:
        with self._metrics.fusions_in_flight.track_inprogress():
            if self._tracer:  # the current span is the Fuse call's, from TracingInterceptor
                trace.get_current_span().set_attribute("coolfusion.request_id", request_id)
            yield

    def step(self, loop: str, index: int) -> AbstractContextManager[object]:
        if self._tracer is None:
            return nullcontext()
        attributes: dict[str, str | int] = {"coolfusion.loop": loop, "coolfusion.step": index}
        return self._tracer.start_as_current_span("fusion.step", attributes=attributes)

    def on_step(self, loop: str, step: Step, step_ms: float) -> None:
        self._metrics.step_seconds.labels(loop).observe(step_ms / 1000)
        phases_ms = {"generate": step.generate_ms, "overhead": max(0.0, step_ms - step.worker_compute_ms)}
        if len(step.candidates) > 1:  # one distinct candidate wins unscored
            phases_ms["score"] = step.score_ms
        for phase, ms in phases_ms.items():
            self._metrics.step_phase_seconds.labels(loop, phase).observe(ms / 1000)
        if self._tracer:
            span = trace.get_current_span()
            span.set_attribute("coolfusion.candidates", len(step.candidates))
            span.set_attribute("coolfusion.winner_worker", step.winner.proposed_by[0])
            span.set_attribute("coolfusion.worker_compute_ms", step.worker_compute_ms)

    def on_drop(self, loop: str, worker: str, error: Exception) -> None:
        reason = drop_reason(error)
        self._metrics.dropped_workers.labels(worker, reason).inc()
        if self._tracer:
            attributes = {
                "coolfusion.worker": worker,
                "coolfusion.drop_reason": reason,
                "exception.message": str(error),
            }
            trace.get_current_span().add_event("worker dropped", attributes)

    @contextmanager
    def worker_call(self, method: str, worker: str, address: str) -> Iterator[Metadata]:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        with self._client_span(method, worker, address) as span:
            try:
                yield trace_headers() if span else ()
            except grpc.aio.AioRpcError as error:
                code = error.code()
                raise
            except asyncio.CancelledError:  # the request ended (finished, failed or cancelled by its caller)
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                seconds = time.perf_counter() - started
                self._metrics.worker_call_seconds.labels(worker, split_method(method)[1], code.name).observe(seconds)
                if span:
                    record_status(span, code)

    def _client_span(self, method: str, worker: str, address: str) -> AbstractContextManager[trace.Span | None]:
        if self._tracer is None:
            return nullcontext()
        attributes = {**rpc_attributes(method), "coolfusion.worker": worker, "coolfusion.replica": address}
        # The status is the gRPC code (worker_call); the exception is the caller's to report.
        return self._tracer.start_as_current_span(
            method.lstrip("/"),
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        )
