"""Concurrent fusions, batched inside the workers, against the cache-free reference.

Every answer must equal the reference's, except where batching's float rounding flips a near-tie:
at the first step where an answer departs, the reference's own margin there must be within what
the batched-vs-alone logit error (measured here, on these prompts) can move.
"""

from __future__ import annotations

import asyncio

import pytest
from near_ties import batched_logit_error, first_divergence

from coolfusion.client import AsyncFusionClient, FuseOptions, fusion_strategy
from coolfusion.v1 import orchestrator_pb2

from in_process import address, start_local_orchestrator, start_tiny_worker
from reference import reference_steps
from worker_probes import tiny_references

FAMILIES = ("bpe", "metaspace", "char")
PROMPTS = [
    "Tom has 3 apples and buys 4 more. How many apples does Tom have now?",
    "The weather today is",
    "Question: what is 19 and 23?\nAnswer:",
    "A train travels 60 miles per hour for 2 hours.",
    "Every morning the baker makes 48 loaves of bread and sells",
    "Write a short poem about the sea.",
    "Sam had 25 dollars. He spent 9 dollars on lunch and",
    "Birds sing in the trees while",
    "What is 100 minus 37? It is",
    "The library opens at 9 and",
    "If a box holds 8 pencils, then 5 boxes",
    "Our team will meet at",
]
MAX_NEW_TOKENS = 24


async def fuse_concurrently(tiny_model_dirs) -> tuple[list[orchestrator_pb2.FuseResult], dict[str, float], int]:
    """All prompts at once through an orchestrator over in-process workers; also the measured
    logit error per worker and the largest batch any worker ran."""
    workers = {f: await start_tiny_worker(tiny_model_dirs[f], f) for f in FAMILIES}
    largest = {f: 0 for f in FAMILIES}
    for name, worker in workers.items():
        worker.backend.observe_passes(lambda stats, n=name: largest.__setitem__(n, max(largest[n], stats.sessions)))
    orchestrator = await start_local_orchestrator({f: address(w) for f, w in workers.items()})
    options = FuseOptions(
        max_new_tokens=MAX_NEW_TOKENS, trace=True, strategy=fusion_strategy("ppl_mean", "off")
    )  # the paper's rule, which the reference implements
    try:
        async with AsyncFusionClient(address(orchestrator), timeout_s=300) as client:
            results = await asyncio.gather(*(client.fuse(prompt, options) for prompt in PROMPTS))
        errors = {}
        for name, worker in workers.items():
            model = worker.backend._model
            contexts = [model.tokenize(p + r.text, True) for p, r in zip(PROMPTS, results)]
            errors[name] = batched_logit_error(model, contexts)
        return list(results), errors, min(largest.values())
    finally:
        await orchestrator.stop(0)
        for worker in workers.values():
            await worker.stop(0)


def test_concurrent_fusions_equal_the_reference_up_to_near_ties(tiny_model_dirs):
    results, errors, smallest_batch_peak = asyncio.run(fuse_concurrently(tiny_model_dirs))
    assert smallest_batch_peak >= 4, "the workers never batched: this test would test nothing"
    assert all(error < 1e-3 for error in errors.values()), errors  # rounding, not a bug
    references = tiny_references(tiny_model_dirs, FAMILIES)
    models = [references[f] for f in FAMILIES]
    divergences = []
    for prompt, result in zip(PROMPTS, results):
        assert not result.dropped
        text, _, steps = reference_steps(models, prompt, MAX_NEW_TOKENS)
        if result.text == text:
            continue
        divergence = first_divergence(result.trace, steps, FAMILIES, errors)
        assert divergence is not None, f"texts differ but no step does: {prompt!r}"
        assert divergence.near_tie, f"{prompt!r}: not a near-tie: {divergence}"
        divergences.append(divergence)
    print(f"\n{len(divergences)} of {len(PROMPTS)} answers departed at a near-tie; logit errors {errors}")


def as_service_steps(steps, workers) -> list[orchestrator_pb2.FuseStep]:
    """The reference's steps, written as the service reports them in its trace."""
    return [
        orchestrator_pb2.FuseStep(
            candidates=[
                orchestrator_pb2.StepCandidate(
                    text=text,
                    ends_with_eos=eos,
                    proposed_by=[name for name, segment in zip(workers, step.segments) if segment == (text, eos)],
                )
                for text, eos in step.candidates
            ],
            winner_index=step.winner,
        )
        for step in steps
    ]


@pytest.mark.parametrize("kind", ["segment", "score"])
def test_a_departure_that_is_not_a_near_tie_is_caught(tiny_model_dirs, kind):
    """The check above can fail: a made-up departure far beyond a tiny error is flagged."""
    workers = ("bpe", "char")
    references = tiny_references(tiny_model_dirs, workers)
    _, _, steps = reference_steps([references[w] for w in workers], PROMPTS[0], 12)
    service = as_service_steps(steps, workers)
    assert first_divergence(service, steps, workers, {"bpe": 1e-6, "char": 1e-6}) is None
    if kind == "segment":
        changed = 0
        service[0].candidates[0].text += "!"
    else:
        changed = next(i for i, step in enumerate(steps) if len(step.candidates) > 1)
        service[changed].winner_index = (steps[changed].winner + 1) % len(steps[changed].candidates)
    divergence = first_divergence(service, steps, workers, {"bpe": 1e-6, "char": 1e-6})
    assert divergence is not None
    assert (divergence.step, divergence.kind, divergence.near_tie) == (changed, kind, False)
