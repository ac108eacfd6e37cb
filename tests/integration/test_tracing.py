"""Traces of a fusion, exported over OTLP/gRPC to a collector that the test runs on loopback.

One fusion (two tiny-model workers and one registered worker that is gone) must give one trace:
the caller's span, the orchestrator's Fuse span, a span per step, a client span per worker call,
and the workers' own server spans joined to those calls through the W3C `traceparent` metadata.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from coolfusion.serving.tracing import TracingSettings
from coolfusion.v1 import orchestrator_pb2 as opb
from coolfusion.v1 import orchestrator_pb2_grpc, worker_pb2

from in_process import LOOPBACK, address, start_local_orchestrator, start_tiny_worker, unused_address

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
WORKERS = ("bpe", "char")
FUSE = "coolfusion.v1.OrchestratorService/Fuse"
GENERATE = "coolfusion.v1.WorkerService/GenerateSegment"
OPEN = "coolfusion.v1.WorkerService/OpenSession"
SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT


@dataclass(frozen=True)
class ExportedSpan:
    """A span as the collector received it, with the service.name of the process that sent it."""

    service: str
    span: trace_pb2.Span

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def trace(self) -> str:
        return self.span.trace_id.hex()

    @property
    def attributes(self) -> dict:
        return _values(self.span.attributes)


def _values(attributes) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in attributes}


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context):
        for resource_spans in request.resource_spans:
            service = _values(resource_spans.resource.attributes)["service.name"]
            for scope_spans in resource_spans.scope_spans:
                self.spans += [ExportedSpan(service, span) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


async def traced_fusion(tiny_model_dirs) -> tuple[opb.FuseResult, dict[str, str], list[ExportedSpan]]:
    collector = Collector()
    receiver = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    endpoint = f"http://{LOOPBACK}:{receiver.add_insecure_port(f'{LOOPBACK}:0')}"
    await receiver.start()

    def tracing(service: str) -> TracingSettings:
        return TracingSettings(("otlp",), endpoint, service)

    workers = [await start_tiny_worker(tiny_model_dirs[f], f, tracing=tracing(f"worker-{f}")) for f in WORKERS]
    registry = {f: address(w) for f, w in zip(WORKERS, workers)} | {"gone": unused_address()}
    orchestrator = await start_local_orchestrator(registry, tracing=tracing("orchestrator"))
    try:
        async with grpc.aio.insecure_channel(address(orchestrator)) as channel:
            parameters = opb.FusionParameters(
                prompt=worker_pb2.Prompt(text="Tom has 3 apples and buys 4 more."),
                max_new_tokens=16,
                include_trace=True,
            )
            caller = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),)
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            response = await stub.Fuse(opb.FuseRequest(parameters=parameters), timeout=120, metadata=caller)
    finally:
        await orchestrator.stop(0)  # stopping flushes each server's spans to the collector
        for worker in workers:
            await worker.stop(0)
        await receiver.stop(0)
    return response.result, registry, collector.spans


@pytest.fixture(scope="module")
def fusion(tiny_model_dirs):
    return asyncio.run(traced_fusion(tiny_model_dirs))


def named(spans: list[ExportedSpan], name: str, service: str = "orchestrator") -> list[ExportedSpan]:
    return [s for s in spans if s.name == name and s.service == service]


def test_the_fuse_span_continues_the_callers_trace(fusion):
    result, _, spans = fusion
    [fuse] = named(spans, FUSE)
    assert fuse.span.kind == SERVER
    assert (fuse.trace, fuse.parent) == (CALLER_TRACE, CALLER_SPAN)
    assert fuse.attributes["coolfusion.request_id"] == result.request_id
    assert fuse.attributes["rpc.grpc.status_code"] == 0
    assert {s.trace for s in spans} == {CALLER_TRACE}, "one fusion, one trace, across all three services"
    [dropped] = [e for e in fuse.span.events if e.name == "worker dropped"]
    assert _values(dropped.attributes)["coolfusion.worker"] == "gone"
    assert _values(dropped.attributes)["coolfusion.drop_reason"] == "unavailable"


def test_every_step_has_a_span_under_the_fuse_span(fusion):
    result, _, spans = fusion
    [fuse] = named(spans, FUSE)
    steps = named(spans, "fusion.step")
    assert {s.parent for s in steps} == {fuse.id}
    # The loop may begin one more step that ends at the token limit before it has candidates.
    assert sorted(s.attributes["coolfusion.step"] for s in steps) == list(range(len(steps)))
    assert result.timings.steps <= len(steps) <= result.timings.steps + 1
    by_index = {s.attributes["coolfusion.step"]: s for s in steps}
    for step in result.trace:
        assert by_index[step.index].attributes["coolfusion.candidates"] == len(step.candidates)
        assert by_index[step.index].attributes["coolfusion.winner_worker"] == step.winner_worker


def test_every_worker_call_has_a_client_span_naming_the_worker_and_replica(fusion):
    result, registry, spans = fusion
    [fuse] = named(spans, FUSE)
    step_ids = {s.id for s in named(spans, "fusion.step")}
    for worker in WORKERS:
        generates = [s for s in named(spans, GENERATE) if s.attributes["coolfusion.worker"] == worker]
        assert len(generates) >= result.timings.steps
        assert all(s.span.kind == CLIENT and s.parent in step_ids for s in generates)
        assert {s.attributes["coolfusion.replica"] for s in generates} == {registry[worker]}
        assert {s.attributes["rpc.method"] for s in generates} == {"GenerateSegment"}
    [gone] = [s for s in named(spans, OPEN) if s.attributes["coolfusion.worker"] == "gone"]
    assert gone.parent == fuse.id  # sessions open before the first step
    assert gone.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert gone.span.status.code == trace_pb2.Status.STATUS_CODE_ERROR


def test_worker_spans_are_children_of_the_orchestrators_calls(fusion):
    _, _, spans = fusion
    for worker in WORKERS:
        calls = {s.id: s for s in spans if s.span.kind == CLIENT and s.attributes.get("coolfusion.worker") == worker}
        served = [s for s in spans if s.service == f"worker-{worker}" and s.span.kind == SERVER]
        assert served and len(served) == len(calls)
        for span in served:
            assert span.parent in calls, f"{span.name} on {worker} has no caller span"
            assert calls[span.parent].name == span.name
