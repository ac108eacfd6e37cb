"""Traces of a fusion, exported over OTLP/gRPC to a collector that the test runs on loopback.

One fusion (two tiny-model workers and one registered worker that is gone) must give one trace:
the caller's span, the orchestrator's Fuse span, a span per step, a client span per worker call,
and the workers' own server spans joined to those calls through the W3C `traceparent` metadata.
A request through the HTTP gateway adds the gateway's span between the HTTP caller's and the
orchestrator's.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from coolfusion.cli.cluster import gateway_argv, launch, stop_processes, wait_ready
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
# Loopback only: an opener that ignores any proxy configured in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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


@dataclass
class TracedServers:
    """A collector on loopback, and tiny-model workers and an orchestrator exporting to it."""

    collector: Collector
    receiver: grpc.aio.Server
    endpoint: str  # the collector's OTLP/gRPC address
    workers: list
    orchestrator: object

    async def stop(self) -> None:
        await self.orchestrator.stop(0)  # stopping flushes each server's spans to the collector
        for worker in self.workers:
            await worker.stop(0)
        await self.receiver.stop(0)


async def start_traced_servers(tiny_model_dirs, extra_workers: dict[str, str]) -> TracedServers:
    collector = Collector()
    receiver = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    endpoint = f"http://{LOOPBACK}:{receiver.add_insecure_port(f'{LOOPBACK}:0')}"
    await receiver.start()

    def tracing(service: str) -> TracingSettings:
        return TracingSettings(("otlp",), endpoint, service)

    workers = [await start_tiny_worker(tiny_model_dirs[f], f, tracing=tracing(f"worker-{f}")) for f in WORKERS]
    registry = {f: address(w) for f, w in zip(WORKERS, workers)} | extra_workers
    orchestrator = await start_local_orchestrator(registry, tracing=tracing("orchestrator"))
    return TracedServers(collector, receiver, endpoint, workers, orchestrator)


async def traced_fusion(tiny_model_dirs) -> tuple[opb.FuseResult, dict[str, str], list[ExportedSpan]]:
    gone = {"gone": unused_address()}  # a registered worker that is not there
    servers = await start_traced_servers(tiny_model_dirs, gone)
    registry = {f: address(w) for f, w in zip(WORKERS, servers.workers)} | gone
    try:
        async with grpc.aio.insecure_channel(address(servers.orchestrator)) as channel:
            parameters = opb.FusionParameters(
                prompt=worker_pb2.Prompt(text="Tom has 3 apples and buys 4 more."),
                max_new_tokens=16,
                include_trace=True,
            )
            caller = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),)
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            response = await stub.Fuse(opb.FuseRequest(parameters=parameters), timeout=120, metadata=caller)
    finally:
        await servers.stop()
    return response.result, registry, servers.collector.spans


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


# ---- through the HTTP gateway -------------------------------------------------------------------

HTTP_TRACE = "0af7651916cd43dd8448eb211c80319c"
HTTP_SPAN = "b7ad6b7169203331"
UNTRACED_GATEWAY_TRACE = "5c4e31a2b0d94f6e8a7b3c2d1e0f9a8b"


def post_chat(base_url: str, trace_id: str, stream: bool) -> str:
    """A chat completion sent as an HTTP caller in the middle of its own trace would send it."""
    body = {"model": "coolfusion", "messages": [{"role": "user", "content": "Tom has 3 apples."}], "max_tokens": 8}
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions",
        data=json.dumps(body | {"stream": stream}).encode(),
        headers={"Content-Type": "application/json", "traceparent": f"00-{trace_id}-{HTTP_SPAN}-01"},
    )
    with _DIRECT.open(request, timeout=120) as response:
        return response.read().decode()


async def traced_http_requests(tiny_model_dirs) -> list[ExportedSpan]:
    servers = await start_traced_servers(tiny_model_dirs, {})
    traced_env = dict(
        os.environ,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=servers.endpoint,
        OTEL_SERVICE_NAME="gateway",
    )
    untraced_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    gateways = []
    try:
        for env in (traced_env, untraced_env):
            gateways.append(wait_ready(launch("gateway", gateway_argv(address(servers.orchestrator)), env=env), 60))
        traced, untraced = (f"http://{g.address}" for g in gateways)
        await asyncio.to_thread(post_chat, traced, HTTP_TRACE, False)
        await asyncio.to_thread(post_chat, traced, CALLER_TRACE, True)
        await asyncio.to_thread(post_chat, untraced, UNTRACED_GATEWAY_TRACE, False)
    finally:
        # SIGTERM: the gateway flushes its spans as it stops, to the collector on this event loop.
        await asyncio.to_thread(stop_processes, gateways)
        await servers.stop()
    return servers.collector.spans


@pytest.fixture(scope="module")
def http_spans(tiny_model_dirs):
    return asyncio.run(traced_http_requests(tiny_model_dirs))


@pytest.mark.parametrize(("trace_id", "stream"), [(HTTP_TRACE, False), (CALLER_TRACE, True)])
def test_a_trace_started_by_an_http_caller_runs_through_gateway_orchestrator_and_every_worker(
    http_spans, trace_id, stream
):
    spans = [s for s in http_spans if s.trace == trace_id]
    [request] = [s for s in spans if s.service == "gateway"]
    assert (request.name, request.span.kind, request.parent) == ("POST /v1/chat/completions", SERVER, HTTP_SPAN)
    assert request.attributes["http.response.status_code"] == 200
    [fusion] = named(spans, "coolfusion.v1.OrchestratorService/FuseStream" if stream else FUSE)
    assert fusion.parent == request.id  # the gateway forwarded its own span as the parent
    for worker in WORKERS:
        calls = {s.id for s in spans if s.span.kind == CLIENT and s.attributes.get("coolfusion.worker") == worker}
        served = [s for s in spans if s.service == f"worker-{worker}" and s.span.kind == SERVER]
        assert served and all(s.parent in calls for s in served)


def test_a_gateway_without_tracing_still_forwards_the_callers_traceparent(http_spans):
    spans = [s for s in http_spans if s.trace == UNTRACED_GATEWAY_TRACE]
    assert not [s for s in spans if s.service == "gateway"]
    [fusion] = named(spans, FUSE)
    assert fusion.parent == HTTP_SPAN  # the caller's span, passed through
    assert {s.service for s in spans} == {"orchestrator", *(f"worker-{w}" for w in WORKERS)}
