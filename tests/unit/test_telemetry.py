"""Telemetry without servers: OTEL_* variables read once at start-up, --metrics-port, tracing that
costs nothing (the SDK is never even imported) unless an exporter is named, and the bounded set
of reasons a dropped worker is counted under."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import grpc
import pytest

from coolfusion.orchestrator.__main__ import parse_settings as orchestrator_settings
from coolfusion.orchestrator.metrics import DROP_REASONS
from coolfusion.orchestrator.telemetry import drop_reason
from coolfusion.orchestrator.worker_client import (
    InvalidAnswer,
    SessionLost,
    WorkerFailed,
    WorkerRejected,
    WorkerUnavailable,
)
from coolfusion.serving.tracing import TracingSettings, start_tracing, tracing_from_environment
from coolfusion.worker.__main__ import parse_settings as worker_settings


def test_tracing_is_off_unless_an_exporter_is_named():
    assert not tracing_from_environment({}).enabled
    assert not tracing_from_environment({"OTEL_TRACES_EXPORTER": "none"}).enabled
    assert start_tracing(TracingSettings(), "svc").tracer is None


def test_otel_variables_become_settings():
    settings = tracing_from_environment(
        {
            "OTEL_TRACES_EXPORTER": "otlp,console",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
            "OTEL_SERVICE_NAME": "fusion-eu",
        }
    )
    assert settings == TracingSettings(("otlp", "console"), "http://collector:4317", "fusion-eu")
    specific = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317"}
    specific["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = "http://b:4317"
    assert tracing_from_environment(specific).otlp_endpoint == "http://b:4317"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "zipkin"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "only grpc"),
    ],
)
def test_unsupported_otel_settings_are_refused(environ, message):
    with pytest.raises(ValueError, match=message):
        tracing_from_environment(environ)


def test_both_commands_take_metrics_port_and_otel_variables(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("COOLFUSION_WORKERS", "bpe=127.0.0.1:50051")
    worker = worker_settings(["--model", "m", "--metrics-port", "9090"])
    orchestrator = orchestrator_settings(["--metrics-port", "0"])
    assert (worker.metrics_port, orchestrator.metrics_port) == (9090, 0)
    assert worker.tracing.exporters == orchestrator.tracing.exporters == ("console",)
    assert worker_settings(["--model", "m"]).metrics_port is None  # off by default


def test_a_bad_otel_variable_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jaeger")
    with pytest.raises(SystemExit):
        worker_settings(["--model", "m"])
    assert "OTEL_TRACES_EXPORTER" in capsys.readouterr().err


def test_console_exporter_writes_the_spans(capsys):
    tracing = start_tracing(TracingSettings(("console",)), "coolfusion-test")
    with tracing.tracer.start_as_current_span("fusion.step"):
        pass
    tracing.provider.shutdown()
    out = capsys.readouterr().out
    assert '"name": "fusion.step"' in out and "coolfusion-test" in out


def test_an_orchestrator_without_exporter_never_loads_the_tracing_sdk():
    # A fresh interpreter: this test process may have imported the SDK for other tests.
    script = textwrap.dedent(
        """
        import asyncio, sys
        from coolfusion.orchestrator.registry import WorkerEntry
        from coolfusion.orchestrator.server import start_orchestrator
        from coolfusion.orchestrator.settings import OrchestratorSettings

        async def main():
            settings = OrchestratorSettings(workers=(WorkerEntry("w", "127.0.0.1:9"),), port=0, metrics_port=0)
            running = await start_orchestrator(settings)
            await running.stop(0)
            return running.telemetry.tracing.tracer

        assert asyncio.run(main()) is None
        assert not [m for m in sys.modules if m.startswith("opentelemetry.sdk")], "SDK imported"
        """
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def failure(error: WorkerFailed, cause: BaseException | None = None) -> WorkerFailed:
    error.__cause__ = cause
    return error


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="from the worker")


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (WorkerUnavailable("UNAVAILABLE: connection refused"), "unavailable"),
        (WorkerRejected("INVALID_ARGUMENT: prompt too long"), "rejected"),
        (InvalidAnswer("invalid answer: log-probability nan"), "invalid_answer"),
        (failure(WorkerFailed("session lost twice: NOT_FOUND"), SessionLost("NOT_FOUND: gone")), "session_lost"),
        (failure(WorkerFailed("DEADLINE_EXCEEDED: x"), rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)), "deadline"),
        (WorkerFailed("DEADLINE_EXCEEDED: the request's deadline passed"), "deadline"),  # the fusion's own check
        (failure(WorkerFailed("INTERNAL: x"), rpc_error(grpc.StatusCode.INTERNAL)), "other"),
        (WorkerFailed("something nobody foresaw, with a colon: here"), "other"),
    ],
)
def test_drop_reasons_are_a_fixed_set_never_the_error_text(error, reason):
    assert drop_reason(error) == reason
    assert reason in DROP_REASONS
