"""Workers on the vLLM engine (docs/design.md section 4.7) keep the protocol's promises.

One vLLM worker (a tiny byte-level BPE model) serves every test of this module, since its engine
takes 15-21 s to start; a transformers worker (a tiny Gemma-3 model) joins it for the fusions.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import jsonschema
import pytest
from near_ties import batched_logit_error, first_divergence

from coolfusion.cli.cluster import LocalProcess, stop_processes
from coolfusion.client import AsyncFusionClient, FuseOptions, fusion_strategy, json_object, json_schema, regex
from coolfusion.constraints import Constraint, ConstraintKind, TextMatcher
from coolfusion.v1 import worker_pb2, worker_pb2_grpc

from in_process import address, start_local_orchestrator, start_tiny_worker
from reference import ReferenceModel, reference_steps, regex_grammar, schema_grammar
from tiny_models import CORPUS, VLLM_HEAD_DIM, build_tiny_model
from vllm_workers import REPOSITORY, start_vllm_worker
from worker_probes import tiny_references

VLLM_FAMILY, TRANSFORMERS_FAMILY = "bpe", "metaspace"
WORKERS = (VLLM_FAMILY, TRANSFORMERS_FAMILY)  # fusion order: the vLLM worker first
# The opening words of every third sentence the tiny tokenizers were trained on: prompts whose
# greedy continuations mix words, digits and punctuation.
PROMPTS = [" ".join(line.split()[:7]) for line in CORPUS.splitlines()[::3]]
MAX_NEW_TOKENS = 24
# vLLM's CPU blocks hold 32 tokens (worker/vllm/backend.py); contexts of whole blocks are those
# whose every token the prefix cache supplies, the case the scores must repair.
BLOCK = 32
# float32 on both engines: their log-probabilities differ by rounding only (about 1e-5 per token
# measured here); rows of uninitialised memory would be off by whole nats, or not finite.
SCORE_TOLERANCE = 1e-3
RPC_TIMEOUT_S = 60
# Schemas whose answers the tiny models finish within a few dozen tokens: enums, bounded integers,
# booleans, short patterned strings and short arrays, nested and optional fields.
FINITE_SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "city": {"enum": ["Paris", "Rome", "Oslo"]},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "open": {"type": "boolean"},
        },
        "required": ["city", "year", "open"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 3},
    {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
            "where": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"enum": ["up", "down"]}},
                "required": ["x"],
                "additionalProperties": False,
            },
        },
        "required": ["code", "where"],
        "additionalProperties": False,
    },
]
QUANTITY_PATTERN = r"(yes|no), [0-9]{1,3} (apples|pears)\."
# The fusions under a constraint: a schema whose strings give the tiny models choices to make.
PLACE_SCHEMA = {
    "type": "object",
    "properties": {"place": {"type": "string", "maxLength": 12}, "count": {"type": "integer"}},
    "required": ["place", "count"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm_models")
    return {f: build_tiny_model(f, root / f, head_dim=VLLM_HEAD_DIM) for f in WORKERS}


@pytest.fixture(scope="module")
def vllm_worker(model_dirs: dict[str, Path]) -> Iterator[LocalProcess]:
    worker = start_vllm_worker("vllm-worker", model_dirs[VLLM_FAMILY])
    try:
        yield worker
    finally:
        stop_processes([worker])


@pytest.fixture(scope="module")
def references(model_dirs: dict[str, Path]) -> dict[str, ReferenceModel]:
    return tiny_references(model_dirs, WORKERS)


def info(address_: str) -> worker_pb2.GetInfoResponse:
    with grpc.insecure_channel(address_) as channel:
        return worker_pb2_grpc.WorkerServiceStub(channel).GetInfo(worker_pb2.GetInfoRequest(), timeout=RPC_TIMEOUT_S)


def test_the_conformance_suite_passes_against_a_vllm_worker(vllm_worker: LocalProcess) -> None:
    suite = REPOSITORY / "tests" / "conformance"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)]
        + ["--worker-address", vllm_worker.address],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_get_info_names_the_engine_and_its_device(vllm_worker: LocalProcess) -> None:
    described = info(vllm_worker.address)
    assert described.engine == "vllm"
    assert sorted(described.constraint_kinds) == sorted(
        k for k in worker_pb2.ConstraintKind.values() if k != worker_pb2.CONSTRAINT_KIND_UNSPECIFIED
    )
    assert [(p.device, p.parameter_share) for p in described.placement] == [("cpu", 1.0)]
    assert described.dtype == "float32"
    assert described.limits.session_token_budget > 0  # vLLM's KV cache capacity


def _context_of(reference: ReferenceModel, tokens: int) -> str:
    """A plain-text context of exactly `tokens` tokens: the tiny models' corpus cut at the right length."""
    text = CORPUS
    for end in range(1, len(text) + 1):
        if len(reference.ids(text[:end], True)) == tokens and not text[end - 1].isspace():
            return text[:end]
    pytest.fail(f"no prefix of the corpus has exactly {tokens} tokens")


def test_cached_scores_equal_the_reference(vllm_worker: LocalProcess, references: dict[str, ReferenceModel]) -> None:
    """Scores read the context from vLLM's prefix cache, whose rows before the cached length are not
    computed; contexts of whole blocks (every token cached) and the worker's own segment (its
    tokens cached by the generation) need the rows that the backend asks for one by one."""
    reference = references[VLLM_FAMILY]
    with grpc.insecure_channel(vllm_worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        checked = 0
        for tokens in (2 * BLOCK, 2 * BLOCK + 1, 3 * BLOCK - 1, 3 * BLOCK):
            context = _context_of(reference, tokens)
            opened = stub.OpenSession(
                worker_pb2.OpenSessionRequest(session_id=f"score-{tokens}", prompt=worker_pb2.Prompt(text=context)),
                timeout=RPC_TIMEOUT_S,
            )
            assert opened.context_tokens == tokens
            own = stub.GenerateSegment(
                worker_pb2.GenerateSegmentRequest(
                    session_id=opened.session_id, expected_context_tokens=tokens, max_tokens=16
                ),
                timeout=RPC_TIMEOUT_S,
            ).text
            candidates = [(own, False), (" the river bank.", False), (" 42", True), ("", True), (own + " and", False)]
            scored = stub.ScoreText(
                worker_pb2.ScoreTextRequest(
                    session_id=opened.session_id,
                    expected_context_tokens=tokens,
                    candidates=[worker_pb2.Candidate(text=t, ends_with_eos=e) for t, e in candidates],
                ),
                timeout=RPC_TIMEOUT_S,
            )
            stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=opened.session_id), timeout=RPC_TIMEOUT_S)
            for (text, eos), score in zip(candidates, scored.scores):
                perplexity = reference.perplexity(context, True, text, eos)
                expected = -math.log(perplexity) * score.scored_tokens
                assert math.isfinite(score.log_prob_sum)
                assert abs(score.log_prob_sum - expected) <= SCORE_TOLERANCE * score.scored_tokens, (tokens, text, eos)
                checked += 1
    assert checked == 20


def _one_token_texts(reference: ReferenceModel, context: str) -> list[str]:
    """Continuations of `context` that tokenize as one token: the reference's five likeliest."""
    import torch

    ids = reference.ids(context, True)
    with torch.no_grad():
        logits = reference.model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
    texts = [reference.decode(ids + [int(t)])[len(reference.decode(ids)) :] for t in torch.topk(logits, 5).indices]
    return [t for t in texts if t and len(reference.ids(context + t, True)) == len(ids) + 1]


def vllm_logprob_error(address_: str, reference: ReferenceModel, contexts: list[str]) -> float:
    """The largest |log p| difference between the vLLM worker and the reference over one-token
    continuations of `contexts`: the error the engines' numerics add, measured on these inputs."""
    error, measured = 0.0, 0
    with grpc.insecure_channel(address_) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        for i, context in enumerate(contexts):
            texts = _one_token_texts(reference, context)
            opened = stub.OpenSession(
                worker_pb2.OpenSessionRequest(session_id=f"error-{i}", prompt=worker_pb2.Prompt(text=context)),
                timeout=RPC_TIMEOUT_S,
            )
            scored = stub.ScoreText(
                worker_pb2.ScoreTextRequest(
                    session_id=opened.session_id,
                    expected_context_tokens=opened.context_tokens,
                    candidates=[worker_pb2.Candidate(text=t) for t in texts],
                ),
                timeout=RPC_TIMEOUT_S,
            )
            stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=opened.session_id), timeout=RPC_TIMEOUT_S)
            for text, score in zip(texts, scored.scores):
                if score.scored_tokens == 1:  # not a merge across the join: one log-prob, one logit row
                    expected = -math.log(reference.perplexity(context, True, text, False))
                    error = max(error, abs(score.log_prob_sum - expected))
                    measured += 1
    assert measured >= len(contexts), f"only {measured} one-token continuations measured"
    return error


PAPER_OPTIONS = FuseOptions(max_new_tokens=MAX_NEW_TOKENS, trace=True, strategy=fusion_strategy("ppl_mean", "off"))


async def _fuse_mixed(
    model_dirs: dict[str, Path],
    vllm_address: str,
    prompts: list[str],
    cancel_after_s: float | None,
    constraints: list[worker_pb2.Constraint | None] | None = None,
):
    """The prompts at once through an orchestrator over the vLLM worker and an in-process
    transformers worker, each under its constraint in `constraints` if given. With
    `cancel_after_s`, every other request is cancelled after that long. Returns the results (None
    where cancelled), the transformers worker's batched-vs-alone logit error on the answers, and
    each worker's load once the orchestrator has stopped."""
    hf = await start_tiny_worker(model_dirs[TRANSFORMERS_FAMILY], TRANSFORMERS_FAMILY)
    orchestrator = await start_local_orchestrator({VLLM_FAMILY: vllm_address, TRANSFORMERS_FAMILY: address(hf)})
    options = [replace(PAPER_OPTIONS, constraint=c) for c in constraints or [None] * len(prompts)]
    try:
        async with AsyncFusionClient(address(orchestrator), timeout_s=300) as client:
            tasks = [asyncio.create_task(client.fuse(prompt, o)) for prompt, o in zip(prompts, options)]
            if cancel_after_s is not None:
                await asyncio.sleep(cancel_after_s)
                for task in tasks[::2]:
                    task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        model = hf.backend._model  # type: ignore[union-attr]
        answered = [(p, r) for p, r in zip(prompts, results) if not isinstance(r, BaseException)]
        contexts = [model.tokenize(p + r.text, True) for p, r in answered] or [model.tokenize(prompts[0], True)]
        error = batched_logit_error(model, contexts)
        loads = await _wait_for_idle([vllm_address, address(hf)])
        return [None if isinstance(r, BaseException) else r for r in results], error, loads
    finally:
        await orchestrator.stop(0)
        await hf.stop(0)


async def _wait_for_idle(addresses: list[str], timeout_s: float = 30.0) -> list[worker_pb2.WorkerLoad]:
    """Each worker's load once it holds no session and no engine request, or when `timeout_s` ran
    out. Closing is asynchronous (the orchestrator closes a cancelled request's sessions after the
    cancellation reaches it), so this waits for it, bounded: 30 s is far beyond the milliseconds a
    close takes, so that only a session that is never closed fails the test."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = [(await asyncio.to_thread(info, a)).load for a in addresses]
        if all(load.open_sessions == 0 and load.engine_requests == 0 for load in loads):
            return loads
        if time.monotonic() > deadline:
            return loads
        await asyncio.sleep(0.2)


def _assert_the_reference_but_at_near_ties(
    prompts: list[str],
    results: list,
    grammars: list[str | None],
    hf_error: float,
    vllm_address: str,
    references: dict[str, ReferenceModel],
) -> int:
    """Every result equals the cache-free reference's answer (under its grammar, if any) or departs
    from it first at a near-tie (docs/design.md 2.8); returns how many departed."""
    models = [references[f] for f in WORKERS]
    answers = [p + r.text for p, r in zip(prompts, results) if r is not None]
    errors = {
        VLLM_FAMILY: vllm_logprob_error(vllm_address, references[VLLM_FAMILY], prompts + answers),
        TRANSFORMERS_FAMILY: hf_error,
    }
    assert all(error < 1e-3 for error in errors.values()), errors  # rounding, not a bug
    departed = 0
    for prompt, result, grammar in zip(prompts, results, grammars):
        assert result is not None and not result.dropped, (prompt, result)
        shares = {share.worker for share in result.shares if share.segments}
        text, _, steps = reference_steps(models, prompt, MAX_NEW_TOKENS, grammar=grammar)
        if result.text == text:
            assert shares, prompt
            continue
        divergence = first_divergence(result.trace, steps, WORKERS, errors)
        assert divergence is not None, f"texts differ but no step does: {prompt!r}"
        assert divergence.near_tie, f"{prompt!r}: not a near-tie: {divergence}"
        departed += 1
    assert departed <= len(prompts) // 2, f"{departed} answers departed: near-ties are rare, so something is off"
    print(f"\n{departed} of {len(prompts)} answers departed at a near-tie; errors {errors}")
    return departed


def test_a_fusion_mixing_engines_equals_the_reference_but_at_near_ties(
    model_dirs: dict[str, Path], vllm_worker: LocalProcess, references: dict[str, ReferenceModel]
) -> None:
    results, hf_error, loads = asyncio.run(_fuse_mixed(model_dirs, vllm_worker.address, PROMPTS, None))
    _assert_the_reference_but_at_near_ties(
        PROMPTS, results, [None] * len(PROMPTS), hf_error, vllm_worker.address, references
    )
    assert [(load.open_sessions, load.engine_requests) for load in loads] == [(0, 0), (0, 0)]


def test_constrained_and_free_fusions_at_once_equal_the_reference_but_at_near_ties(
    model_dirs: dict[str, Path], vllm_worker: LocalProcess, references: dict[str, ReferenceModel]
) -> None:
    """Constrained requests beside free ones in the same vLLM batches: each constrained answer is
    the reference's under its grammar, and the free ones are unchanged (a mask on the wrong row of
    the batch would show in either)."""
    place = (json_schema(PLACE_SCHEMA), schema_grammar(PLACE_SCHEMA))
    quantity = (regex(QUANTITY_PATTERN), regex_grammar(QUANTITY_PATTERN))
    held = [place, None, quantity, None] * (len(PROMPTS) // 4)
    constraints = [None if h is None else h[0] for h in held]
    results, hf_error, loads = asyncio.run(_fuse_mixed(model_dirs, vllm_worker.address, PROMPTS, None, constraints))
    grammars = [None if h is None else h[1] for h in held]
    _assert_the_reference_but_at_near_ties(PROMPTS, results, grammars, hf_error, vllm_worker.address, references)
    for result, proto in zip(results, constraints):
        if proto is None:
            continue
        cut = result.finish_reason == worker_pb2.FINISH_REASON_LENGTH
        assert TextMatcher.of(_constraint(proto)).allows(result.text, ends=not cut) is None, result.text
        assert not cut or proto.kind != worker_pb2.CONSTRAINT_KIND_REGEX, result.text  # a short language
    assert [(load.open_sessions, load.engine_requests) for load in loads] == [(0, 0), (0, 0)]


def _constraint(proto: worker_pb2.Constraint) -> Constraint:
    kinds = {
        worker_pb2.CONSTRAINT_KIND_JSON_SCHEMA: ConstraintKind.JSON_SCHEMA,
        worker_pb2.CONSTRAINT_KIND_JSON_OBJECT: ConstraintKind.JSON_OBJECT,
        worker_pb2.CONSTRAINT_KIND_REGEX: ConstraintKind.REGEX,
    }
    return Constraint(kinds[proto.kind], proto.definition)


def test_reopened_and_rolled_back_sessions_keep_their_constraint(vllm_worker: LocalProcess) -> None:
    """A session's segments stay within its constraint whether its running request serves them
    (its own segment appended), another text is appended (another worker's segment won), it is
    re-opened, or the answer is rolled back to an earlier point in a new session: each gives what
    a session opened afresh at that answer gives."""
    proto = json_schema(PLACE_SCHEMA)
    checker = TextMatcher.of(_constraint(proto))
    with grpc.insecure_channel(vllm_worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)

        def open_at(session_id: str, answer: str) -> worker_pb2.OpenSessionResponse:
            request = worker_pb2.OpenSessionRequest(
                session_id=session_id, prompt=worker_pb2.Prompt(text=PROMPTS[1]), answer_text=answer, constraint=proto
            )
            return stub.OpenSession(request, timeout=RPC_TIMEOUT_S)

        def segment(session_id: str, context: int, append: str = "") -> worker_pb2.GenerateSegmentResponse:
            request = worker_pb2.GenerateSegmentRequest(
                session_id=session_id, expected_context_tokens=context, append_text=append, max_tokens=16
            )
            return stub.GenerateSegment(request, timeout=RPC_TIMEOUT_S)

        def first_segment_at(session_id: str, answer: str) -> str:
            text = segment(session_id, open_at(session_id, answer).context_tokens).text
            stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=session_id), timeout=RPC_TIMEOUT_S)
            return text

        # A chain of segments, each appended by the next call, as when this worker's segments win.
        context, answer, append, chain = open_at("chain", "").context_tokens, "", "", []
        for _ in range(5):
            generated = segment("chain", context, append)
            answer, context, append = answer + append, generated.context_tokens, generated.text
            chain.append(generated.text)
            ends = generated.finish_reason == worker_pb2.FINISH_REASON_EOS
            assert checker.allows(answer + generated.text, ends=ends) is None, (answer, generated.text)
            if ends:
                break
        assert len(chain) >= 3, chain
        # Re-opening the same context changes nothing: the chain goes on where it was.
        assert open_at("chain", answer).context_tokens == context
        assert segment("chain", context, append).text == first_segment_at("fresh-end", answer + append)
        stub.CloseSession(worker_pb2.CloseSessionRequest(session_id="chain"), timeout=RPC_TIMEOUT_S)
        # Rolled back: a session at an earlier answer continues as the chain did from there.
        assert first_segment_at("rolled-back", chain[0] + chain[1]) == chain[2]
        # Another text appended than the segment generated: the guide follows the text.
        opened = open_at("other", '{"place": "')
        segment("other", opened.context_tokens)
        other = segment("other", opened.context_tokens, 'Oslo", "count": ')
        assert checker.allows('{"place": "Oslo", "count": ' + other.text) is None, other.text
        assert other.text == first_segment_at("fresh-other", '{"place": "Oslo", "count": ')
        stub.CloseSession(worker_pb2.CloseSessionRequest(session_id="other"), timeout=RPC_TIMEOUT_S)
        # An answer outside the language is refused before any work.
        with pytest.raises(grpc.RpcError) as refused:
            open_at("outside", "place: Oslo")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info(vllm_worker.address).load.open_sessions == 0


def test_a_burst_with_cancellations_leaves_no_session_and_no_vllm_request(
    model_dirs: dict[str, Path], vllm_worker: LocalProcess
) -> None:
    prompts = PROMPTS * 2  # 16 concurrent fusions; every other one cancelled while it runs
    constraints = [None, None, json_schema(PLACE_SCHEMA), json_schema(PLACE_SCHEMA)] * (len(prompts) // 4)
    results, _, loads = asyncio.run(
        _fuse_mixed(model_dirs, vllm_worker.address, prompts, cancel_after_s=1.0, constraints=constraints)
    )
    completed = [r for r in results if r is not None]
    assert len(completed) == len(prompts) // 2 and all(not r.dropped for r in completed)
    assert [(load.open_sessions, load.engine_requests) for load in loads] == [(0, 0), (0, 0)]


async def _fuse_alone(vllm_address: str, requests: list[tuple[str, worker_pb2.Constraint]], max_new_tokens: int):
    """The requests at once through an orchestrator over the vLLM worker alone."""
    orchestrator = await start_local_orchestrator({VLLM_FAMILY: vllm_address})
    try:
        async with AsyncFusionClient(address(orchestrator), timeout_s=300) as client:
            options = FuseOptions(max_new_tokens=max_new_tokens)
            return await asyncio.gather(
                *(client.fuse(prompt, replace(options, constraint=c)) for prompt, c in requests)
            )
    finally:
        await orchestrator.stop(0)


def test_a_vllm_worker_alone_keeps_every_answer_to_its_constraint(vllm_worker: LocalProcess) -> None:
    """Every answer is within its language (the orchestrator would drop a worker whose proposal
    left it), and every answer the token cap did not cut parses and validates."""
    constraints = [json_schema(schema) for schema in FINITE_SCHEMAS] + [regex(QUANTITY_PATTERN), json_object()]
    requests = [(prompt, c) for c in constraints for prompt in PROMPTS[:3]]
    results = asyncio.run(_fuse_alone(vllm_worker.address, requests, max_new_tokens=96))
    finished = 0
    for (prompt, proto), result in zip(requests, results):
        constraint = _constraint(proto)
        assert not result.dropped, (prompt, constraint, result.dropped)
        cut = result.finish_reason == worker_pb2.FINISH_REASON_LENGTH
        assert TextMatcher.of(constraint).allows(result.text, ends=not cut) is None, (constraint, result.text)
        if cut:
            continue
        finished += 1
        if constraint.kind == ConstraintKind.REGEX:
            assert re.fullmatch(QUANTITY_PATTERN, result.text), result.text
        else:
            value = json.loads(result.text)
            jsonschema.validate(value, json.loads(constraint.definition or '{"type": "object"}'))
    # Every finite language finished: the check above ran, not only the prefix check.
    assert finished >= len(requests) - len(PROMPTS[:3]), [(r.finish_reason, r.text) for r in results]
    print(f"\n{finished} of {len(requests)} answers finished, for example {results[0].text!r}")


def test_sampled_segments_depend_on_their_seed_alone(vllm_worker: LocalProcess) -> None:
    """A sampled segment (docs/design.md chapter 10) is drawn from a generator of its call alone:
    the same seed gives the same segment whether it runs alone or beside greedy and other sampled
    sessions, other seeds give other segments, temperature 0 is the greedy segment, and a session
    goes on greedily after a sampled segment as one that never sampled."""
    prompt = PROMPTS[2]

    def sampled(seed: int, temperature: float = 1.5) -> worker_pb2.SegmentSampling:
        return worker_pb2.SegmentSampling(temperature=temperature, top_p=0.95, top_k=40, seed=seed)

    with grpc.insecure_channel(vllm_worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)

        def segments(session_id: str, *samplings: worker_pb2.SegmentSampling | None) -> list[str]:
            opened = stub.OpenSession(
                worker_pb2.OpenSessionRequest(session_id=session_id, prompt=worker_pb2.Prompt(text=prompt)),
                timeout=RPC_TIMEOUT_S,
            )
            context, append, texts = opened.context_tokens, "", []
            for sampling in samplings:
                request = worker_pb2.GenerateSegmentRequest(
                    session_id=session_id, expected_context_tokens=context, append_text=append, max_tokens=16
                )
                if sampling is not None:
                    request.sampling.CopyFrom(sampling)
                generated = stub.GenerateSegment(request, timeout=RPC_TIMEOUT_S)
                context, append = generated.context_tokens, generated.text
                texts.append(generated.text)
            stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=session_id), timeout=RPC_TIMEOUT_S)
            return texts

        alone = {seed: segments(f"alone-{seed}", sampled(seed), sampled(seed + 100)) for seed in range(6)}
        with ThreadPoolExecutor(12) as pool:
            beside = {
                seed: pool.submit(segments, f"beside-{seed}", sampled(seed), sampled(seed + 100)) for seed in range(6)
            }
            greedy = [pool.submit(segments, f"greedy-{i}", None, None, None) for i in range(6)]
            beside_texts = {seed: future.result() for seed, future in beside.items()}
            greedy_texts = [future.result() for future in greedy]
        assert beside_texts == alone
        assert len({tuple(texts) for texts in alone.values()}) >= 2, alone
        assert len({tuple(texts) for texts in greedy_texts}) == 1
        assert segments("zero", sampled(3, temperature=0.0), None, None) == greedy_texts[0]
        # A greedy segment after a sampled one: what a greedy session at that answer generates.
        first, after = segments("after-sampled", sampled(4), None)
        assert first == alone[4][0]
        fresh = stub.OpenSession(
            worker_pb2.OpenSessionRequest(session_id="fresh", prompt=worker_pb2.Prompt(text=prompt), answer_text=first),
            timeout=RPC_TIMEOUT_S,
        )
        request = worker_pb2.GenerateSegmentRequest(
            session_id="fresh", expected_context_tokens=fresh.context_tokens, max_tokens=16
        )
        assert stub.GenerateSegment(request, timeout=RPC_TIMEOUT_S).text == after
        stub.CloseSession(worker_pb2.CloseSessionRequest(session_id="fresh"), timeout=RPC_TIMEOUT_S)
    assert info(vllm_worker.address).load.open_sessions == 0
