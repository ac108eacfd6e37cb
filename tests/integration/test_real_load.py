"""The default pair of real models under a burst of concurrent fusions: sessions never leak, and
overload is backpressure (a refusal the caller can retry), never an answer that lost a worker."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from near_ties import batched_logit_error

from coolfusion.cli.cluster import launch, orchestrator_argv, orchestrator_env, stop_processes, wait_ready
from coolfusion.v1 import orchestrator_pb2 as opb
from coolfusion.v1 import orchestrator_pb2_grpc, worker_pb2
from coolfusion.worker import model_files
from coolfusion.worker.backend import ChatTurn, PromptSpec
from coolfusion.worker.hf import loading
from coolfusion.worker.hf.model import HFModel

from worker_probes import REAL_PAIR, wait_for_no_sessions

pytestmark = pytest.mark.real_model

QUESTIONS = [
    "What is the capital of France?",
    "Name a colour of the sky.",
    "What is 7 plus 5?",
    "Which animal says moo?",
    "What do bees make?",
    "How many days are in a week?",
    "What is frozen water called?",
    "Which planet do we live on?",
]
# Sessions are closed the moment a request ends; "a few seconds" leaves room for a loaded machine.
SESSIONS_CLOSED_WITHIN_S = 5.0


@pytest.fixture
def orchestrator(real_pair):
    """An orchestrator with its default limits over the two workers."""
    env = orchestrator_env({name: worker.address for name, worker in real_pair.workers.items()})
    process = wait_ready(launch("orchestrator", orchestrator_argv(), env=env), 60)
    try:
        yield process.address
    finally:
        stop_processes([process])


async def burst(address: str, size: int) -> list[opb.FuseResult | grpc.aio.AioRpcError]:
    """`size` fusions sent at once (8-token answers); each result, or the error it ended with."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)

        async def one(index: int) -> opb.FuseResult | grpc.aio.AioRpcError:
            chat = worker_pb2.ChatConversation(
                messages=[worker_pb2.ChatMessage(role="user", content=QUESTIONS[index % len(QUESTIONS)])]
            )
            parameters = opb.FusionParameters(prompt=worker_pb2.Prompt(chat=chat), max_new_tokens=8)
            try:
                return (await stub.Fuse(opb.FuseRequest(parameters=parameters), timeout=600)).result
            except grpc.aio.AioRpcError as error:
                return error

        return list(await asyncio.gather(*(one(i) for i in range(size))))


def test_a_burst_of_fusions_closes_every_session_within_seconds(real_pair, orchestrator):
    results = asyncio.run(burst(orchestrator, 16))
    assert all(isinstance(r, opb.FuseResult) and r.text and not r.dropped for r in results), results
    assert wait_for_no_sessions(list(real_pair.workers.values()), SESSIONS_CLOSED_WITHIN_S) == [0, 0]


def test_an_overload_burst_is_refused_or_fused_whole_never_degraded(real_pair, orchestrator):
    results = asyncio.run(burst(orchestrator, 80))
    fused = [r for r in results if isinstance(r, opb.FuseResult)]
    refused = [r for r in results if not isinstance(r, opb.FuseResult)]
    print(f"\n80 at once: {len(fused)} fused, {len(refused)} refused")
    assert fused, "nothing was served"
    for result in fused:
        assert not result.dropped, result.dropped  # no answer went on without a worker
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert wait_for_no_sessions(list(real_pair.workers.values()), SESSIONS_CLOSED_WITHIN_S) == [0, 0]


@pytest.mark.parametrize("preset", REAL_PAIR.values())
def test_batched_logits_of_the_real_models_differ_from_alone_by_rounding_only(preset):
    """The batched-vs-alone logit error on these prompts: what a near-tie must fall within."""
    model = HFModel(*loading.load_model(model_files.resolve_model_folder(preset=preset)), preset)
    contexts = []
    for question in QUESTIONS:
        rendered = model.render(PromptSpec(chat=(ChatTurn("user", question),)))
        contexts.append(model.tokenize(rendered.text, rendered.add_special_tokens))
    error = batched_logit_error(model, contexts)
    print(f"\n{preset}: batched vs alone, largest logit difference {error:.2e}")
    assert error < 1e-3
