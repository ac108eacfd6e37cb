"""Sessions: each holds a prompt, the answer so far and its engine cache, under a token budget.

The store lives on the event loop: its bookkeeping (lookups, expectations, eviction, closing) never
waits behind model work, which runs in the backend. Calls on one session are serialised; calls on
different sessions run concurrently, so the backend can batch them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from coolfusion.constraints import Constraint, ConstraintError, TextMatcher
from coolfusion.worker.backend import (
    CandidateText,
    ConstrainedAnswer,
    ModelBackend,
    PromptSpec,
    Sampling,
    Segment,
    SegmentRules,
    SessionCache,
    SessionGuide,
    TextScore,
)
from coolfusion.worker.errors import (
    InvalidRequest,
    OverCapacity,
    SessionConflict,
    SessionNotFound,
    StaleContext,
)
from coolfusion.worker.settings import FALLBACK_TOKEN_BUDGET, SessionLimits

# Why a session was evicted (the worker's metrics count each): idle past the TTL, least recently
# used while making room in the token budget, or oldest beyond the session count limit.
EVICTED_IDLE, EVICTED_FOR_BUDGET, EVICTED_FOR_COUNT = "ttl", "token_budget", "max_sessions"
EVICTION_CAUSES = (EVICTED_IDLE, EVICTED_FOR_BUDGET, EVICTED_FOR_COUNT)


@dataclass
class Session:
    """One caller's context on this worker: rendered prompt + answer text, and its cache."""

    session_id: str
    prompt_text: str
    add_special_tokens: bool
    prompt_tokens: int
    answer_text: str
    context_ids: list[int]
    cache: SessionCache
    # Under a constraint: the committed answer as the constraint reads it (checked here, on the
    # event loop, before any model work), and the engine's guide, which follows it while generating.
    constraint: Constraint | None = None
    checker: TextMatcher | None = None
    guide: SessionGuide | None = None
    last_used: float = 0.0
    # Tokens the call in flight may grow the cache to; the budget counts them before they exist.
    reserved_tokens: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def context_text(self) -> str:
        return self.prompt_text + self.answer_text

    @property
    def busy(self) -> bool:
        """A call is using the session (it is never evicted then)."""
        return self.lock.locked()

    @property
    def budgeted_tokens(self) -> int:
        return max(self.cache.cached_tokens, self.reserved_tokens)


@dataclass(frozen=True)
class Expectation:
    """What the caller believes the session holds; a mismatch means a stale or retried call."""

    context_tokens: int
    answer_chars: int | None = None  # optional: the protocol lets callers omit it


@dataclass(frozen=True)
class OpenedSession:
    session_id: str
    prompt_tokens: int
    context_tokens: int
    compute_ms: float


@dataclass(frozen=True)
class Generated:
    segment: Segment
    context_tokens: int  # the context the segment followed (after the append)
    compute_ms: float


@dataclass(frozen=True)
class Scored:
    scores: list[TextScore]
    context_tokens: int
    compute_ms: float


@dataclass(frozen=True)
class Load:
    open_sessions: int
    cached_tokens: int
    evicted_sessions: int
    evicted_by_cause: dict[str, int] = field(default_factory=dict)  # cause (EVICTION_CAUSES) -> count


class SessionStore:
    """Sessions in least-recently-used order, bounded by count, cached tokens and idle time."""

    def __init__(
        self,
        backend: ModelBackend,
        limits: SessionLimits,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
    ):
        self._backend = backend
        self._limits = limits
        self._clock = clock
        # Called after every change of the sessions (the metrics sample the load there).
        self._on_change = on_change or (lambda: None)
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._evicted = dict.fromkeys(EVICTION_CAUSES, 0)
        # A worker gives the budget it sized (server.py); a store built on its own uses the fallback.
        self.token_budget = FALLBACK_TOKEN_BUDGET if limits.token_budget is None else limits.token_budget

    # ---- public operations ----------------------------------------------------------------

    async def open(
        self, session_id: str, prompt: PromptSpec, answer_text: str, constraint: Constraint | None = None
    ) -> OpenedSession:
        """Creates a session and prefills its cache; re-opening the same context is a no-op."""
        self.evict_idle()
        rendered = self._backend.render(prompt)
        existing = self._sessions.get(session_id)
        if existing is not None:
            return self._reopen(existing, rendered.text, answer_text, constraint)
        session = self._new_session(
            session_id or uuid.uuid4().hex, rendered.text, rendered.add_special_tokens, answer_text
        )
        if constraint is not None:
            self._constrain(session, constraint)
        self._make_room(session, len(session.context_ids))
        self._sessions[session.session_id] = session
        async with session.lock, self._using(session, len(session.context_ids)):
            timed = await self._backend.sync(session.cache, session.context_ids)
        return OpenedSession(session.session_id, session.prompt_tokens, len(session.context_ids), timed.compute_ms)

    async def generate(
        self,
        session_id: str,
        expected: Expectation,
        append_text: str,
        max_tokens: int,
        stop_strings: tuple[str, ...],
        sampling: Sampling | None = None,
    ) -> Generated:
        """Appends `append_text`, then generates one segment (greedily unless `sampling`)."""
        session = self._get(session_id)
        async with session.lock:
            self._check(session, expected)
            context_ids = session.context_ids
            if append_text:
                context_ids = self._context_ids(session.context_text + append_text, session)
            self._check_fits(len(context_ids) + max_tokens, "context + segment cap")
            checker = self._checked_append(session, append_text)
            async with self._using(session, len(context_ids) + max_tokens):
                before = session.answer_text, session.context_ids, session.checker
                session.answer_text, session.context_ids = session.answer_text + append_text, context_ids
                session.checker = checker
                try:
                    rules = self._rules(session, max_tokens, stop_strings, sampling)
                    timed = await self._backend.generate(session.cache, context_ids, rules)
                except (OverCapacity, InvalidRequest):
                    # Refused before any work: the caller may retry the same call, so it must
                    # find the session as it was.
                    session.answer_text, session.context_ids, session.checker = before
                    raise
        return Generated(timed.value, len(context_ids), timed.compute_ms)

    async def score(self, session_id: str, expected: Expectation, candidates: list[CandidateText]) -> Scored:
        """Scores candidates after the session's context; the context is unchanged."""
        session = self._get(session_id)
        async with session.lock:
            self._check(session, expected)
            rows = [
                self._backend.tokenize(session.context_text + c.text, session.add_special_tokens) for c in candidates
            ]
            for row, candidate in zip(rows, candidates):
                self._check_fits(len(row) + candidate.ends_with_eos, "context + candidate")
            context_ids = session.context_ids
            async with self._using(session, len(context_ids)):
                timed = await self._backend.score(session.cache, context_ids, rows, candidates)
        return Scored(timed.value, len(context_ids), timed.compute_ms)

    def close(self, session_id: str) -> bool:
        """Forgets the session and releases its cache at once, never waiting for model work; a
        call still in flight on it ends with SessionNotFound."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self._backend.release(session.cache)
        self._on_change()
        return session is not None

    def evict_idle(self) -> int:
        """Drops sessions idle for longer than the TTL; returns how many."""
        deadline = self._clock() - self._limits.idle_ttl_s
        stale = [sid for sid, s in self._sessions.items() if s.last_used < deadline and not s.busy]
        for sid in stale:
            self._evict(sid, EVICTED_IDLE)
        return len(stale)

    def load(self) -> Load:
        cached = sum(s.cache.cached_tokens for s in self._sessions.values())
        return Load(len(self._sessions), cached, sum(self._evicted.values()), dict(self._evicted))

    # ---- internals ------------------------------------------------------------------------

    @asynccontextmanager
    async def _using(self, session: Session, reserve: int) -> AsyncIterator[None]:
        """Around a model call: the tokens it may reach are held in the budget, and afterwards
        --no-cache drops the cache, so that the next call re-prefills the whole context."""
        self._make_room(session, reserve)
        session.reserved_tokens = reserve
        try:
            yield
        finally:
            session.reserved_tokens = 0
            if not self._limits.keep_kv_cache:
                self._backend.release(session.cache)
                session.cache = self._backend.new_cache()
            self._on_change()

    def _new_session(self, session_id: str, prompt_text: str, add_special: bool, answer_text: str) -> Session:
        prompt_ids = self._backend.tokenize(prompt_text, add_special)
        if not prompt_ids:
            raise InvalidRequest("prompt renders to zero tokens")
        self._check_fits(len(prompt_ids), "prompt")
        session = Session(
            session_id, prompt_text, add_special, len(prompt_ids), answer_text, prompt_ids, self._backend.new_cache()
        )
        session.context_ids = self._context_ids(prompt_text + answer_text, session) if answer_text else prompt_ids
        session.last_used = self._clock()
        return session

    def _reopen(
        self, session: Session, prompt_text: str, answer_text: str, constraint: Constraint | None
    ) -> OpenedSession:
        if (session.prompt_text, session.answer_text, session.constraint) != (prompt_text, answer_text, constraint):
            raise SessionConflict(
                f"session {session.session_id!r} is already open with a different context; "
                "close it or choose another id"
            )
        self._touch(session)
        return OpenedSession(session.session_id, session.prompt_tokens, len(session.context_ids), 0.0)

    def _constrain(self, session: Session, constraint: Constraint) -> None:
        """Holds the session's answer to `constraint` (docs/design.md section 9.2)."""
        if constraint.kind not in self._backend.description.constraint_kinds:
            raise InvalidRequest(f"this worker does not enforce {constraint.kind} constraints")
        try:
            checker = TextMatcher.of(constraint)
            session.guide = self._backend.guide(constraint)
        except ConstraintError as error:
            raise InvalidRequest(f"constraint: {error}") from None
        if reason := checker.allows(session.answer_text):
            raise InvalidRequest(f"answer_text {reason}")
        checker.advance(session.answer_text)
        session.constraint, session.checker = constraint, checker

    def _checked_append(self, session: Session, append_text: str) -> TextMatcher | None:
        """The session's checker after `append_text`, which must keep the answer in the language."""
        if session.checker is None or not append_text:
            return session.checker
        if reason := session.checker.allows(append_text):
            raise InvalidRequest(f"append_text {reason}")
        return session.checker.after(append_text)

    @staticmethod
    def _rules(
        session: Session, max_tokens: int, stop_strings: tuple[str, ...], sampling: Sampling | None
    ) -> SegmentRules:
        constrained = None if session.guide is None else ConstrainedAnswer(session.guide, session.answer_text)
        return SegmentRules(max_tokens, stop_strings, constrained, sampling)

    def _context_ids(self, context_text: str, session: Session) -> list[int]:
        # The whole context is re-tokenized (a fast tokenizer needs ~1 ms for 2k tokens) so that the
        # ids equal tokenize(prompt + answer) exactly; the cache is then recomputed only from the
        # first id that changed (the backend's sync).
        ids = self._backend.tokenize(context_text, session.add_special_tokens)
        self._check_fits(len(ids), "context")
        return ids

    def _check_fits(self, tokens: int, what: str) -> None:
        limit = self._backend.description.max_context_tokens
        if tokens > limit:
            raise InvalidRequest(f"{what} is {tokens} tokens; the model's limit is {limit} tokens")

    def _get(self, session_id: str) -> Session:
        self.evict_idle()
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"session {session_id!r} not found (never opened, closed or evicted)")
        return session

    def _check(self, session: Session, expected: Expectation) -> None:
        """Checked once the session's previous call ended: a retried call then sees its effect."""
        if self._sessions.get(session.session_id) is not session:
            raise SessionNotFound(f"session {session.session_id!r} was closed or evicted")
        if expected.context_tokens != len(session.context_ids):
            raise StaleContext(
                f"session {session.session_id!r} has {len(session.context_ids)} context tokens; "
                f"the caller expected {expected.context_tokens}"
            )
        if expected.answer_chars is not None and expected.answer_chars != len(session.answer_text):
            raise StaleContext(
                f"session {session.session_id!r} has an answer of {len(session.answer_text)} characters; "
                f"the caller expected {expected.answer_chars}"
            )
        self._touch(session)

    def _touch(self, session: Session) -> None:
        session.last_used = self._clock()
        self._sessions.move_to_end(session.session_id)

    def _make_room(self, session: Session, tokens_needed: int) -> None:
        """Evicts idle least-recently-used sessions until `tokens_needed` more tokens fit the budget."""
        budget = self.token_budget
        if tokens_needed > budget:
            raise OverCapacity(f"request needs {tokens_needed} cached tokens; the worker's budget is {budget}")
        others = [s for s in self._sessions.values() if s is not session]
        held = sum(s.budgeted_tokens for s in others)
        count = len(others) + 1
        idle = [s for s in others if not s.busy]
        while held + tokens_needed > budget or count > self._limits.max_sessions:
            if not idle:
                raise OverCapacity(
                    f"{held} cached tokens in {count - 1} busy sessions; {tokens_needed} more do not fit "
                    f"the worker's budget of {budget} tokens and {self._limits.max_sessions} sessions"
                )
            cause = EVICTED_FOR_BUDGET if held + tokens_needed > budget else EVICTED_FOR_COUNT
            victim = idle.pop(0)
            held -= victim.budgeted_tokens
            count -= 1
            self._evict(victim.session_id, cause)

    def _evict(self, session_id: str, cause: str) -> None:
        self._backend.release(self._sessions.pop(session_id).cache)
        self._evicted[cause] += 1
        self._on_change()
