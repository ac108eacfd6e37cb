"""The decision tree of a fusion (docs/design.md section 3.7): every answer that some choice of
candidates at each step leads to, every step scored by every worker, so that selection rules can be
compared offline (replay.py) without generating again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from coolfusion.constraints import TextMatcher
from coolfusion.orchestrator.domain import (
    CandidateScore,
    Finish,
    FusionTree,
    GeneratedSegment,
    StepCandidate,
    TreeAnswer,
    TreeBranch,
    TreeNode,
)
from coolfusion.orchestrator.fusion import FusionRequest, distinct_candidates, stop_string_cut
from coolfusion.orchestrator.observer import current_observer
from coolfusion.orchestrator.replicas import ReplicaSet
from coolfusion.orchestrator.sessions import Deadline, NoWorkersLeft, SessionGroup, WorkerSession
from coolfusion.orchestrator.strategy import repeated_tail

T = TypeVar("T")
DEFAULT_MAX_NODES = 64
# Nodes of one tree expanded at once: enough to fill the workers' batches, few enough that one
# exploration leaves room for the fusions served beside it.
_PARALLEL_NODES = 8
# Whole answers scored per ScoreText call: within the smallest candidate limit a worker is
# expected to accept (the reference worker takes 16).
_ANSWERS_PER_CALL = 8


class ExplorationFailed(NoWorkersLeft):
    """A worker failed during an exploration: a tree needs every worker's answers (UNAVAILABLE)."""


@dataclass(frozen=True)
class ExploreRequest:
    """A fusion request whose every choice is explored, up to `max_nodes` visited nodes."""

    fusion: FusionRequest
    max_nodes: int = DEFAULT_MAX_NODES


class Explorer:
    """Builds one request's tree breadth first. Sessions at the bare prompt stay open throughout,
    so that each node's sessions copy the prompt from them and compute only the answer so far
    (docs/design.md section 4.6); a node's own sessions close once its step is scored."""

    def __init__(self, workers: list[ReplicaSet], request: ExploreRequest, deadline: Deadline):
        self._workers = workers
        self._request = request
        self._deadline = deadline
        self._nodes = [TreeNode("")]
        self._node_of = {"": 0}
        self._answer_of: dict[tuple[str, bool], int] = {}
        self._parallel = asyncio.Semaphore(_PARALLEL_NODES)

    async def run(self) -> FusionTree:
        donors = self._group("prompt")
        try:
            await self._all(donors, lambda s: s.place("", self._deadline))
            frontier, visited = [0], 0
            while frontier and visited < self._request.max_nodes:
                room = self._request.max_nodes - visited
                batch, frontier = frontier[:room], frontier[room:]
                visited += len(batch)
                await asyncio.gather(*(self._visit(i) for i in batch))
                frontier += [child for i in batch for child in self._branch(self._nodes[i])]
            self._add_node_answers()
            answers = await self._score_answers(donors)
            prompt_tokens = {s.name: s.prompt_tokens for s in donors.active}
        finally:
            await asyncio.shield(donors.close_all())
        return FusionTree([w.name for w in self._workers], prompt_tokens, self._nodes, answers, not frontier)

    # ---- one node -------------------------------------------------------------------------

    async def _visit(self, index: int) -> None:
        """Runs the step after node `index` on sessions opened at its text: each worker's answer
        length, the distinct candidates and, when they differ, every worker's scores."""
        request, node = self._request.fusion, self._nodes[index]
        async with self._parallel:
            group = self._group(f"node{index}")
            try:
                await self._all(group, lambda s: s.place(node.text, self._deadline))
                node.answer_tokens = {s.name: s.context_tokens - s.prompt_tokens for s in group.active}
                if min(node.answer_tokens.values()) >= request.max_new_tokens:
                    return  # every possible lead's length stop ends the answer here
                segments = await self._all(
                    group,
                    lambda s: s.generate(
                        node.text, "", request.segment_max_tokens, request.stop_strings, self._deadline
                    ),
                )
                self._check_constraint(node.text, segments)
                node.candidates = distinct_candidates(segments)
                if len(node.candidates) > 1:
                    await self._score(group, node.text, node.candidates)
            finally:
                await asyncio.shield(group.close_all())

    def _check_constraint(self, text: str, segments: dict[str, GeneratedSegment]) -> None:
        """Under a constraint, every proposal keeps the answer within it; a worker whose does not
        fails the exploration, as a tree with its choices would mislead."""
        checker = self._checker_at(text)
        if checker is None:
            return
        for name, segment in segments.items():
            if reason := checker.allows(segment.text, segment.ends_with_eos):
                raise ExplorationFailed(f"{name} proposed {segment.text!r}, which {reason}")

    def _checker_at(self, text: str) -> TextMatcher | None:
        constraint = self._request.fusion.structure.constraint
        return None if constraint is None else TextMatcher.of(constraint).after(text)

    async def _score(self, group: SessionGroup, text: str, candidates: list[StepCandidate]) -> None:
        pairs = [(c.text, c.ends_with_eos) for c in candidates]
        scored = await self._all(group, lambda s: s.score(pairs, text, self._deadline))
        for name, (per_candidate, _) in scored.items():
            for candidate, score in zip(candidates, per_candidate):
                candidate.scores[name] = score

    def _branch(self, node: TreeNode) -> list[int]:
        """Where each candidate of a visited node leads, the way FusionLoop appends a winner;
        returns the nodes this creates. Answers that end whatever the strategy (EOS, a stop
        string, an empty segment) are leaves; the repetition guard and the length stop depend on
        the strategy and the lead, so a node they may end is still explored, for the rules that go on."""
        created = []
        for candidate in node.candidates:
            text = node.text + candidate.text
            cut = stop_string_cut(text, len(node.text), self._request.fusion.stop_strings)
            if candidate.ends_with_eos or self._complete(text):
                node.branches.append(self._leaf(text, True, Finish.EOS))
            elif cut is not None:
                node.branches.append(self._leaf(text[:cut], False, Finish.STOP))
            elif not candidate.text:
                node.branches.append(self._leaf(text, False, Finish.LENGTH))
            else:
                if text not in self._node_of:
                    self._node_of[text] = len(self._nodes)
                    # Under a constraint the guard never cuts (docs/design.md section 9.3).
                    guarded = self._request.fusion.structure.constraint is None
                    self._nodes.append(TreeNode(text, repetition_cut=repeated_tail(text) if guarded else None))
                    created.append(self._node_of[text])
                node.branches.append(TreeBranch(node=self._node_of[text]))
        return created

    def _complete(self, text: str) -> bool:
        """The constraint's language can go no further: the loop ends the answer there (EOS)."""
        checker = self._checker_at(text)
        return checker is not None and checker.complete

    # ---- answers --------------------------------------------------------------------------

    def _leaf(self, text: str, ends_with_eos: bool, finish: Finish) -> TreeBranch:
        return TreeBranch(answer=self._answer_index(text, ends_with_eos), finish=finish)

    def _answer_index(self, text: str, ends_with_eos: bool) -> int:
        return self._answer_of.setdefault((text, ends_with_eos), len(self._answer_of))

    def _add_node_answers(self) -> None:
        """A node's own text ends an answer when the length stop falls there, and its cut text
        when the repetition guard does: both are answers some strategy gives."""
        for node in self._nodes:
            self._answer_index(node.text, False)
            if node.repetition_cut is not None:
                self._answer_index(node.text[: node.repetition_cut], False)

    async def _score_answers(self, donors: SessionGroup) -> list[TreeAnswer]:
        """Every answer scored whole after the bare prompt by every worker (what Cool+R ranks by)."""
        pairs = list(self._answer_of)
        scores: dict[str, list[CandidateScore]] = {s.name: [] for s in donors.active}
        for start in range(0, len(pairs), _ANSWERS_PER_CALL):
            scored = await self._all(
                donors, partial(_score_whole, chunk=pairs[start : start + _ANSWERS_PER_CALL], deadline=self._deadline)
            )
            for name, (per_answer, _) in scored.items():
                scores[name] += per_answer
        return [
            TreeAnswer(text, eos, {name: per_answer[i] for name, per_answer in scores.items()})
            for i, (text, eos) in enumerate(pairs)
        ]

    # ---- sessions -------------------------------------------------------------------------

    def _group(self, purpose: str) -> SessionGroup:
        request = self._request.fusion
        sessions = [
            WorkerSession(
                w, f"{request.request_id}.{purpose}.{w.name}", request.strategy.prompt_for(w.name, request.prompt),
                request.request_id, request.structure.constraint,
            )
            for w in self._workers
        ]  # fmt: skip
        return SessionGroup(sessions, "explore", request.request_id, current_observer())

    async def _all(self, group: SessionGroup, call: Callable[[WorkerSession], Awaitable[T]]) -> dict[str, T]:
        """Every worker's answer: a tree without one of its workers would mislead whoever replays it,
        so a worker that fails fails the exploration."""
        answers = await group.fan_out(call, 0)
        if group.dropped:
            failure = group.dropped[0]
            raise ExplorationFailed(f"{failure.worker} failed while exploring: {failure.reason}")
        return answers


def _score_whole(
    session: WorkerSession, chunk: list[tuple[str, bool]], deadline: Deadline
) -> Awaitable[tuple[list[CandidateScore], float]]:
    return session.score(chunk, "", deadline)
