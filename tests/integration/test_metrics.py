"""Prometheus metrics of both services, scraped over HTTP from servers started in the test process.

Each server has its own registry: two servers in one process must not see each other's counts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from coolfusion.v1 import orchestrator_pb2 as opb
from coolfusion.v1 import orchestrator_pb2_grpc, worker_pb2, worker_pb2_grpc
from coolfusion.worker.backend import PromptSpec
from coolfusion.worker.hf.jobs import Job
from coolfusion.worker.hf.kv import SessionKV
from coolfusion.worker.settings import SessionLimits

from in_process import (
    address,
    sample,
    scrape,
    start_local_orchestrator,
    start_tiny_worker,
    tiny_model,
    unused_address,
)

PROMPT = "Tom has 3 apples and buys 4 more."
RPC_TIMEOUT_S = 30


def text_prompt(text: str = PROMPT) -> worker_pb2.Prompt:
    return worker_pb2.Prompt(text=text)


async def open_session(stub, session_id: str, answer_text: str = "") -> worker_pb2.OpenSessionResponse:
    request = worker_pb2.OpenSessionRequest(session_id=session_id, prompt=text_prompt(), answer_text=answer_text)
    return await stub.OpenSession(request, timeout=RPC_TIMEOUT_S)


def handled(samples, method: str, code: str, service: str = "coolfusion.v1.WorkerService") -> float | None:
    labels = {"grpc_service": service, "grpc_method": method, "grpc_code": code}
    return sample(samples, "coolfusion_grpc_server_handled_total", **labels)


def test_worker_counts_rpcs_by_method_and_code_and_shows_its_sessions(tiny_model_dirs, caplog):
    caplog.set_level(logging.INFO, logger="coolfusion.serving.metrics")

    async def scenario():
        used = await start_tiny_worker(tiny_model_dirs["bpe"], "bpe")
        idle = await start_tiny_worker(tiny_model_dirs["char"], "char")
        try:
            async with grpc.aio.insecure_channel(address(used)) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                opened = await open_session(stub, "s1")
                generate = worker_pb2.GenerateSegmentRequest(
                    session_id="s1", expected_context_tokens=opened.context_tokens
                )
                await stub.GenerateSegment(generate, timeout=RPC_TIMEOUT_S)
                generate.expected_context_tokens += 1  # a stale caller
                with pytest.raises(grpc.aio.AioRpcError) as stale:
                    await stub.GenerateSegment(generate, timeout=RPC_TIMEOUT_S)
                assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                with_session = await asyncio.to_thread(scrape, used.metrics_port)
                info = await stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=RPC_TIMEOUT_S)
                await stub.CloseSession(worker_pb2.CloseSessionRequest(session_id="s1"), timeout=RPC_TIMEOUT_S)
            return (
                with_session,
                await asyncio.to_thread(scrape, used.metrics_port),
                await asyncio.to_thread(scrape, idle.metrics_port),
                used.metrics_port,
                info.limits.session_token_budget,
            )
        finally:
            await used.stop(0)
            await idle.stop(0)

    with_session, closed, idle, port, budget = asyncio.run(scenario())
    assert handled(with_session, "OpenSession", "OK") == 1
    assert handled(with_session, "GenerateSegment", "OK") == 1
    assert handled(with_session, "GenerateSegment", "FAILED_PRECONDITION") == 1
    latency = {"grpc_service": "coolfusion.v1.WorkerService", "grpc_method": "GenerateSegment", "grpc_code": "OK"}
    assert sample(with_session, "coolfusion_grpc_server_handling_seconds_count", **latency) == 1
    assert sample(with_session, "coolfusion_worker_sessions") == 1
    assert sample(with_session, "coolfusion_worker_cached_tokens") > 0
    # Sized from memory at start (no --token-budget): the gauge and GetInfo agree on it.
    assert budget > 0 and sample(with_session, "coolfusion_worker_token_budget") == budget
    assert sample(with_session, "coolfusion_worker_model_queue_depth") == 0
    assert handled(closed, "CloseSession", "OK") == 1
    assert sample(closed, "coolfusion_worker_sessions") == 0
    assert sample(closed, "coolfusion_worker_cached_tokens") == 0
    # The other worker in this process has a registry of its own: none of those calls reached it.
    assert handled(idle, "OpenSession", "OK") is None
    assert sample(idle, "coolfusion_worker_sessions") == 0
    assert f"metrics on http://127.0.0.1:{port}/metrics" in caplog.text


def test_worker_counts_evictions_by_cause(tiny_model_dirs):
    lm = tiny_model(tiny_model_dirs["bpe"], "bpe")
    text, add_special = (rendered := lm.render(PromptSpec(text=PROMPT))).text, rendered.add_special_tokens
    prompt_tokens = len(lm.tokenize(text, add_special))
    answer = " Then he eats 2."
    # Room for three bare prompts, or one bare prompt and one with the answer, never more.
    with_answer = len(lm.tokenize(text + answer, add_special))
    assert prompt_tokens < with_answer <= 2 * prompt_tokens
    limits = SessionLimits(token_budget=3 * prompt_tokens, max_sessions=2)

    async def scenario():
        counted = await start_tiny_worker(tiny_model_dirs["bpe"], "bpe", limits=limits)
        expiring = await start_tiny_worker(tiny_model_dirs["bpe"], "bpe", limits=SessionLimits(idle_ttl_s=0.5))
        try:
            async with grpc.aio.insecure_channel(address(counted)) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                for session_id in ("s1", "s2", "s3"):  # s3 is one session too many: s1 goes
                    await open_session(stub, session_id)
                await open_session(stub, "s4", answer)  # s2 goes to make room in the budget
            async with grpc.aio.insecure_channel(address(expiring)) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                await open_session(stub, "old")
                await asyncio.sleep(1.2)
                await open_session(stub, "new")  # every call first evicts what idled past the TTL
            return await asyncio.to_thread(scrape, counted.metrics_port), await asyncio.to_thread(
                scrape, expiring.metrics_port
            )
        finally:
            await counted.stop(0)
            await expiring.stop(0)

    counted, expiring = asyncio.run(scenario())
    evictions = "coolfusion_worker_session_evictions_total"
    assert sample(counted, evictions, cause="max_sessions") == 1
    assert sample(counted, evictions, cause="token_budget") == 1
    assert sample(counted, evictions, cause="ttl") == 0
    assert sample(counted, "coolfusion_worker_sessions") == 2
    assert sample(expiring, evictions, cause="ttl") == 1
    assert sample(expiring, evictions, cause="max_sessions") == 0


class _HoldTheModelThread(Job):
    """A model call that keeps the model thread until released."""

    def __init__(self, release: threading.Event):
        super().__init__(SessionKV())
        self._release = release

    def start(self) -> None:
        self._release.wait(30)
        self._finish(None)

    def next_feeds(self, budget, alone):
        return []

    def absorb(self, feeds, logits) -> None:
        pass


def test_queue_depth_counts_calls_waiting_for_the_model_thread(tiny_model_dirs):
    async def scenario():
        worker = await start_tiny_worker(tiny_model_dirs["char"], "char")
        release = threading.Event()
        try:
            blocker = asyncio.create_task(worker.backend._scheduler.run(_HoldTheModelThread(release)))
            async with grpc.aio.insecure_channel(address(worker)) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                waiting = asyncio.create_task(open_session(stub, "queued"))
                busy = await _scrape_until(
                    worker.metrics_port, lambda s: sample(s, "coolfusion_worker_model_queue_depth") == 2
                )
                release.set()
                await asyncio.gather(blocker, waiting)
            return busy, await asyncio.to_thread(scrape, worker.metrics_port)
        finally:
            release.set()
            await worker.stop(0)

    busy, idle = asyncio.run(scenario())
    assert sample(busy, "coolfusion_worker_model_queue_depth") == 2
    assert sample(idle, "coolfusion_worker_model_queue_depth") == 0


async def _scrape_until(port: int, done: Callable[[dict], bool], timeout_s: float = 10.0):
    """Scrapes until `done(samples)`, or for `timeout_s`: calls and cancellations reach the
    server's handlers and threads a moment after the client has made them."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = await asyncio.to_thread(scrape, port)
        if done(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.05)


def test_orchestrator_reports_steps_drops_and_worker_calls(tiny_model_dirs):
    async def scenario():
        workers = [await start_tiny_worker(tiny_model_dirs[f], f) for f in ("bpe", "char")]
        registry = {"bpe": address(workers[0]), "char": address(workers[1]), "gone": unused_address()}
        orchestrator = await start_local_orchestrator(registry)
        try:
            async with grpc.aio.insecure_channel(address(orchestrator)) as channel:
                stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
                parameters = opb.FusionParameters(prompt=text_prompt(), max_new_tokens=16, include_trace=True)
                result = (await stub.Fuse(opb.FuseRequest(parameters=parameters), timeout=120)).result
                too_long = opb.FusionParameters(prompt=text_prompt(), max_new_tokens=10**6)
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Fuse(opb.FuseRequest(parameters=too_long), timeout=RPC_TIMEOUT_S)
            return result, await asyncio.to_thread(scrape, orchestrator.metrics_port)
        finally:
            await orchestrator.stop(0)
            for worker in workers:
                await worker.stop(0)

    result, samples = asyncio.run(scenario())
    service = "coolfusion.v1.OrchestratorService"
    assert handled(samples, "Fuse", "OK", service) == 1
    assert handled(samples, "Fuse", "INVALID_ARGUMENT", service) == 1
    assert [d.worker for d in result.dropped] == ["gone"]
    assert sample(samples, "coolfusion_fusion_dropped_workers_total", worker="gone", reason="unavailable") == 1
    steps = result.timings.steps
    scored = sum(len(step.candidates) > 1 for step in result.trace)
    assert steps > 1
    assert sample(samples, "coolfusion_fusion_step_seconds_count", loop="fused") == steps
    phase = "coolfusion_fusion_step_phase_seconds_count"
    assert sample(samples, phase, loop="fused", phase="generate") == steps
    assert sample(samples, phase, loop="fused", phase="overhead") == steps
    assert sample(samples, phase, loop="fused", phase="score") == (scored or None)
    calls = "coolfusion_worker_call_seconds_count"
    assert sample(samples, calls, worker="bpe", grpc_method="GenerateSegment", grpc_code="OK") >= steps
    assert sample(samples, calls, worker="gone", grpc_method="OpenSession", grpc_code="UNAVAILABLE") == 1
    assert sample(samples, "coolfusion_fusions_in_flight") == 0


def test_metrics_are_off_unless_a_port_is_given(tiny_model_dirs):
    async def scenario():
        worker = await start_tiny_worker(tiny_model_dirs["char"], "char", metrics_port=None)
        orchestrator = await start_local_orchestrator({"char": address(worker)}, metrics_port=None)
        ports = worker.metrics_port, orchestrator.metrics_port
        await orchestrator.stop(0)
        await worker.stop(0)
        return ports

    assert asyncio.run(scenario()) == (None, None)


CANCELLED_STREAM = ("FuseStream", "CANCELLED", "coolfusion.v1.OrchestratorService")


def stream_ended(samples) -> bool:
    # The handler ends first; the cancelled fusion task then closes its sessions and finishes.
    return handled(samples, *CANCELLED_STREAM) == 1 and sample(samples, "coolfusion_fusions_in_flight") == 0


def test_a_cancelled_stream_is_counted_and_leaves_no_fusion_in_flight(tiny_model_dirs):
    async def scenario():
        worker = await start_tiny_worker(tiny_model_dirs["char"], "char")
        orchestrator = await start_local_orchestrator({"char": address(worker)})
        try:
            async with grpc.aio.insecure_channel(address(orchestrator)) as channel:
                stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
                parameters = opb.FusionParameters(prompt=text_prompt(), max_new_tokens=400)
                call = stub.FuseStream(opb.FuseStreamRequest(parameters=parameters), timeout=RPC_TIMEOUT_S)
                await call.read()  # the first step: the fusion is running
                running = await asyncio.to_thread(scrape, orchestrator.metrics_port)
                call.cancel()
            ended = await _scrape_until(orchestrator.metrics_port, stream_ended)
            return running, ended
        finally:
            await orchestrator.stop(0)
            await worker.stop(0)

    running, ended = asyncio.run(scenario())
    assert sample(running, "coolfusion_fusions_in_flight") == 1
    assert sample(ended, "coolfusion_fusions_in_flight") == 0
    assert handled(ended, *CANCELLED_STREAM) == 1


def test_a_constraint_seen_before_compiles_nothing(tiny_model_dirs):
    """The worker compiles each distinct constraint once; sessions copy the compiled grammar."""
    schema = worker_pb2.Constraint(kind=worker_pb2.CONSTRAINT_KIND_JSON_SCHEMA, definition='{"type": "array"}')

    async def scenario():
        worker = await start_tiny_worker(tiny_model_dirs["bpe"], "bpe")
        counts = [await asyncio.to_thread(scrape, worker.metrics_port)]
        try:
            async with grpc.aio.insecure_channel(address(worker)) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                for session_id in ("first", "second"):
                    request = worker_pb2.OpenSessionRequest(
                        session_id=session_id, prompt=text_prompt(), constraint=schema
                    )
                    await stub.OpenSession(request, timeout=RPC_TIMEOUT_S)
                    counts.append(await asyncio.to_thread(scrape, worker.metrics_port))
        finally:
            await worker.stop(0)
        return [sample(c, "coolfusion_worker_grammar_compiles_total") for c in counts]

    assert asyncio.run(scenario()) == [0, 1, 1]
