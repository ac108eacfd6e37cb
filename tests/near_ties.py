"""Telling a batching near-tie from a wrong answer.

When a worker batches sessions into one forward pass, float32 results can differ from a session
served alone in the last bits. A greedy choice may then flip, but only where the two best options
were closer than that error. So where a service's fused answer first departs from the cache-free
reference (tests/reference.py), the reference's own margin at that point must be within what the
measured batched-vs-alone logit error can move.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coolfusion.v1 import orchestrator_pb2
from coolfusion.worker.hf.kv import SessionKV
from coolfusion.worker.hf.model import Feed, HFModel

from reference import ReferenceStep


@dataclass(frozen=True)
class Divergence:
    """The first step where the service and the reference part ways."""

    step: int
    kind: str  # "segment": a worker's greedy token flipped; "score": the fused ranking flipped
    margin: float  # the reference's margin there (logit gap, or relative fused-score gap)
    bound: float  # how far the measured error can move that margin
    detail: str

    @property
    def near_tie(self) -> bool:
        return self.margin <= self.bound


def batched_logit_error(model: HFModel, contexts: Sequence[list[int]]) -> float:
    """Largest |logit| difference between each context's next-token logits computed alone and in
    one packed pass with all the others: the error batching adds, measured on these inputs."""
    alone = [model.forward([Feed(SessionKV(), 0, ids, (len(ids) - 1,))])[0] for ids in contexts]
    together = model.forward([Feed(SessionKV(), 0, ids, (len(ids) - 1,)) for ids in contexts])
    return max(float((a - b).abs().max()) for a, b in zip(alone, together))


def first_divergence(
    service: Sequence[orchestrator_pb2.FuseStep],
    reference: Sequence[ReferenceStep],
    workers: Sequence[str],
    logit_error: dict[str, float],
) -> Divergence | None:
    """Where the service's steps first differ from the reference's (None if they never do)."""
    for index, (ours, theirs) in enumerate(zip(service, reference)):
        proposed = {name: (c.text, c.ends_with_eos) for c in ours.candidates for name in c.proposed_by}
        for k, name in enumerate(workers):
            if proposed[name] != theirs.segments[k]:
                return Divergence(
                    index, "segment", theirs.margins[k], 2 * logit_error[name],
                    f"{name} proposed {proposed[name]!r}, the reference {theirs.segments[k]!r}",
                )  # fmt: skip
        winner = ours.candidates[ours.winner_index]
        chosen = theirs.candidates.index((winner.text, winner.ends_with_eos))
        if chosen != theirs.winner:
            best, other = theirs.fused[theirs.winner], theirs.fused[chosen]
            # Each log-perplexity moves by at most about twice the logit error; a ratio of two
            # fused scores by at most twice that.
            return Divergence(
                index, "score", abs(other - best) / min(best, other), 4 * max(logit_error.values()),
                f"the service chose {winner.text!r}, the reference {theirs.candidates[theirs.winner][0]!r}",
            )  # fmt: skip
    if len(service) != len(reference):
        return Divergence(len(min(service, reference, key=len)), "length", float("inf"), 0.0, "step counts differ")
    return None
