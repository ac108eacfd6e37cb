"""The Cool-Fusion loop of DESIGN.md section 2 over remote workers, and the Cool+R rerank."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from coolfusion.orchestrator.observer import FusionObserver, current_observer
from coolfusion.orchestrator.replicas import ReplicaSet
from coolfusion.orchestrator.strategy import PAPER, RepetitionGuard, Strategy, repeated_tail
from coolfusion.orchestrator.worker_client import (
    CandidateScore,
    GeneratedSegment,
    Prompt,
    SessionLost,
    WorkerClient,
    WorkerFailed,
    WorkerRejected,
    WorkerUnavailable,
)

logger = logging.getLogger(__name__)

FINISH_EOS, FINISH_LENGTH, FINISH_STOP, FINISH_REPETITION = "eos", "length", "stop", "repetition"
# Closing sessions must not hang a finished request on a dead worker.
_CLOSE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class FusionRequest:
    """One fusion, validated."""

    prompt: Prompt
    max_new_tokens: int
    stop_strings: tuple[str, ...]
    segment_max_tokens: int
    rerank: bool
    request_id: str
    strategy: Strategy = PAPER


@dataclass
class StepCandidate:
    """A distinct candidate of a step, with who proposed it and how each worker scored it."""

    text: str
    ends_with_eos: bool
    proposed_by: list[str]
    scores: dict[str, CandidateScore] = field(default_factory=dict)
    fused_score: float = 0.0


@dataclass(frozen=True)
class Step:
    index: int
    candidates: list[StepCandidate]
    winner_index: int
    generate_ms: float
    score_ms: float
    worker_compute_ms: float  # slowest worker's compute, generation plus scoring

    @property
    def winner(self) -> StepCandidate:
        return self.candidates[self.winner_index]


@dataclass(frozen=True)
class Dropped:
    worker: str
    reason: str
    step: int


@dataclass
class Answer:
    """What one loop produced: the text, why it ended, and how it got there."""

    text: str = ""
    finish: str = FINISH_LENGTH
    steps: list[Step] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    open_ms: float = 0.0


@dataclass(frozen=True)
class RankedAnswer:
    source: str  # "fused" or a worker name
    text: str
    fused_score: float


@dataclass(frozen=True)
class FusionResult:
    request_id: str
    workers: list[str]
    text: str
    finish: str
    source: str
    fused: Answer
    ranking: list[RankedAnswer]
    dropped: list[Dropped]
    rerank_ms: float
    total_ms: float
    strategy: Strategy


class NoWorkersLeft(Exception):
    """Every worker of the request failed; the message names each failure."""


class RejectedByAllWorkers(NoWorkersLeft):
    """Every worker refused the request as invalid: the request is bad, not the service."""


@dataclass
class _Member:
    """A worker taking part in one loop, and what the loop knows of its session."""

    replicas: ReplicaSet
    session_id: str
    client: WorkerClient | None = None  # the replica holding the session, from its placement to its close
    prompt_tokens: int = 0
    context_tokens: int = 0

    @property
    def name(self) -> str:
        return self.replicas.name


OnStep = Callable[[Step], Awaitable[None]]


class FusionLoop:
    """Runs DESIGN.md section 2 over `workers` for one request; holds that request's state only."""

    def __init__(
        self,
        workers: list[ReplicaSet],
        request: FusionRequest,
        purpose: str,
        deadline: float,
        call_timeout_s: float,
        on_step: OnStep | None = None,
        observer: FusionObserver | None = None,
    ):
        self._members = [_Member(w, f"{request.request_id}.{purpose}.{w.name}") for w in workers]
        self._purpose = purpose
        # Metrics and spans; by default those of the request being served (see observer.py).
        self._observer = observer or current_observer()
        self._dropped_members: list[_Member] = []
        self._request = request
        self._deadline = deadline
        self._call_timeout_s = call_timeout_s
        self._on_step = on_step
        self._answer = Answer()
        self._to_append = ""  # the previous winner, appended by the next GenerateSegment
        self._step_index = 0
        self._rejections = 0  # drops that were the worker refusing the request as invalid

    async def run(self) -> Answer:
        """Runs to a stop condition; every session it opened is closed, whatever happens."""
        try:
            started = time.perf_counter()
            await self._fan_out(self._place)
            self._answer.open_ms = (time.perf_counter() - started) * 1000
            while not await self._step():
                self._step_index += 1
            return self._answer
        finally:
            await asyncio.shield(self._close_all())

    async def score_full_answers(self, answers: list[tuple[str, bool]]) -> dict[str, list[CandidateScore]]:
        """Scores whole answers after the bare prompt on every member (the Cool+R rerank)."""
        try:
            await self._fan_out(self._place)
            scored = await self._fan_out(lambda m: self._score(m, answers))
            return {name: scores for name, (scores, _) in scored.items()}
        finally:
            await asyncio.shield(self._close_all())

    @property
    def dropped(self) -> list[Dropped]:
        return self._answer.dropped

    # ---- one step -------------------------------------------------------------------------

    async def _step(self) -> bool:
        """Runs one step inside the observer's step span; True when the answer is finished."""
        with self._observer.step(self._purpose, self._step_index):
            return await self._run_step()

    async def _run_step(self) -> bool:
        """Runs one step; True when the answer is finished."""
        started = step_started = time.perf_counter()
        segments = await self._fan_out(self._generate)
        self._to_append = ""
        generate_ms = (time.perf_counter() - started) * 1000
        compute_ms = max(s.compute_ms for s in segments.values())
        if self._answer_tokens(self._members[0].context_tokens) >= self._request.max_new_tokens:
            return self._finish(FINISH_LENGTH)
        candidates = _distinct_candidates(segments)
        score_ms = 0.0
        if len(candidates) > 1:
            started = time.perf_counter()
            compute_ms += await self._score_all(candidates)
            score_ms = (time.perf_counter() - started) * 1000
        step = Step(self._step_index, candidates, self._winner_index(candidates), generate_ms, score_ms, compute_ms)
        self._answer.steps.append(step)
        self._observer.on_step(self._purpose, step, (time.perf_counter() - step_started) * 1000)
        if self._on_step:
            await self._on_step(step)
        return self._append(step.winner)

    def _answer_tokens(self, context_tokens: int) -> int:
        """Answer length in tokens of the first remaining worker (DESIGN.md: the stop rule's unit)."""
        return context_tokens - self._members[0].prompt_tokens

    async def _score_all(self, candidates: list[StepCandidate]) -> float:
        """Fills in every worker's scores and the fused score; returns the slowest compute time (ms)."""
        pairs = [(c.text, c.ends_with_eos) for c in candidates]
        answers = await self._fan_out(lambda m: self._score(m, pairs))
        for name, (per_candidate, _) in answers.items():
            for candidate, score in zip(candidates, per_candidate):
                candidate.scores[name] = score
        for candidate in candidates:
            perplexities = {name: s.perplexity for name, s in candidate.scores.items()}
            candidate.fused_score = self._request.strategy.fused_score(perplexities)
        return max(compute_ms for _, compute_ms in answers.values())

    def _append(self, winner: StepCandidate) -> bool:
        previous = len(self._answer.text)
        self._answer.text += winner.text
        self._to_append = winner.text
        if winner.ends_with_eos:
            return self._finish(FINISH_EOS)
        if self._cut_at_stop_string(previous):
            return self._finish(FINISH_STOP)
        if self._request.strategy.repetition_guard != RepetitionGuard.OFF and self._cut_repetition():
            return self._finish(FINISH_REPETITION)
        lead = winner.scores.get(self._members[0].name)
        if lead and self._answer_tokens(lead.context_tokens_with_text) >= self._request.max_new_tokens:
            return self._finish(FINISH_LENGTH)
        if not winner.text:
            # An empty segment makes no progress; stopping beats looping until the deadline.
            return self._finish(FINISH_LENGTH)
        return False

    def _cut_at_stop_string(self, previous_length: int) -> bool:
        text = self._answer.text
        longest = max((len(s) for s in self._request.stop_strings), default=0)
        search_from = max(0, previous_length - longest + 1)
        hits = [at for s in self._request.stop_strings if (at := text.find(s, search_from)) >= 0]
        if hits:
            self._answer.text = text[: min(hits)]
        return bool(hits)

    def _cut_repetition(self) -> bool:
        start = repeated_tail(self._answer.text)
        if start is not None:
            self._answer.text = self._answer.text[:start]
        return start is not None

    def _winner_index(self, candidates: list[StepCandidate]) -> int:
        """Lowest fused score, ties to the earliest worker's candidate; with the STEER guard, among
        the candidates that would not make the answer repeat itself, when there are any."""
        if self._request.strategy.repetition_guard == RepetitionGuard.STEER:
            fresh = [i for i, c in enumerate(candidates) if repeated_tail(self._answer.text + c.text) is None]
            if fresh and len(fresh) < len(candidates):
                return min(fresh, key=lambda i: (candidates[i].fused_score, i))
        return _lowest_score(candidates)

    def _finish(self, reason: str) -> bool:
        self._answer.finish = reason
        return True

    # ---- calls to workers -----------------------------------------------------------------

    def _timeout(self) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise WorkerFailed("DEADLINE_EXCEEDED: the request's deadline passed")
        return min(remaining, self._call_timeout_s)

    async def _open(self, member: _Member) -> None:
        prompt = self._request.strategy.prompt_for(member.name, self._request.prompt)
        opened = await member.client.open(member.session_id, prompt, self._answer.text, self._timeout())
        member.prompt_tokens, member.context_tokens = opened.prompt_tokens, opened.context_tokens

    async def _place(
        self, member: _Member, tried: tuple[WorkerClient, ...] = (), failure: WorkerFailed | None = None
    ) -> None:
        """Opens the member's session on its least-loaded replica, moving on to the next replica
        while the chosen one is unreachable; `failure` is the reason given when none is left."""
        tried = list(tried)
        while (client := await member.replicas.acquire(exclude=tried)) is not None:
            member.client = client
            tried.append(client)
            try:
                return await self._open(member)
            except WorkerUnavailable as gone:
                member.replicas.mark_failed(client)
                self._release(member)
                failure = gone
        if failure is None:
            raise WorkerUnavailable(f"UNAVAILABLE: {member.replicas.problem or f'no replica of {member.name}'}")
        if len(tried) > 1:
            raise WorkerUnavailable(f"{failure} (all {len(tried)} replicas tried)") from failure
        raise failure

    async def _reopen(self, member: _Member) -> None:
        """Re-creates a lost or desynchronised session from the full text (DESIGN.md section 3)."""
        await self._close(member)
        await self._open(member)

    async def _fail_over(self, member: _Member, gone: WorkerUnavailable) -> None:
        """The session's pod is gone: re-open the session on another replica, with the full text."""
        failed = member.client
        logger.warning(
            "moving %s's session off replica %s: %s", member.name, failed.address, gone,
            extra={"request_id": self._request.request_id},
        )  # fmt: skip
        member.replicas.mark_failed(failed)
        self._release(member)
        await self._place(member, (failed,), gone)

    async def _generate(self, member: _Member) -> GeneratedSegment:
        request = self._request

        def call(reopened: bool) -> Awaitable[GeneratedSegment]:
            append = "" if reopened else self._to_append  # a re-opened context already holds it
            return member.client.generate(
                member.session_id, member.context_tokens, len(self._answer.text) - len(append), append,
                request.segment_max_tokens, request.stop_strings, self._timeout(),
            )  # fmt: skip

        segment = await self._on_session(member, call)
        member.context_tokens = segment.context_tokens
        return segment

    async def _score(self, member: _Member, pairs: list[tuple[str, bool]]) -> tuple[list[CandidateScore], float]:
        return await self._on_session(
            member, lambda _: member.client.score(member.session_id, member.context_tokens, pairs, self._timeout())
        )

    async def _on_session(self, member: _Member, call: Callable[[bool], Awaitable]):
        """`call(reopened=False)`; when the session was lost, or its pod is gone, re-opens it (on
        another replica if the pod is gone) and tries once more with `call(reopened=True)`."""
        try:
            return await call(False)
        except SessionLost as lost:
            logger.info("re-opening %s after %s", member.name, lost, extra={"request_id": self._request.request_id})
            await self._reopen(member)
        except WorkerUnavailable as gone:
            await self._fail_over(member, gone)
        try:
            return await call(True)
        except SessionLost as lost:
            raise WorkerFailed(f"session lost twice: {lost}") from lost

    async def _fan_out(self, call: Callable[[_Member], Awaitable]) -> dict[str, object]:
        """Calls every member concurrently; drops those that fail; returns answers by name."""
        members = list(self._members)
        results = await asyncio.gather(*(call(m) for m in members), return_exceptions=True)
        answers = {}
        for member, result in zip(members, results):
            if isinstance(result, WorkerFailed):
                self._drop(member, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                answers[member.name] = result
        return answers

    def _drop(self, member: _Member, error: WorkerFailed) -> None:
        reason = str(error)
        logger.warning("dropping worker %s: %s", member.name, reason, extra={"request_id": self._request.request_id})
        self._observer.on_drop(self._purpose, member.name, error)
        self._members.remove(member)
        self._dropped_members.append(member)  # its session is still closed at the end, if reachable
        self._answer.dropped.append(Dropped(member.name, reason, self._step_index))
        self._rejections += isinstance(error, WorkerRejected)
        if not self._members:
            failures = "; ".join(f"{d.worker}: {d.reason}" for d in self._answer.dropped)
            if self._rejections == len(self._answer.dropped):
                raise RejectedByAllWorkers(f"every worker refused the request: {failures}")
            raise NoWorkersLeft(f"no workers left: {failures}")

    async def _close(self, member: _Member) -> None:
        try:
            await member.client.close(member.session_id, _CLOSE_TIMEOUT_S)
        except (WorkerFailed, SessionLost):
            pass  # a worker that cannot be reached will evict the session by its idle TTL

    @staticmethod
    def _release(member: _Member) -> None:
        if member.client is not None:
            member.replicas.release(member.client)
            member.client = None

    async def _close_all(self) -> None:
        placed = [m for m in self._members + self._dropped_members if m.client is not None]
        await asyncio.gather(*(self._close(m) for m in placed))
        for member in placed:
            self._release(member)


async def fuse(
    workers: list[ReplicaSet | WorkerClient],
    request: FusionRequest,
    deadline: float,
    call_timeout_s: float,
    on_step: OnStep | None = None,
) -> FusionResult:
    """Fuses `workers` for one request; with rerank, also returns the best of fused and solo answers.

    A bare WorkerClient stands for a worker with one replica."""
    started = time.perf_counter()
    replica_sets = [w if isinstance(w, ReplicaSet) else ReplicaSet.of(w) for w in workers]
    names = [c.name for c in replica_sets]
    fused_loop = FusionLoop(replica_sets, request, "fused", deadline, call_timeout_s, on_step)
    if not request.rerank:
        fused = await fused_loop.run()
        total_ms = (time.perf_counter() - started) * 1000
        return FusionResult(
            request.request_id, names, fused.text, fused.finish, "fused", fused, [], fused.dropped, 0.0, total_ms,
            request.strategy,
        )  # fmt: skip
    solo_loops = [FusionLoop([c], request, "solo", deadline, call_timeout_s) for c in replica_sets]
    fused_done = 0.0

    async def run_fused() -> Answer:
        nonlocal fused_done
        answer = await fused_loop.run()
        fused_done = time.perf_counter()
        return answer

    fused, *solos = await asyncio.gather(run_fused(), *(loop.run() for loop in solo_loops), return_exceptions=True)
    if isinstance(fused, BaseException):
        raise fused
    entries = [("fused", fused)] + [(c.name, s) for c, s in zip(replica_sets, solos) if isinstance(s, Answer)]
    dropped = fused.dropped + [
        Dropped(c.name, f"solo answer failed: {s}", 0) for c, s in zip(replica_sets, solos) if not isinstance(s, Answer)
    ]
    ranking, rerank_dropped = await _rank(entries, replica_sets, fused, request, deadline, call_timeout_s)
    best = ranking[0]
    total_ms = (time.perf_counter() - started) * 1000
    rerank_ms = (time.perf_counter() - fused_done) * 1000
    best_answer = dict(entries)[best.source]
    return FusionResult(
        request.request_id, names, best.text, best_answer.finish, best.source, fused, ranking,
        dropped + rerank_dropped, rerank_ms, total_ms, request.strategy,
    )  # fmt: skip


async def _rank(
    entries: list[tuple[str, Answer]],
    replica_sets: list[ReplicaSet],
    fused: Answer,
    request: FusionRequest,
    deadline: float,
    call_timeout_s: float,
) -> tuple[list[RankedAnswer], list[Dropped]]:
    """Fused score (the strategy's aggregation; the paper's is mean perplexity) of each full answer
    across the workers still standing; best first, ties to the earlier entry (fused first, then
    workers in order)."""
    failed = {d.worker for d in fused.dropped}
    scorers = [c for c in replica_sets if c.name not in failed]
    loop = FusionLoop(scorers, request, "rerank", deadline, call_timeout_s)
    scores = await loop.score_full_answers([(a.text, a.finish == FINISH_EOS) for _, a in entries])
    ranked = []
    for i, (source, answer) in enumerate(entries):
        perplexities = {name: per_answer[i].perplexity for name, per_answer in scores.items()}
        ranked.append(RankedAnswer(source, answer.text, request.strategy.fused_score(perplexities)))
    order = sorted(range(len(ranked)), key=lambda i: (ranked[i].fused_score, i))
    return [ranked[i] for i in order], loop.dropped


def _distinct_candidates(segments: dict[str, GeneratedSegment]) -> list[StepCandidate]:
    """Distinct (text, ended-at-EOS) pairs in worker order."""
    candidates: dict[tuple[str, bool], StepCandidate] = {}
    for name, segment in segments.items():
        key = (segment.text, segment.ends_with_eos)
        if key in candidates:
            candidates[key].proposed_by.append(name)
        else:
            candidates[key] = StepCandidate(segment.text, segment.ends_with_eos, [name])
    return list(candidates.values())


def _lowest_score(candidates: list[StepCandidate]) -> int:
    """Lowest fused score; ties go to the earliest worker's candidate (strict comparison)."""
    best = 0
    for i, candidate in enumerate(candidates):
        if candidate.fused_score < candidates[best].fused_score:
            best = i
    return best
