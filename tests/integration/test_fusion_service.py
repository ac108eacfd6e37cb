"""The orchestrator over real worker processes equals the cache-free reference, and degrades well."""

from __future__ import annotations

import asyncio
import math
import socket
import time

import grpc
import pytest

from coolfusion.cli.cluster import launch, orchestrator_argv, orchestrator_env, stop_processes, wait_ready
from coolfusion.orchestrator.domain import Prompt
from coolfusion.orchestrator.fusion import FusionRequest, fuse
from coolfusion.orchestrator.worker_client import WorkerClient
from coolfusion.v1 import orchestrator_pb2 as opb
from coolfusion.v1 import orchestrator_pb2_grpc, worker_pb2, worker_pb2_grpc

from reference import PAPER_STRATEGY, ReferenceModel, reference_fuse
from worker_probes import open_sessions, tiny_references, wait_for_no_sessions

FAMILIES = ("bpe", "metaspace", "char")
PROMPTS = [
    "Tom has 3 apples and buys 4 more.",
    "Question: Lily has 5 red balls and 8 blue balls. How many balls in all?\nAnswer:",
    [{"role": "user", "content": "What is 100 minus 37?"}],
]


@pytest.fixture(scope="module")
def orchestrator(tiny_trio):
    with grpc.insecure_channel(tiny_trio.address) as channel:
        yield orchestrator_pb2_grpc.OrchestratorServiceStub(channel)


@pytest.fixture(scope="module")
def references(tiny_model_dirs) -> dict[str, ReferenceModel]:
    return tiny_references(tiny_model_dirs, FAMILIES)


def to_prompt(prompt) -> worker_pb2.Prompt:
    if isinstance(prompt, str):
        return worker_pb2.Prompt(text=prompt)
    messages = [worker_pb2.ChatMessage(**m) for m in prompt]
    return worker_pb2.Prompt(chat=worker_pb2.ChatConversation(messages=messages))


def parameters(prompt, strategy=PAPER_STRATEGY, **kwargs) -> opb.FusionParameters:
    """The paper's rule unless a test asks for another, since that is what the reference does."""
    return opb.FusionParameters(prompt=to_prompt(prompt), strategy=strategy, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("prompt", PROMPTS, ids=["text", "few-shot", "chat"])
def test_fused_text_equals_the_cache_free_reference(orchestrator, references, prompt):
    result = orchestrator.Fuse(opb.FuseRequest(parameters=parameters(prompt, max_new_tokens=24)), timeout=120).result
    expected, finish = reference_fuse([references[f] for f in FAMILIES], prompt, max_new_tokens=24)
    assert result.text == expected
    assert worker_pb2.FinishReason.Name(result.finish_reason).endswith(finish.upper())
    assert sum(s.segments for s in result.shares) == result.timings.steps
    assert not result.dropped


def test_a_subset_in_another_order_equals_the_reference_in_that_order(orchestrator, references):
    names = ["char", "bpe"]
    request = opb.FuseRequest(parameters=parameters(PROMPTS[0], workers=names, max_new_tokens=20))
    result = orchestrator.Fuse(request, timeout=120).result
    assert result.text == reference_fuse([references[n] for n in names], PROMPTS[0], max_new_tokens=20)[0]
    assert [s.worker for s in result.shares] == names


def test_one_worker_gives_its_own_greedy_answer_without_scoring(orchestrator, references):
    request = opb.FuseRequest(parameters=parameters(PROMPTS[1], workers=["metaspace"], max_new_tokens=20))
    result = orchestrator.Fuse(request, timeout=120).result
    assert result.text == reference_fuse([references["metaspace"]], PROMPTS[1], max_new_tokens=20)[0]
    assert result.timings.score_ms == 0
    assert result.shares[0].segments == result.timings.steps


def test_stop_string_ends_the_answer_before_it(orchestrator, references):
    free = orchestrator.Fuse(opb.FuseRequest(parameters=parameters(PROMPTS[0], max_new_tokens=24)), timeout=120)
    words = free.result.text.split()
    stop = words[len(words) // 2]
    request = opb.FuseRequest(parameters=parameters(PROMPTS[0], max_new_tokens=24, stop_strings=[stop]))
    result = orchestrator.Fuse(request, timeout=120).result
    expected, finish = reference_fuse([references[f] for f in FAMILIES], PROMPTS[0], 24, (stop,))
    assert (result.text, finish) == (expected, "stop")
    assert result.finish_reason == worker_pb2.FINISH_REASON_STOP and stop not in result.text


def test_cool_r_returns_the_best_full_answer_by_mean_perplexity(orchestrator, references):
    request = opb.FuseRequest(
        parameters=parameters(PROMPTS[0], max_new_tokens=16, rerank_mode=opb.RERANK_MODE_FULL_ANSWER)
    )
    result = orchestrator.Fuse(request, timeout=300).result
    assert [r.source for r in result.rerank][:0] == [] and len(result.rerank) == len(FAMILIES) + 1
    assert {r.source for r in result.rerank} == {"fused", *FAMILIES}
    assert result.text == result.rerank[0].text and result.source == result.rerank[0].source
    models = [references[f] for f in FAMILIES]
    fused_text = reference_fuse(models, PROMPTS[0], 16)[0]
    assert next(r.text for r in result.rerank if r.source == "fused") == fused_text
    for entry in result.rerank:
        solo = fused_text if entry.source == "fused" else reference_fuse([references[entry.source]], PROMPTS[0], 16)[0]
        assert entry.text == solo
        eos = False  # 16 tokens end by length for these models; checked by the equality above
        expected = sum(m.perplexity(PROMPTS[0], True, entry.text, eos) for m in models) / len(models)
        assert entry.fused_score == pytest.approx(expected, rel=1e-4)
    assert [r.fused_score for r in result.rerank] == sorted(r.fused_score for r in result.rerank)


def test_nll_mean_with_weights_equals_the_reference_with_that_aggregation(orchestrator, references):
    weights = {"bpe": 2.0, "metaspace": 1.0, "char": 0.5}
    strategy = opb.FusionStrategy(aggregation=opb.AGGREGATION_NLL_MEAN, worker_weights=weights)
    result = orchestrator.Fuse(opb.FuseRequest(parameters=parameters(PROMPTS[1], max_new_tokens=24, strategy=strategy)))

    def weighted_geometric_mean(perplexities: list[float]) -> float:
        logs = [w * math.log(p) for w, p in zip(weights.values(), perplexities)]
        return math.exp(sum(logs) / sum(weights.values()))

    models = [references[f] for f in FAMILIES]
    assert result.result.text == reference_fuse(models, PROMPTS[1], 24, aggregate=weighted_geometric_mean)[0]
    assert result.result.strategy.aggregation == opb.AGGREGATION_NLL_MEAN
    assert dict(result.result.strategy.worker_weights) == weights
    paper = orchestrator.Fuse(opb.FuseRequest(parameters=parameters(PROMPTS[1], max_new_tokens=24))).result
    assert paper.text != result.result.text, "the prompt was chosen so that the aggregation changes the answer"


def test_proposer_counts_each_workers_score_of_its_own_proposal_three_times(orchestrator):
    strategy = opb.FusionStrategy(aggregation=opb.AGGREGATION_PROPOSER)
    params = parameters(PROMPTS[1], max_new_tokens=24, strategy=strategy, include_trace=True)
    result = orchestrator.Fuse(opb.FuseRequest(parameters=params), timeout=120).result

    def proposer_score(scores, proposed_by) -> float:
        weights = [3.0 if s.worker in proposed_by else 1.0 for s in scores]
        return math.exp(sum(w * math.log(s.perplexity) for w, s in zip(weights, scores)) / sum(weights))

    scored = [step for step in result.trace if len(step.candidates) > 1]
    assert scored and result.strategy.aggregation == opb.AGGREGATION_PROPOSER
    for step in scored:
        for candidate in step.candidates:
            assert candidate.fused_score == pytest.approx(proposer_score(candidate.scores, candidate.proposed_by))
        assert step.candidates[step.winner_index].fused_score == min(c.fused_score for c in step.candidates)


def test_a_request_without_a_strategy_gets_the_orchestrators_default(orchestrator):
    params = opb.FusionParameters(prompt=to_prompt(PROMPTS[0]), max_new_tokens=4)
    strategy = orchestrator.Fuse(opb.FuseRequest(parameters=params)).result.strategy
    assert (strategy.aggregation, strategy.repetition_guard) == (opb.AGGREGATION_NLL_MEAN, opb.REPETITION_GUARD_STOP)


@pytest.mark.parametrize("guard", [opb.REPETITION_GUARD_STOP, opb.REPETITION_GUARD_STEER])
def test_repetition_guard_ends_a_looping_answer(orchestrator, guard):
    # This tiny model falls into " then a then a ..." after this prompt; alone, it has no other
    # candidate to steer to, so STEER stops as STOP does.
    prompt, workers = "a b a b a b a b a b a b", ["metaspace"]
    loose = orchestrator.Fuse(opb.FuseRequest(parameters=parameters(prompt, workers=workers, max_new_tokens=100)))
    strategy = opb.FusionStrategy(repetition_guard=guard)
    params = parameters(prompt, workers=workers, max_new_tokens=100, strategy=strategy)
    guarded = orchestrator.Fuse(opb.FuseRequest(parameters=params)).result
    assert _ends_in_a_repeat(loose.result.text[:80])
    assert guarded.finish_reason == worker_pb2.FINISH_REASON_REPETITION
    assert loose.result.text.startswith(guarded.text) and guarded.text.endswith("p then a")  # one copy kept
    assert not _ends_in_a_repeat(guarded.text), guarded.text


def _ends_in_a_repeat(text: str, length: int = 32) -> bool:
    """Whether some 32-character tail of a prefix of `text` occurs earlier in that prefix."""
    return any(text[end - length : end] in text[: end - 1] for end in range(length + 1, len(text) + 1))


def test_a_prompt_template_gives_that_worker_plain_text(orchestrator, references):
    template = "Answer briefly.\n{prompt}\n"
    strategy = opb.FusionStrategy(prompt_templates={"char": template})
    params = parameters(PROMPTS[2], workers=["char"], max_new_tokens=16, strategy=strategy)
    result = orchestrator.Fuse(opb.FuseRequest(parameters=params)).result
    plain = template.replace("{prompt}", PROMPTS[2][0]["content"])
    assert result.text == reference_fuse([references["char"]], plain, max_new_tokens=16)[0]
    assert dict(result.strategy.prompt_templates) == {"char": template}


def test_stream_sends_each_step_then_a_summary_equal_to_unary(orchestrator):
    params = parameters(PROMPTS[0], max_new_tokens=20)
    events = list(orchestrator.FuseStream(opb.FuseStreamRequest(parameters=params), timeout=120))
    steps, summary = events[:-1], events[-1]
    assert all(e.WhichOneof("event") == "step" for e in steps) and summary.WhichOneof("event") == "summary"
    winners = "".join(e.step.candidates[e.step.winner_index].text for e in steps)
    assert winners == summary.summary.text
    assert summary.summary.text == orchestrator.Fuse(opb.FuseRequest(parameters=params), timeout=120).result.text
    scored = [e.step for e in steps if len(e.step.candidates) > 1]
    assert scored, "with three different models some steps must be scored"
    for step in scored:
        winner = step.candidates[step.winner_index]
        assert winner.fused_score == min(c.fused_score for c in step.candidates)
        assert {s.worker for s in winner.scores} == set(FAMILIES)


def test_sessions_are_closed_after_requests_and_after_a_cancelled_stream(orchestrator, tiny_trio):
    orchestrator.Fuse(opb.FuseRequest(parameters=parameters(PROMPTS[2], max_new_tokens=8)), timeout=120)
    assert wait_for_no_sessions(list(tiny_trio.workers.values())) == [0, 0, 0]
    stream = orchestrator.FuseStream(
        opb.FuseStreamRequest(parameters=parameters(PROMPTS[0], max_new_tokens=400)), timeout=120
    )
    next(stream)
    assert any(open_sessions(tiny_trio.workers.values()))
    stream.cancel()
    assert wait_for_no_sessions(list(tiny_trio.workers.values())) == [0, 0, 0]


def test_a_passed_deadline_fails_the_request_and_closes_its_sessions(orchestrator, tiny_trio):
    with pytest.raises(grpc.RpcError) as error:
        orchestrator.Fuse(opb.FuseRequest(parameters=parameters(PROMPTS[0], max_new_tokens=400)), timeout=1.0)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for_no_sessions(list(tiny_trio.workers.values())) == [0, 0, 0]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (opb.FusionParameters(), "prompt must be non-empty"),
        (parameters("  "), "prompt must be non-empty"),
        (parameters("hi", workers=["nope"]), "unknown workers: nope"),
        (parameters("hi", workers=["bpe", "bpe"]), "named twice"),
        (parameters("hi", max_new_tokens=100_000), "max_new_tokens is 100000"),
        (parameters("hi", segment_max_tokens=65), "segment_max_tokens is 65"),
        (parameters("hi", stop_strings=["x" * 65]), "stop string"),
        (parameters([{"role": "robot", "content": "hi"}]), "roles"),
        (parameters("hi", strategy=opb.FusionStrategy(worker_weights={"bpe": 0.0})), "worker_weights['bpe'] is 0"),
        (parameters("hi", strategy=opb.FusionStrategy(worker_weights={"nope": 1.0})), "unknown workers ['nope']"),
        (parameters("hi", strategy=opb.FusionStrategy(prompt_templates={"bpe": "no slot"})), "must contain {prompt}"),
        (parameters("hi", strategy=opb.FusionStrategy(aggregation=99)), "unknown Aggregation value 99"),
    ],
)
def test_invalid_requests_get_invalid_argument_saying_what_was_wrong(orchestrator, params, message):
    with pytest.raises(grpc.RpcError) as error:
        orchestrator.Fuse(opb.FuseRequest(parameters=params), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_list_workers_reports_health_and_info(orchestrator):
    workers = orchestrator.ListWorkers(opb.ListWorkersRequest(), timeout=10).workers
    assert [w.name for w in workers] == list(FAMILIES)
    assert all(w.serving and w.info.protocol_version == "coolfusion.v1" for w in workers)


def start_orchestrator(workers: dict[str, str], extra: list[str] = ()):
    return wait_ready(launch("orchestrator-2", orchestrator_argv(extra), env=orchestrator_env(workers)), 60)


def test_the_orchestrators_own_request_timeout_is_deadline_exceeded(tiny_trio):
    """Without a caller deadline the orchestrator's --request-timeout-s applies; running out of
    time is DEADLINE_EXCEEDED (not UNAVAILABLE, which would read as "workers are down")."""
    workers = {f: tiny_trio.workers[f].address for f in FAMILIES}
    process = start_orchestrator(workers, ["--request-timeout-s", "1"])
    try:
        with grpc.insecure_channel(process.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Fuse(opb.FuseRequest(parameters=parameters(PROMPTS[0], max_new_tokens=4000)))
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "longer than 1 s" in error.value.details()
    finally:
        stop_processes([process])
    assert wait_for_no_sessions(list(tiny_trio.workers.values())) == [0, 0, 0]


def test_an_unreachable_worker_is_dropped_and_the_rest_still_fuse(tiny_trio, references):
    ghost = f"127.0.0.1:{free_port()}"
    process = start_orchestrator(
        {"bpe": tiny_trio.workers["bpe"].address, "ghost": ghost, "char": tiny_trio.workers["char"].address}
    )
    try:
        with grpc.insecure_channel(process.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            result = stub.Fuse(
                opb.FuseRequest(parameters=parameters(PROMPTS[0], max_new_tokens=16)), timeout=120
            ).result
            assert [(d.worker, d.reason.split(":")[0]) for d in result.dropped] == [("ghost", "UNAVAILABLE")]
            assert result.text == reference_fuse([references["bpe"], references["char"]], PROMPTS[0], 16)[0]
            ghosts_only = opb.FuseRequest(parameters=parameters(PROMPTS[0], workers=["ghost"]))
            with pytest.raises(grpc.RpcError) as error:
                stub.Fuse(ghosts_only, timeout=30)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no workers left: ghost: UNAVAILABLE" in error.value.details()
    finally:
        stop_processes([process])


def test_a_lost_session_is_reopened_with_the_full_text(tiny_trio, references):
    """Closes a worker's session behind the orchestrator's back mid-request: the answer is unchanged."""

    async def run() -> str:
        channels = {f: grpc.aio.insecure_channel(tiny_trio.workers[f].address) for f in FAMILIES}
        clients = [WorkerClient(f, channels[f]) for f in FAMILIES]
        request = FusionRequest(Prompt(text=PROMPTS[0]), 24, (), 16, False, "lost-session-test")
        victim = worker_pb2_grpc.WorkerServiceStub(channels["bpe"])

        async def on_step(step) -> None:
            if step.index in (1, 3):
                closed = await victim.CloseSession(
                    worker_pb2.CloseSessionRequest(session_id="lost-session-test.fused.bpe")
                )
                assert closed.closed

        result = await fuse(clients, request, time.monotonic() + 120, 60, on_step)
        for channel in channels.values():
            await channel.close()
        return result.text

    assert asyncio.run(run()) == reference_fuse([references[f] for f in FAMILIES], PROMPTS[0], 24)[0]
