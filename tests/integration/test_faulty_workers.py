"""Fault injection: workers that answer nonsense or hang are dropped, and the request still completes.

A faulty worker here is a real gRPC WorkerService that forwards to a real worker process and
corrupts one kind of answer, so the orchestrator sees exactly what a broken remote worker sends.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from coolfusion.cli.cluster import launch, stop_processes, wait_ready, worker_argv
from coolfusion.constraints import Constraint, ConstraintKind
from coolfusion.orchestrator.domain import Prompt
from coolfusion.orchestrator.fusion import FusionRequest, fuse
from coolfusion.orchestrator.strategy import PAPER
from coolfusion.orchestrator.structured import Structure
from coolfusion.orchestrator.worker_client import WorkerClient
from coolfusion.v1 import worker_pb2, worker_pb2_grpc

from worker_probes import open_sessions

PROMPT = "Tom has 3 apples and buys 4 more."


@pytest.fixture(scope="module")
def workers(tiny_model_dirs):
    processes = [launch(f, worker_argv(["--model", str(tiny_model_dirs[f])])) for f in ("bpe", "char")]
    try:
        yield {p.name: wait_ready(p, 120) for p in processes}
    finally:
        stop_processes(processes)


class CorruptingWorker(worker_pb2_grpc.WorkerServiceServicer):
    """Forwards every call to a real worker; `corrupt` rewrites the answers of one RPC."""

    def __init__(self, target: str, rpc: str, corrupt):
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
        self._rpc, self._corrupt = rpc, corrupt

    async def _forward(self, name: str, request):
        response = await getattr(self._stub, name)(request, timeout=30)
        return await self._corrupt(response) if name == self._rpc else response

    async def GetInfo(self, request, context):
        return await self._forward("GetInfo", request)

    async def OpenSession(self, request, context):
        return await self._forward("OpenSession", request)

    async def GenerateSegment(self, request, context):
        return await self._forward("GenerateSegment", request)

    async def ScoreText(self, request, context):
        return await self._forward("ScoreText", request)

    async def CloseSession(self, request, context):
        return await self._forward("CloseSession", request)


async def nan_scores(response: worker_pb2.ScoreTextResponse):
    for score in response.scores:
        score.log_prob_sum = float("nan")
    return response


async def oversized_segment(response: worker_pb2.GenerateSegmentResponse):
    response.generated_tokens = 500
    response.text = "x" * 5000
    return response


async def hang(response):
    await asyncio.sleep(3600)


class ConstraintIgnoringWorker(CorruptingWorker):
    """A worker that says it enforces constraints (its GetInfo is the real worker's) and opens every
    session without one: what a third-party worker that ignores the field sends."""

    def __init__(self, target: str):
        super().__init__(target, "", None)

    async def OpenSession(self, request, context):
        request.ClearField("constraint")
        return await self._forward("OpenSession", request)


async def fuse_with_faulty(workers, rpc: str, corrupt, call_timeout_s: float = 30.0, proxy=None, request=None):
    """Fuses the real bpe worker with a corrupted proxy of the real char worker; `proxy(target)`
    makes another kind of proxy (inside the event loop, which its channel belongs to)."""
    server = grpc.aio.server()
    target = workers["char"].address
    proxy = proxy(target) if proxy else CorruptingWorker(target, rpc, corrupt)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(proxy, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels = [grpc.aio.insecure_channel(workers["bpe"].address), grpc.aio.insecure_channel(f"127.0.0.1:{port}")]
    try:
        clients = [WorkerClient("bpe", channels[0]), WorkerClient("faulty", channels[1])]
        request = request or FusionRequest(Prompt(text=PROMPT), 16, (), 16, False, f"faulty-{rpc}")
        return await fuse(clients, request, time.monotonic() + 120, call_timeout_s)
    finally:
        for channel in channels:
            await channel.close()
        await server.stop(0)


@pytest.mark.parametrize(
    ("rpc", "corrupt", "reason"),
    [
        ("ScoreText", nan_scores, "not a finite value"),
        ("GenerateSegment", oversized_segment, "over the cap of 16 tokens"),
    ],
    ids=["nan-scores", "oversized-segment"],
)
def test_a_worker_answering_nonsense_is_dropped_and_the_request_completes(workers, rpc, corrupt, reason):
    result = asyncio.run(fuse_with_faulty(workers, rpc, corrupt))
    assert [d.worker for d in result.dropped] == ["faulty"]
    assert reason in result.dropped[0].reason
    assert result.text and result.finish == "length"
    assert open_sessions(workers.values()) == [0, 0]


def test_a_hanging_worker_is_dropped_by_the_call_deadline(workers):
    started = time.monotonic()
    result = asyncio.run(fuse_with_faulty(workers, "GenerateSegment", hang, call_timeout_s=2.0))
    assert [d.worker for d in result.dropped] == ["faulty"]
    assert result.dropped[0].reason.startswith("DEADLINE_EXCEEDED")
    assert result.text and time.monotonic() - started < 60


def test_a_worker_that_ignores_the_constraint_loses_its_proposal_and_is_named(workers):
    """The orchestrator checks every proposal against the constraint (docs/design.md section 9.3):
    the worker that proposed free text is dropped, and the answer stays within the language."""
    n = {"type": "integer", "minimum": 0, "maximum": 99}
    schema = {"type": "object", "properties": {"n": n}, "required": ["n"], "additionalProperties": False}
    structure = Structure(Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema)))
    request = FusionRequest(Prompt(text=PROMPT), 32, (), 16, False, "ignores-constraint", PAPER, structure)
    result = asyncio.run(fuse_with_faulty(workers, "", None, proxy=ConstraintIgnoringWorker, request=request))
    assert [d.worker for d in result.dropped] == ["faulty"]
    assert "leaves the constraint's language" in result.dropped[0].reason
    assert result.finish == "eos" and 0 <= json.loads(result.text)["n"] <= 99
    assert open_sessions(workers.values()) == [0, 0]
