"""The Cool-Fusion loop (docs/design.md section 2) over remote workers, and the Cool+R rerank."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from coolfusion.constraints import TextMatcher
from coolfusion.constraints.tools import ToolCall
from coolfusion.orchestrator.domain import (
    Answer,
    CandidateScore,
    Dropped,
    Finish,
    GeneratedSegment,
    Prompt,
    RankedAnswer,
    Step,
    StepCandidate,
    Usage,
)
from coolfusion.orchestrator.observer import FusionObserver, current_observer
from coolfusion.orchestrator.replicas import ReplicaSet
from coolfusion.orchestrator.sampling import Draw, SamplingPlan, Selection
from coolfusion.orchestrator.sessions import Deadline, SessionGroup, WorkerSession, WorkersOverloaded
from coolfusion.orchestrator.strategy import PAPER, RepetitionGuard, Strategy, repeated_tail
from coolfusion.orchestrator.structured import FREE_TEXT, Structure, tool_calls
from coolfusion.orchestrator.worker_client import InvalidAnswer, SessionLost, WorkerClient, WorkerFailed

logger = logging.getLogger(__name__)


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
    structure: Structure = FREE_TEXT  # the constraint the answer is held to, and whether it calls tools
    left_out: tuple[Dropped, ...] = ()  # workers left out before it started (a constraint they do not enforce)
    sampling: SamplingPlan | None = None  # None: greedy (docs/design.md chapter 10)
    choice: int = 0  # which of the request's n answers this loop gives

    @property
    def session_prefix(self) -> str:
        """What every session id of this answer starts with: answers of one request differ."""
        return self.request_id if self.choice == 0 else f"{self.request_id}.c{self.choice}"


@dataclass(frozen=True)
class FusionResult:
    """A finished request: the answer returned (fused, or the best of Cool+R's ranking) and how."""

    request_id: str
    workers: list[str]
    text: str
    finish: Finish
    source: str
    fused: Answer
    ranking: list[RankedAnswer]
    dropped: list[Dropped]
    rerank_ms: float
    total_ms: float
    strategy: Strategy
    usage: Usage | None = None  # the returned text's, in the lead worker's tokens
    tool_calls: tuple[ToolCall, ...] = ()  # the calls the returned answer made, if it called tools
    choice: int = 0  # which of the request's n answers this is
    seed: int = 0  # the request's sampling seed; 0 when greedy


OnStep = Callable[[Step], Awaitable[None]]


class FusionLoop:
    """Runs the algorithm of docs/design.md section 2 for one request over its workers' sessions;
    holds that request's state only. Where sessions live and how failures are survived is
    sessions.py's business."""

    def __init__(
        self,
        workers: list[ReplicaSet],
        request: FusionRequest,
        purpose: str,
        deadline: Deadline,
        on_step: OnStep | None = None,
        observer: FusionObserver | None = None,
        count_tokens: bool = False,
    ):
        constraint = request.structure.constraint
        sessions = [
            WorkerSession(
                w, f"{request.session_prefix}.{purpose}.{w.name}", request.strategy.prompt_for(w.name, request.prompt),
                request.request_id, constraint,
            )
            for w in workers
        ]  # fmt: skip
        # The answer as the constraint reads it: every proposal is checked against it (section 9.3).
        self._checker = TextMatcher.of(constraint) if constraint is not None else None
        # Metrics and spans; by default those of the request being served (see observer.py).
        self._observer = observer or current_observer()
        self._sessions = SessionGroup(sessions, purpose, request.request_id, self._observer)
        self._purpose = purpose
        self._request = request
        self._deadline = deadline
        self._on_step = on_step
        self._answer = Answer(dropped=self._sessions.dropped)
        self._to_append = ""  # the previous winner, appended by the next GenerateSegment
        self._held = ""  # the answer every session holds: the text before the latest winner
        self._count_tokens = count_tokens  # whether run() ends by counting the answer's tokens
        self._step_index = 0

    async def run(self) -> Answer:
        """Runs to a stop condition; every session it opened is closed, whatever happens."""
        try:
            started = time.perf_counter()
            await self._sessions.fan_out(lambda s: s.place("", self._deadline), self._step_index)
            self._answer.open_ms = (time.perf_counter() - started) * 1000
            while not await self._step():
                self._step_index += 1
            if self._count_tokens:
                self._answer.usage = await self._usage()
            return self._answer
        finally:
            await asyncio.shield(self._sessions.close_all())

    async def score_full_answers(self, answers: list[tuple[str, bool]]) -> dict[str, list[CandidateScore]]:
        """Scores whole answers after the bare prompt on every worker (the Cool+R rerank)."""
        try:
            await self._sessions.fan_out(lambda s: s.place("", self._deadline), 0)
            scored = await self._sessions.fan_out(lambda s: s.score(answers, "", self._deadline), 0)
            return {name: scores for name, (scores, _) in scored.items()}
        finally:
            await asyncio.shield(self._sessions.close_all())

    @property
    def dropped(self) -> list[Dropped]:
        return self._sessions.dropped

    def prompt_tokens(self, worker: str) -> int:
        """The prompt's length in `worker`'s tokens, as its session reported it."""
        return next(s.prompt_tokens for s in self._sessions.active if s.name == worker)

    # ---- token counts (docs/design.md section 5.7) ----------------------------------------

    async def _usage(self) -> Usage | None:
        """The final text's size in the lead's tokens; None (and a warning) when the lead fails."""
        lead = self._sessions.lead
        text, held = self._answer.text, self._held
        try:
            if text == held:  # the length stop, or an empty winner: the lead holds exactly the text
                prompt, context = lead.prompt_tokens, lead.context_tokens
            elif text.startswith(held):  # the winner, whole (EOS, length) or cut inside it
                prompt, context = lead.prompt_tokens, await self._context_with(text[len(held) :])
            else:  # a cut reaching into text the lead already holds: count it afresh
                prompt, context = await self._recount(text)
        except (WorkerFailed, SessionLost, WorkersOverloaded) as error:  # the answer stands without its count
            logger.warning("no token count: %s", error, extra={"request_id": self._request.request_id})
            return None
        return Usage(lead.name, prompt, context - prompt)

    async def _context_with(self, suffix: str) -> int:
        """The lead's context length with `suffix` appended to what it holds: its score of the
        winner when the step scored exactly that, else one ScoreText of the suffix."""
        lead = self._sessions.lead
        winner = self._answer.steps[-1].winner
        known = winner.scores.get(lead.name) if winner.text == suffix else None
        if known is None:
            [known], _ = await lead.score([(suffix, False)], self._held, self._deadline)
        return known.context_tokens_with_text

    async def _recount(self, text: str) -> tuple[int, int]:
        """(prompt, context) tokens of a session opened on the lead's pod with `text` as the answer:
        the protocol cannot shorten a session, so this costs one prefill."""
        lead, request = self._sessions.lead, self._request
        prompt = request.strategy.prompt_for(lead.name, request.prompt)
        session = WorkerSession(
            lead.replicas, f"{request.session_prefix}.count.{lead.name}", prompt, request.request_id
        )
        try:
            await session.place(text, self._deadline)
            return session.prompt_tokens, session.context_tokens
        finally:
            await asyncio.shield(session.close())

    # ---- one step -------------------------------------------------------------------------

    async def _step(self) -> bool:
        """Runs one step inside the observer's step span; True when the answer is finished."""
        with self._observer.step(self._purpose, self._step_index):
            return await self._run_step()

    async def _run_step(self) -> bool:
        """Runs one step; True when the answer is finished."""
        started = step_started = time.perf_counter()
        segments = self._within_constraint(await self._sessions.fan_out(self._generate, self._step_index))
        self._to_append = ""
        self._held = self._answer.text
        generate_ms = (time.perf_counter() - started) * 1000
        compute_ms = max(s.compute_ms for s in segments.values())
        if self._length_reached(self._sessions.lead.context_tokens):
            return self._finish(Finish.LENGTH)
        candidates = distinct_candidates(segments)
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

    def _generate(self, session: WorkerSession) -> Awaitable[GeneratedSegment]:
        request = self._request
        return session.generate(
            self._answer.text, self._to_append, request.segment_max_tokens, request.stop_strings, self._deadline,
            self._draw(session.name),
        )  # fmt: skip

    def _draw(self, worker: str) -> Draw | None:
        """A worker's sampling for this step: its own seed, from where the draw happens."""
        plan = self._request.sampling
        if plan is None:
            return None
        return Draw(plan, plan.call_seed(self._purpose, self._request.choice, self._step_index, worker))

    def _within_constraint(self, segments: dict[str, GeneratedSegment]) -> dict[str, GeneratedSegment]:
        """The segments that keep the answer within the constraint; a worker that proposed one
        outside it does not enforce the constraint, and is dropped (a third party's may not)."""
        if self._checker is None:
            return segments
        kept = {}
        for name, segment in segments.items():
            if reason := self._checker.allows(segment.text, segment.ends_with_eos):
                error = InvalidAnswer(f"invalid answer: its segment {segment.text!r} {reason}")
                self._sessions.drop(name, error, self._step_index)
            else:
                kept[name] = segment
        return kept

    def _length_reached(self, lead_context_tokens: int) -> bool:
        """The length stop: the answer holds max_new_tokens tokens of the first remaining worker
        (docs/design.md section 2), given that worker's context length (prompt + answer)."""
        answer_tokens = lead_context_tokens - self._sessions.lead.prompt_tokens
        return answer_tokens >= self._request.max_new_tokens

    async def _score_all(self, candidates: list[StepCandidate]) -> float:
        """Fills in every worker's scores and the fused score; returns the slowest compute time (ms)."""
        pairs = [(c.text, c.ends_with_eos) for c in candidates]
        answers = await self._sessions.fan_out(
            lambda s: s.score(pairs, self._answer.text, self._deadline), self._step_index
        )
        for name, (per_candidate, _) in answers.items():
            for candidate, score in zip(candidates, per_candidate):
                candidate.scores[name] = score
        strategy = self._request.strategy
        for c in candidates:
            c.fused_score = strategy.score(c.text, c.ends_with_eos, c.scores, c.proposed_by)
        return max(compute_ms for _, compute_ms in answers.values())

    def _append(self, winner: StepCandidate) -> bool:
        """Appends the winner; True when a stop rule ends the answer."""
        previous = len(self._answer.text)
        self._answer.text += winner.text
        self._to_append = winner.text
        if winner.ends_with_eos:
            return self._finish(Finish.EOS)
        if self._cut_at_stop_string(previous):
            return self._finish(Finish.STOP)
        if self._checker is not None:
            self._checker.advance(winner.text)
            if self._checker.complete:  # nothing can follow: every worker could only end it
                return self._finish(Finish.EOS)
        elif self._request.strategy.repetition_guard != RepetitionGuard.OFF and self._cut_repetition():
            # Under a constraint the guard never cuts: a cut answer would leave the language.
            return self._finish(Finish.REPETITION)
        # The lead's score tells its context length with the winner, which saves a round trip.
        lead = winner.scores.get(self._sessions.lead.name)
        if lead and self._length_reached(lead.context_tokens_with_text):
            return self._finish(Finish.LENGTH)
        if not winner.text:
            # An empty segment makes no progress; stopping beats looping until the deadline.
            return self._finish(Finish.LENGTH)
        return False

    def _cut_at_stop_string(self, previous_length: int) -> bool:
        cut = stop_string_cut(self._answer.text, previous_length, self._request.stop_strings)
        if cut is not None:
            self._answer.text = self._answer.text[:cut]
        return cut is not None

    def _cut_repetition(self) -> bool:
        start = repeated_tail(self._answer.text)
        if start is not None:
            self._answer.text = self._answer.text[:start]
        return start is not None

    def _winner_index(self, candidates: list[StepCandidate]) -> int:
        plan, request = self._request.sampling, self._request
        drawn = None
        if plan is not None and plan.selection == Selection.SAMPLE and len(candidates) > 1:
            drawn = (plan, plan.call_seed(self._purpose, request.choice, self._step_index, "select"))
        return winner_index(request.strategy, candidates, self._answer.text, drawn)

    def _finish(self, reason: Finish) -> bool:
        self._answer.finish = reason
        return True


async def fuse(
    workers: Sequence[ReplicaSet | WorkerClient],
    request: FusionRequest,
    deadline: float,
    call_timeout_s: float,
    on_step: OnStep | None = None,
    busy_wait_s: float = 30.0,
) -> FusionResult:
    """Fuses `workers` for one request; with rerank, also returns the best of fused and solo answers.

    `deadline` is a time.monotonic() instant; a bare WorkerClient stands for a worker with one replica;
    a worker that stays busy for `busy_wait_s` fails the request (WorkersOverloaded)."""
    started = time.perf_counter()
    limits = Deadline(deadline, call_timeout_s, busy_wait_s)
    replica_sets = [w if isinstance(w, ReplicaSet) else ReplicaSet.of(w) for w in workers]
    names = [c.name for c in replica_sets]
    # Cool+R counts every full answer while ranking them, so only a plain fusion counts its own.
    fused_loop = FusionLoop(replica_sets, request, "fused", limits, on_step, count_tokens=not request.rerank)
    if not request.rerank:
        fused = await fused_loop.run()
        total_ms = (time.perf_counter() - started) * 1000
        return _read_tool_calls(request, FusionResult(
            request.request_id, names, fused.text, fused.finish, "fused", fused, [],
            [*request.left_out, *fused.dropped], 0.0, total_ms, request.strategy, fused.usage,
        ))  # fmt: skip
    solo_loops = [FusionLoop([c], request, "solo", limits) for c in replica_sets]
    fused_done = 0.0

    async def run_fused() -> Answer:
        nonlocal fused_done
        answer = await fused_loop.run()
        fused_done = time.perf_counter()
        return answer

    fused_or_error, *solos = await asyncio.gather(
        run_fused(), *(loop.run() for loop in solo_loops), return_exceptions=True
    )
    if isinstance(fused_or_error, BaseException):
        raise fused_or_error
    if overloaded := next((s for s in solos if isinstance(s, WorkersOverloaded)), None):
        raise overloaded  # busy is not broken: the request fails whole rather than without a solo answer
    fused = fused_or_error
    entries = [("fused", fused)] + [(c.name, s) for c, s in zip(replica_sets, solos) if isinstance(s, Answer)]
    dropped = [*request.left_out, *fused.dropped] + [
        Dropped(c.name, f"solo answer failed: {s}", 0) for c, s in zip(replica_sets, solos) if not isinstance(s, Answer)
    ]
    ranking, rerank_dropped = await _rank(entries, replica_sets, fused, request, limits)
    best = ranking[0]
    total_ms = (time.perf_counter() - started) * 1000
    rerank_ms = (time.perf_counter() - fused_done) * 1000
    best_answer = dict(entries)[best.source]
    return _read_tool_calls(request, FusionResult(
        request.request_id, names, best.text, best_answer.finish, best.source, fused, ranking,
        dropped + rerank_dropped, rerank_ms, total_ms, request.strategy, best.usage,
    ))  # fmt: skip


def _read_tool_calls(request: FusionRequest, result: FusionResult) -> FusionResult:
    """The result as the request's answer number `choice`, with its seed; a finished answer of
    tool calls read as such (docs/design.md section 9.4)."""
    seed = request.sampling.seed if request.sampling is not None else 0
    result = replace(result, choice=request.choice, seed=seed)
    if not request.structure.calls_tools or result.finish != Finish.EOS:
        return result
    calls = tool_calls(result.text, request.request_id, request.choice)
    return replace(result, finish=Finish.TOOL_CALLS, tool_calls=calls) if calls else result


async def _rank(
    entries: list[tuple[str, Answer]],
    replica_sets: list[ReplicaSet],
    fused: Answer,
    request: FusionRequest,
    deadline: Deadline,
) -> tuple[list[RankedAnswer], list[Dropped]]:
    """Fused score (the strategy's aggregation; the paper's is mean perplexity) of each full answer
    across the workers still standing; best first, ties to the earlier entry (fused first, then
    workers in order). Each distinct answer is scored once, so equal answers tie exactly. Each
    answer's usage comes from the first scorer's scores: after the bare prompt, a score's context
    length less the prompt is the answer's length in tokens."""
    failed = {d.worker for d in fused.dropped}
    scorers = [c for c in replica_sets if c.name not in failed]
    loop = FusionLoop(scorers, request, "rerank", deadline)
    keys = [(a.text, a.finish == Finish.EOS) for _, a in entries]
    distinct = list(dict.fromkeys(keys))
    scored = await loop.score_full_answers(distinct)
    scores = {name: [per_answer[distinct.index(k)] for k in keys] for name, per_answer in scored.items()}
    counter = next(iter(scores))  # fan_out keeps worker order; some worker answered, or it raised
    prompt_tokens = loop.prompt_tokens(counter)
    ranked = []
    for i, (source, answer) in enumerate(entries):
        answer_tokens = scores[counter][i].context_tokens_with_text - prompt_tokens
        usage = Usage(counter, prompt_tokens, answer_tokens)
        proposed_by = list(scores) if source == "fused" else [source]  # the fused answer is every scorer's
        per_worker = {name: per_answer[i] for name, per_answer in scores.items()}
        fused_score = request.strategy.score(answer.text, answer.finish == Finish.EOS, per_worker, proposed_by)
        ranked.append((RankedAnswer(source, answer.text, fused_score, usage), proposed_by))
    order = request.strategy.rank([r.fused_score for r, _ in ranked], [by for _, by in ranked])
    return [ranked[i][0] for i in order], loop.dropped


def distinct_candidates(segments: dict[str, GeneratedSegment]) -> list[StepCandidate]:
    """Distinct (text, ended-at-EOS) pairs in worker order."""
    candidates: dict[tuple[str, bool], StepCandidate] = {}
    for name, segment in segments.items():
        key = (segment.text, segment.ends_with_eos)
        if key in candidates:
            candidates[key].proposed_by.append(name)
        else:
            candidates[key] = StepCandidate(segment.text, segment.ends_with_eos, [name])
    return list(candidates.values())


def stop_string_cut(text: str, previous_length: int, stop_strings: tuple[str, ...]) -> int | None:
    """Where the answer is cut when a stop string appears in it since it was `previous_length`
    characters long (one may straddle the join); None when none does."""
    longest = max((len(s) for s in stop_strings), default=0)
    search_from = max(0, previous_length - longest + 1)
    hits = [at for s in stop_strings if (at := text.find(s, search_from)) >= 0]
    return min(hits) if hits else None


def winner_index(
    strategy: Strategy,
    candidates: list[StepCandidate],
    answer_text: str,
    drawn: tuple[SamplingPlan, int] | None = None,
) -> int:
    """The step's winner among candidates whose fused scores are filled in: the strategy's choice
    (lowest score, ties to the earliest worker's candidate), or, when `drawn` (a plan whose
    selection samples, and the draw's seed), one drawn by the candidates' scores per token; with
    the STEER guard, among the candidates that would not make the answer repeat itself, when
    there are any."""
    pool = list(range(len(candidates)))
    if strategy.repetition_guard == RepetitionGuard.STEER:
        fresh = [i for i in pool if repeated_tail(answer_text + candidates[i].text) is None]
        if fresh:
            pool = fresh
    scores = [candidates[i].fused_score for i in pool]
    if drawn is not None:
        plan, seed = drawn
        return pool[plan.draw_winner([strategy.nats(score) for score in scores], seed)]
    return pool[strategy.rank(scores, [candidates[i].proposed_by for i in pool])[0]]
