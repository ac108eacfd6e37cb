"""Overload is backpressure, never silent degradation: a busy worker is waited for, not dropped; a
request that cannot be served fails with RESOURCE_EXHAUSTED; undelivered closes are retried.

A misbehaving worker here is a real gRPC WorkerService that forwards to a real worker process and
answers some calls with an error first, so the orchestrator sees exactly what a loaded worker sends.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from coolfusion.cli.cluster import launch, stop_processes, wait_ready, worker_argv
from coolfusion.client import AsyncFusionClient, FuseOptions, ResourceExhaustedError
from coolfusion.orchestrator.admission import AdmissionLimits
from coolfusion.orchestrator.domain import Prompt
from coolfusion.orchestrator.fusion import FusionRequest, fuse
from coolfusion.orchestrator.sessions import WorkersOverloaded
from coolfusion.orchestrator.worker_client import WorkerClient
from coolfusion.v1 import worker_pb2_grpc

from in_process import address, start_local_orchestrator
from worker_probes import wait_for_no_sessions

PROMPT = "Tom has 3 apples and buys 4 more."


@pytest.fixture(scope="module")
def workers(tiny_model_dirs):
    processes = [launch(f, worker_argv(["--model", str(tiny_model_dirs[f])])) for f in ("bpe", "char")]
    try:
        yield {p.name: wait_ready(p, 120) for p in processes}
    finally:
        stop_processes(processes)


class RefusingWorker(worker_pb2_grpc.WorkerServiceServicer):
    """Forwards every call to a real worker, but answers the first `times` calls of `rpc` with
    `code` (all of them when `times` is None)."""

    def __init__(self, target: str, rpc: str, code: grpc.StatusCode, times: int | None):
        self._target = target
        self._stub: worker_pb2_grpc.WorkerServiceStub | None = None  # made on the serving loop
        self._rpc, self._code, self._left = rpc, code, times
        self.refused = 0
        self.calls: dict[str, int] = {}

    async def _forward(self, name: str, request, context: grpc.aio.ServicerContext):
        self.calls[name] = self.calls.get(name, 0) + 1
        if name == self._rpc and (self._left is None or self._left > 0):
            self.refused += 1
            if self._left is not None:
                self._left -= 1
            await context.abort(self._code, f"injected {self._code.name}")
        if self._stub is None:
            self._stub = worker_pb2_grpc.WorkerServiceStub(grpc.aio.insecure_channel(self._target))
        return await getattr(self._stub, name)(request, timeout=30)

    async def GetInfo(self, request, context):
        return await self._forward("GetInfo", request, context)

    async def OpenSession(self, request, context):
        return await self._forward("OpenSession", request, context)

    async def GenerateSegment(self, request, context):
        return await self._forward("GenerateSegment", request, context)

    async def ScoreText(self, request, context):
        return await self._forward("ScoreText", request, context)

    async def CloseSession(self, request, context):
        return await self._forward("CloseSession", request, context)


async def serve_proxy(servicer: RefusingWorker) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def fuse_through(workers, proxy: RefusingWorker, busy_wait_s: float = 30.0):
    """Fuses the real bpe worker with `proxy` in front of the real char worker."""
    server, proxy_address = await serve_proxy(proxy)
    channels = [grpc.aio.insecure_channel(workers["bpe"].address), grpc.aio.insecure_channel(proxy_address)]
    try:
        clients = [WorkerClient("bpe", channels[0]), WorkerClient("char", channels[1])]
        request = FusionRequest(Prompt(text=PROMPT), 16, (), 16, False, f"busy-{time.monotonic_ns()}")
        return await fuse(clients, request, time.monotonic() + 120, 30.0, busy_wait_s=busy_wait_s)
    finally:
        for channel in channels:
            await channel.close()
        await server.stop(0)


@pytest.mark.parametrize("rpc", ["OpenSession", "GenerateSegment", "ScoreText"])
def test_a_busy_worker_is_waited_for_and_keeps_its_place(workers, rpc):
    async def run():
        plain = await fuse_through(workers, RefusingWorker(workers["char"].address, rpc, grpc.StatusCode.OK, 0))
        busy = RefusingWorker(workers["char"].address, rpc, grpc.StatusCode.RESOURCE_EXHAUSTED, 3)
        return plain, await fuse_through(workers, busy), busy.refused

    plain, busy, refused = asyncio.run(run())
    assert refused == 3
    assert busy.dropped == [] and busy.workers == ["bpe", "char"]
    assert busy.text == plain.text
    assert wait_for_no_sessions(list(workers.values())) == [0, 0]


def test_a_worker_that_stays_busy_fails_the_request_instead_of_being_dropped(workers):
    busy = RefusingWorker(workers["char"].address, "GenerateSegment", grpc.StatusCode.RESOURCE_EXHAUSTED, None)
    started = time.monotonic()
    with pytest.raises(WorkersOverloaded, match="char stayed busy"):
        asyncio.run(fuse_through(workers, busy, busy_wait_s=1.0))
    assert time.monotonic() - started < 10
    assert wait_for_no_sessions(list(workers.values())) == [0, 0]


def test_a_close_that_could_not_be_delivered_is_retried_in_the_background(workers):
    async def run():
        flaky = RefusingWorker(workers["char"].address, "CloseSession", grpc.StatusCode.UNAVAILABLE, 2)
        server, proxy_address = await serve_proxy(flaky)
        orchestrator = await start_local_orchestrator({"bpe": workers["bpe"].address, "char": proxy_address})
        try:
            async with AsyncFusionClient(address(orchestrator), timeout_s=60) as client:
                result = await client.fuse(PROMPT, FuseOptions(max_new_tokens=8))
            # Polled while the orchestrator (and its retries) still run.
            counts = await asyncio.to_thread(wait_for_no_sessions, list(workers.values()), 10.0)
            return result, counts, flaky.refused
        finally:
            await orchestrator.stop(0)
            await server.stop(0)

    result, counts, refused = asyncio.run(run())
    assert len(result.dropped) == 0
    assert refused == 2  # the first close and one retry failed; the next retry landed
    assert counts == [0, 0]


def test_the_orchestrator_refuses_fusions_beyond_its_limits_before_opening_sessions(workers):
    async def run():
        counting = RefusingWorker(workers["char"].address, "none", grpc.StatusCode.OK, 0)
        server, proxy_address = await serve_proxy(counting)
        orchestrator = await start_local_orchestrator(
            {"bpe": workers["bpe"].address, "char": proxy_address},
            admission=AdmissionLimits(max_running=1, max_waiting=0, max_wait_s=0),
        )
        try:
            async with AsyncFusionClient(address(orchestrator), timeout_s=60) as client:
                first = asyncio.create_task(client.fuse(PROMPT, FuseOptions(max_new_tokens=24)))
                while not counting.calls.get("OpenSession"):  # the first request holds the slot
                    await asyncio.sleep(0.01)
                with pytest.raises(ResourceExhaustedError, match="max-running-fusions 1"):
                    await client.fuse(PROMPT, FuseOptions(max_new_tokens=24))
                result = await first
            return result, counting.calls["OpenSession"]
        finally:
            await orchestrator.stop(0)
            await server.stop(0)

    first, opened = asyncio.run(run())
    assert first.text and not first.dropped
    assert opened == 1  # the refused request never opened a session
    assert wait_for_no_sessions(list(workers.values())) == [0, 0]
