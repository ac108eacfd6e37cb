"""Replaying a fusion tree offline (docs/design.md section 3.7): the answer that a fusion of some of
the tree's workers, under some strategy, would have given, and Cool+R's choice, without asking any
worker again. The rules are FusionLoop's, read off the tree."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coolfusion.orchestrator.domain import Finish, FusionTree, StepCandidate, TreeNode
from coolfusion.orchestrator.fusion import winner_index
from coolfusion.orchestrator.strategy import RepetitionGuard, Strategy


@dataclass(frozen=True)
class Replayed:
    """One answer a replay reached: its text, why it ended, and the worker whose candidate won each
    step where candidates differed."""

    text: str
    finish: Finish
    ends_with_eos: bool
    winners: tuple[str, ...] = ()


class Unexplored(LookupError):
    """The answer runs through a node the exploration did not visit (its node limit came first)."""


def replay(tree: FusionTree, workers: Sequence[str], strategy: Strategy, max_new_tokens: int) -> Replayed:
    """The answer a fusion of `workers` (some of the tree's, in this order; the first is the lead)
    gives under `strategy`: FusionLoop's choices and stop rules, step by step down the tree."""
    lead, node = workers[0], tree.nodes[0]
    winners: list[str] = []
    while True:
        if not node.visited:
            raise Unexplored(f"node {node.text!r} was not visited")
        if node.answer_tokens[lead] >= max_new_tokens:
            return Replayed(node.text, Finish.LENGTH, False, tuple(winners))
        candidates = candidates_for(node, workers)
        chosen = _choose(strategy, candidates, node.text)
        if len(candidates) > 1:
            winners.append(candidates[chosen].proposed_by[0])
        branch = node.branches[branch_of(node, candidates[chosen])]
        if branch.answer is not None:
            answer = tree.answers[branch.answer]
            return Replayed(answer.text, branch.finish or Finish.LENGTH, answer.ends_with_eos, tuple(winners))
        node = tree.nodes[branch.node or 0]
        if strategy.repetition_guard != RepetitionGuard.OFF and node.repetition_cut is not None:
            return Replayed(node.text[: node.repetition_cut], Finish.REPETITION, False, tuple(winners))


def rerank(tree: FusionTree, workers: Sequence[str], strategy: Strategy, max_new_tokens: int) -> tuple[str, Replayed]:
    """Cool+R: the fused answer and each worker's solo answer under `strategy`, ranked by the
    strategy's score of each whole answer after the bare prompt; the best (source, answer)."""
    entries = [("fused", replay(tree, workers, strategy, max_new_tokens))]
    entries += [(name, replay(tree, [name], strategy, max_new_tokens)) for name in workers]
    whole = {(a.text, a.ends_with_eos): a.scores for a in tree.answers}
    scores, proposers = [], []
    for source, answer in entries:
        by = list(workers) if source == "fused" else [source]  # the fused answer is every scorer's
        judged = {name: whole[answer.text, answer.ends_with_eos][name] for name in workers}
        scores.append(strategy.score(answer.text, answer.ends_with_eos, judged, by))
        proposers.append(by)
    return entries[strategy.rank(scores, proposers)[0]]


def candidates_for(node: TreeNode, workers: Sequence[str]) -> list[StepCandidate]:
    """The node's candidates as a fusion of `workers` alone sees them: those they proposed, in
    their order, scored by them alone."""
    seen: dict[tuple[str, bool], StepCandidate] = {}
    for name in workers:
        proposal = next(c for c in node.candidates if name in c.proposed_by)
        key = (proposal.text, proposal.ends_with_eos)
        if key in seen:
            seen[key].proposed_by.append(name)
        else:
            scores = {w: proposal.scores[w] for w in workers if w in proposal.scores}
            seen[key] = StepCandidate(proposal.text, proposal.ends_with_eos, [name], scores)
    return list(seen.values())


def _choose(strategy: Strategy, candidates: list[StepCandidate], answer_text: str) -> int:
    if len(candidates) == 1:
        return 0  # one distinct candidate wins unscored (docs/design.md section 2)
    for c in candidates:
        c.fused_score = strategy.score(c.text, c.ends_with_eos, c.scores, c.proposed_by)
    return winner_index(strategy, candidates, answer_text)


def branch_of(node: TreeNode, candidate: StepCandidate) -> int:
    """Which of the node's branches a candidate (of any subset's view) takes."""
    return next(
        i
        for i, c in enumerate(node.candidates)
        if (c.text, c.ends_with_eos) == (candidate.text, candidate.ends_with_eos)
    )
