"""Sessions: each holds a prompt, the answer so far and its KV cache, under a token budget."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from coolfusion.worker.errors import (
    InvalidRequest,
    OverCapacity,
    SessionConflict,
    SessionNotFound,
    StaleContext,
)
from coolfusion.worker.model import CandidateText, KVState, LanguageModel, PromptSpec, Segment, TextScore
from coolfusion.worker.settings import SessionLimits

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
    kv: KVState = field(default_factory=KVState)
    last_used: float = 0.0

    @property
    def context_text(self) -> str:
        return self.prompt_text + self.answer_text

    @property
    def cached_tokens(self) -> int:
        return len(self.kv.ids)


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


@dataclass(frozen=True)
class Load:
    open_sessions: int
    cached_tokens: int
    evicted_sessions: int
    evicted_by_cause: dict[str, int] = field(default_factory=dict)  # cause (EVICTION_CAUSES) -> count


class SessionStore:
    """Sessions in least-recently-used order, bounded by count, cached tokens and idle time.

    Not thread-safe: the worker runs every store call on its single model thread.
    """

    def __init__(self, lm: LanguageModel, limits: SessionLimits, clock: Callable[[], float] = time.monotonic):
        self._lm = lm
        self._limits = limits
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._evicted = dict.fromkeys(EVICTION_CAUSES, 0)

    # ---- public operations ----------------------------------------------------------------

    def open(self, session_id: str, prompt: PromptSpec, answer_text: str) -> OpenedSession:
        """Creates a session and prefills its cache; re-opening the same context is a no-op."""
        self.evict_idle()
        prompt_text, add_special = self._lm.render(prompt)
        existing = self._sessions.get(session_id)
        if existing is not None:
            return self._reopen(existing, prompt_text, answer_text)
        session = self._new_session(session_id or uuid.uuid4().hex, prompt_text, add_special, answer_text)
        self._make_room(session.session_id, len(session.context_ids))
        self._sessions[session.session_id] = session
        self._lm.sync(session.kv, session.context_ids)
        return OpenedSession(session.session_id, session.prompt_tokens, len(session.context_ids))

    def generate(
        self,
        session_id: str,
        expected: Expectation,
        append_text: str,
        max_tokens: int,
        stop_strings: tuple[str, ...],
    ) -> tuple[Segment, int]:
        """Appends `append_text`, then generates one segment; returns it and the context length."""
        session = self._checkout(session_id, expected)
        context_ids = session.context_ids
        if append_text:
            context_ids = self._context_ids(session.prompt_text + session.answer_text + append_text, session)
        self._check_fits(len(context_ids) + max_tokens, "context + segment cap")
        if append_text:
            session.answer_text += append_text
            session.context_ids = context_ids
        self._make_room(session_id, len(session.context_ids) + max_tokens)
        segment = self._lm.generate_segment(session.kv, session.context_ids, max_tokens, stop_strings)
        self._drop_cache_unless_kept(session)
        return segment, len(session.context_ids)

    def score(
        self, session_id: str, expected: Expectation, candidates: list[CandidateText]
    ) -> tuple[list[TextScore], int]:
        """Scores candidates after the session's context; the context is unchanged."""
        session = self._checkout(session_id, expected)
        rows = self._lm.candidate_rows(session.context_text, session.add_special_tokens, candidates)
        for row, candidate in zip(rows, candidates):
            self._check_fits(len(row) + candidate.ends_with_eos, "context + candidate")
        scores = self._lm.score(session.kv, session.context_ids, rows, candidates)
        self._drop_cache_unless_kept(session)
        return scores, len(session.context_ids)

    def close(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    def evict_idle(self) -> int:
        """Drops sessions idle for longer than the TTL; returns how many."""
        deadline = self._clock() - self._limits.idle_ttl_s
        stale = [sid for sid, s in self._sessions.items() if s.last_used < deadline]
        for sid in stale:
            self._evict(sid, EVICTED_IDLE)
        return len(stale)

    def load(self) -> Load:
        cached = sum(s.cached_tokens for s in self._sessions.values())
        return Load(len(self._sessions), cached, sum(self._evicted.values()), dict(self._evicted))

    # ---- internals ------------------------------------------------------------------------

    def _new_session(self, session_id: str, prompt_text: str, add_special: bool, answer_text: str) -> Session:
        prompt_ids = self._lm.tokenize(prompt_text, add_special)
        if not prompt_ids:
            raise InvalidRequest("prompt renders to zero tokens")
        self._check_fits(len(prompt_ids), "prompt")
        session = Session(session_id, prompt_text, add_special, len(prompt_ids), answer_text, prompt_ids)
        session.context_ids = self._context_ids(prompt_text + answer_text, session) if answer_text else prompt_ids
        session.last_used = self._clock()
        return session

    def _reopen(self, session: Session, prompt_text: str, answer_text: str) -> OpenedSession:
        if (session.prompt_text, session.answer_text) != (prompt_text, answer_text):
            raise SessionConflict(
                f"session {session.session_id!r} is already open with a different context; "
                "close it or choose another id"
            )
        self._touch(session)
        return OpenedSession(session.session_id, session.prompt_tokens, len(session.context_ids))

    def _context_ids(self, context_text: str, session: Session) -> list[int]:
        # The whole context is re-tokenized (a fast tokenizer needs ~1 ms for 2k tokens) so that the
        # ids equal tokenize(prompt + answer) exactly; the cache is then recomputed only from the
        # first id that changed (LanguageModel.sync).
        ids = self._lm.tokenize(context_text, session.add_special_tokens)
        self._check_fits(len(ids), "context")
        return ids

    def _drop_cache_unless_kept(self, session: Session) -> None:
        # --no-cache: the session keeps its ids (the caller's expectations still hold) but not
        # its KV state, so the next call re-prefills the whole context.
        if not self._limits.keep_kv_cache:
            session.kv = KVState()

    def _check_fits(self, tokens: int, what: str) -> None:
        limit = self._lm.max_context_tokens
        if tokens > limit:
            raise InvalidRequest(f"{what} is {tokens} tokens; the model's limit is {limit} tokens")

    def _checkout(self, session_id: str, expected: Expectation) -> Session:
        self.evict_idle()
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"session {session_id!r} not found (never opened, closed or evicted)")
        if expected.context_tokens != len(session.context_ids):
            raise StaleContext(
                f"session {session_id!r} has {len(session.context_ids)} context tokens; "
                f"the caller expected {expected.context_tokens}"
            )
        if expected.answer_chars is not None and expected.answer_chars != len(session.answer_text):
            raise StaleContext(
                f"session {session_id!r} has an answer of {len(session.answer_text)} characters; "
                f"the caller expected {expected.answer_chars}"
            )
        self._touch(session)
        return session

    def _touch(self, session: Session) -> None:
        session.last_used = self._clock()
        self._sessions.move_to_end(session.session_id)

    def _make_room(self, session_id: str, tokens_needed: int) -> None:
        """Evicts least-recently-used sessions until `tokens_needed` more tokens fit the budget."""
        budget = self._limits.token_budget
        if tokens_needed > budget:
            raise OverCapacity(f"request needs {tokens_needed} cached tokens; the worker's budget is {budget}")
        own = self._sessions.get(session_id)
        others = [sid for sid in self._sessions if sid != session_id]
        held = self.load().cached_tokens - (own.cached_tokens if own else 0)
        count = len(others) + 1
        while others and (held + tokens_needed > budget or count > self._limits.max_sessions):
            cause = EVICTED_FOR_BUDGET if held + tokens_needed > budget else EVICTED_FOR_COUNT
            victim = others.pop(0)
            held -= self._sessions[victim].cached_tokens
            count -= 1
            self._evict(victim, cause)

    def _evict(self, session_id: str, cause: str) -> None:
        del self._sessions[session_id]
        self._evicted[cause] += 1
