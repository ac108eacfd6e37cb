"""OpenTelemetry tracing, off unless an exporter is named in the standard OTEL_* variables.

With tracing off the SDK is never imported and servers hold no tracer: code that would make a
span checks for one first, so the cost is an attribute test, not even a no-op span.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from coolfusion.serving.interceptors import CallObservingInterceptor, final_code, split_method

logger = logging.getLogger(__name__)

EXPORTERS = ("otlp", "console")
# W3C Trace Context (the `traceparent` header), carried in gRPC metadata between the services.
_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True)
class TracingSettings:
    """Where spans go; built once in __main__ from the standard OpenTelemetry variables."""

    exporters: tuple[str, ...] = ()  # OTEL_TRACES_EXPORTER: otlp and/or console; empty ("none"): off
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT, OTLP over gRPC
    # (http://collector:4317); None: the exporter's own default, http://localhost:4317.
    otlp_endpoint: str | None = None
    service_name: str | None = None  # OTEL_SERVICE_NAME; None: the program's name

    @property
    def enabled(self) -> bool:
        return bool(self.exporters)


def tracing_from_environment(environ: Mapping[str, str]) -> TracingSettings:
    """Reads the OTEL_* variables; ValueError names the one that cannot be honoured.

    Unlike the OpenTelemetry default (otlp), an unset OTEL_TRACES_EXPORTER means no tracing: a
    server should not send spans to a collector nobody asked for.
    """
    requested = [name.strip() for name in environ.get("OTEL_TRACES_EXPORTER", "none").split(",")]
    exporters = tuple(dict.fromkeys(name for name in requested if name not in ("", "none")))
    if unknown := [name for name in exporters if name not in EXPORTERS]:
        raise ValueError(f"OTEL_TRACES_EXPORTER names {', '.join(unknown)}; supported: otlp, console, none")
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if "otlp" in exporters and protocol not in (None, "grpc"):
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL is {protocol}; only grpc is supported")
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return TracingSettings(exporters, endpoint or None, environ.get("OTEL_SERVICE_NAME") or None)


@dataclass
class Tracing:
    """A server's tracer (None when tracing is off) and the provider to flush when it stops."""

    tracer: Tracer | None = None
    provider: Any = None  # opentelemetry.sdk.trace.TracerProvider, imported only when tracing is on

    async def shutdown(self) -> None:
        """Exports the spans still buffered (it may wait for a slow collector: off the event loop)."""
        if self.provider is not None:
            await asyncio.to_thread(self.provider.shutdown)


def start_tracing(settings: TracingSettings, default_service_name: str) -> Tracing:
    """A tracer of its own for one server, exporting in batches from a background thread."""
    if not settings.enabled:
        return Tracing()
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service_name = settings.service_name or default_service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    for name in settings.exporters:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, settings.otlp_endpoint)))
    endpoint = settings.otlp_endpoint or "http://localhost:4317"
    targets = [f"otlp {endpoint}" if name == "otlp" else "console (stdout)" for name in settings.exporters]
    logger.info("tracing as %s to %s", service_name, ", ".join(targets))
    return Tracing(provider.get_tracer("coolfusion"), provider)


def _exporter(name: str, otlp_endpoint: str | None):
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stdout)  # stdout as it is now, not when the SDK was imported
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # The remaining OTEL_EXPORTER_OTLP_* variables (headers, certificate, timeout) are the
    # exporter's own; it reads them here, at start-up.
    return OTLPSpanExporter(endpoint=otlp_endpoint)


def trace_headers() -> tuple[tuple[str, str], ...]:
    """The current span's W3C `traceparent` (and `tracestate`) as gRPC metadata for an outgoing call."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return tuple(carrier.items())


@contextmanager
def continue_trace(
    tracer: Tracer | None, carrier: Mapping[str, str], name: str, attributes: dict[str, str]
) -> Iterator[Span | None]:
    """Runs its body in the caller's trace, named by the W3C `traceparent` in `carrier` (request
    headers, lower-case): inside a SERVER span of our own when tracing is on; otherwise with the
    caller's span as the current one, so that outgoing calls still carry its `traceparent`."""
    parent = _PROPAGATOR.extract(carrier)
    if tracer is None:
        token = otel_context.attach(parent)
        try:
            yield None
        finally:
            otel_context.detach(token)
        return
    with tracer.start_as_current_span(
        name, context=parent, kind=SpanKind.SERVER, attributes=attributes, record_exception=False
    ) as span:
        yield span


def record_status(span: Span, code: grpc.StatusCode) -> None:
    """The gRPC status on a span, in OpenTelemetry's RPC conventions."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))


def rpc_attributes(method: str) -> dict[str, str]:
    service, name = split_method(method)
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


class TracingInterceptor(CallObservingInterceptor):
    """A SERVER span per call, the child of the caller's span when its metadata carries `traceparent`."""

    def __init__(self, tracer: Tracer):
        self._tracer = tracer

    @contextmanager
    def observe(self, method: str, context: grpc.aio.ServicerContext) -> Iterator[Span]:
        parent = _PROPAGATOR.extract(dict(context.invocation_metadata() or ()))
        error = None
        with self._tracer.start_as_current_span(
            method.lstrip("/"),
            context=parent,
            kind=SpanKind.SERVER,
            attributes=rpc_attributes(method),
            # The status comes from the gRPC code below; an AbortError is how a handler answers,
            # not an exception worth recording.
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as raised:
                error = raised
                raise
            finally:
                record_status(span, final_code(context, error))
