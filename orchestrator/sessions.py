"""A loop's sessions on its workers: placement on replicas, re-opening, fail-over, dropping, closing.

The fusion loop (fusion.py) decides what to ask; this module decides where each session lives and
what happens when a worker or its pod fails (docs/design.md section 5).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from coolfusion.orchestrator.domain import CandidateScore, Dropped, GeneratedSegment, Prompt
from coolfusion.orchestrator.observer import FusionObserver
from coolfusion.orchestrator.replicas import ReplicaSet
from coolfusion.orchestrator.worker_client import (
    SessionLost,
    WorkerClient,
    WorkerFailed,
    WorkerRejected,
    WorkerUnavailable,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Closing sessions must not hang a finished request on a dead worker.
_CLOSE_TIMEOUT_S = 2.0


class NoWorkersLeft(Exception):
    """Every worker of the request failed; the message names each failure."""


class RejectedByAllWorkers(NoWorkersLeft):
    """Every worker refused the request as invalid: the request is bad, not the service."""


@dataclass(frozen=True)
class Deadline:
    """When a request must end, and how long one worker call may take."""

    at: float  # time.monotonic()
    call_timeout_s: float

    def timeout(self) -> float:
        """The timeout of a worker call starting now."""
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise WorkerFailed("DEADLINE_EXCEEDED: the request's deadline passed")
        return min(remaining, self.call_timeout_s)


class WorkerSession:
    """One worker's session for one loop. It lives on one replica (the pod holding its KV cache);
    a lost session is re-opened with the full text, and a session whose pod is gone moves to
    another replica, so that callers see one session that answers or fails for good."""

    def __init__(self, replicas: ReplicaSet, session_id: str, prompt: Prompt, request_id: str):
        self.replicas = replicas
        self.session_id = session_id
        self.prompt_tokens = 0
        self.context_tokens = 0
        self._prompt = prompt
        self._request_id = request_id
        self._client: WorkerClient | None = None  # the replica holding the session, from placement to close

    @property
    def name(self) -> str:
        return self.replicas.name

    @property
    def placed(self) -> bool:
        return self._client is not None

    @property
    def _replica(self) -> WorkerClient:
        if self._client is None:
            raise RuntimeError(f"{self.name}'s session is used while it is not placed")
        return self._client

    async def place(self, answer_text: str, deadline: Deadline) -> None:
        """Opens the session on the least-loaded replica, moving on while replicas are unreachable."""
        await self._place(answer_text, deadline, tried=(), failure=None)

    async def generate(
        self,
        answer_text: str,
        append: str,
        max_tokens: int,
        stop_strings: tuple[str, ...],
        deadline: Deadline,
    ) -> GeneratedSegment:
        """Appends `append` (the end of `answer_text`, not yet sent), then generates a segment."""

        def call(client: WorkerClient, reopened: bool) -> Awaitable[GeneratedSegment]:
            sent = "" if reopened else append  # a re-opened context already holds it
            return client.generate(
                self.session_id, self.context_tokens, len(answer_text) - len(sent), sent,
                max_tokens, stop_strings, deadline.timeout(),
            )  # fmt: skip

        segment = await self._call(call, answer_text, deadline)
        self.context_tokens = segment.context_tokens
        return segment

    async def score(
        self, candidates: list[tuple[str, bool]], answer_text: str, deadline: Deadline
    ) -> tuple[list[CandidateScore], float]:
        """Scores (text, ends_with_eos) candidates after the context; returns them and the compute ms."""
        return await self._call(
            lambda client, _: client.score(self.session_id, self.context_tokens, candidates, deadline.timeout()),
            answer_text,
            deadline,
        )

    async def close(self) -> None:
        """Closes the session where it lives, if it was placed; never raises."""
        if self._client is None:
            return
        try:
            await self._client.close(self.session_id, _CLOSE_TIMEOUT_S)
        except (WorkerFailed, SessionLost):
            pass  # a worker that cannot be reached will evict the session by its idle TTL
        finally:
            self._release()

    # ---- internals ------------------------------------------------------------------------

    async def _call(
        self, call: Callable[[WorkerClient, bool], Awaitable[T]], answer_text: str, deadline: Deadline
    ) -> T:
        """`call(client, reopened=False)`; when the session was lost, or its pod is gone, re-opens
        it (on another replica if the pod is gone) and tries once more with `reopened=True`."""
        try:
            return await call(self._replica, False)
        except SessionLost as lost:
            logger.info("re-opening %s after %s", self.name, lost, extra={"request_id": self._request_id})
            await self._reopen(answer_text, deadline)
        except WorkerUnavailable as gone:
            await self._fail_over(gone, answer_text, deadline)
        try:
            return await call(self._replica, True)
        except SessionLost as lost:
            raise WorkerFailed(f"session lost twice: {lost}") from lost

    async def _open(self, answer_text: str, deadline: Deadline) -> None:
        opened = await self._replica.open(self.session_id, self._prompt, answer_text, deadline.timeout())
        self.prompt_tokens, self.context_tokens = opened.prompt_tokens, opened.context_tokens

    async def _place(
        self, answer_text: str, deadline: Deadline, tried: tuple[WorkerClient, ...], failure: WorkerFailed | None
    ) -> None:
        """Like `place`, never trying a replica in `tried`; `failure` is the reason given when none is left."""
        attempted = list(tried)
        while (client := await self.replicas.acquire(exclude=attempted)) is not None:
            self._client = client
            attempted.append(client)
            try:
                return await self._open(answer_text, deadline)
            except WorkerUnavailable as gone:
                self.replicas.mark_failed(client)
                self._release()
                failure = gone
        if failure is None:
            raise WorkerUnavailable(f"UNAVAILABLE: {self.replicas.problem or f'no replica of {self.name}'}")
        if len(attempted) > 1:
            raise WorkerUnavailable(f"{failure} (all {len(attempted)} replicas tried)") from failure
        raise failure

    async def _reopen(self, answer_text: str, deadline: Deadline) -> None:
        """Re-creates a lost or desynchronised session from the full text, on the same replica."""
        try:
            await self._replica.close(self.session_id, _CLOSE_TIMEOUT_S)
        except (WorkerFailed, SessionLost):
            pass
        await self._open(answer_text, deadline)

    async def _fail_over(self, gone: WorkerUnavailable, answer_text: str, deadline: Deadline) -> None:
        """The session's pod is gone: re-open the session on another replica, with the full text."""
        failed = self._replica
        logger.warning(
            "moving %s's session off replica %s: %s", self.name, failed.address, gone,
            extra={"request_id": self._request_id},
        )  # fmt: skip
        self.replicas.mark_failed(failed)
        self._release()
        await self._place(answer_text, deadline, (failed,), gone)

    def _release(self) -> None:
        if self._client is not None:
            self.replicas.release(self._client)
            self._client = None


class SessionGroup:
    """The sessions of one loop: calls them all at once, drops the workers that fail (the rest go
    on), and closes every session it opened, dropped ones included."""

    def __init__(self, sessions: list[WorkerSession], purpose: str, request_id: str, observer: FusionObserver):
        self.active = list(sessions)  # in worker order; the first is the lead (its tokens count length)
        self.dropped: list[Dropped] = []
        self._dropped_sessions: list[WorkerSession] = []
        self._purpose = purpose
        self._request_id = request_id
        self._observer = observer
        self._rejections = 0  # drops that were the worker refusing the request as invalid

    @property
    def lead(self) -> WorkerSession:
        return self.active[0]

    async def fan_out(self, call: Callable[[WorkerSession], Awaitable[T]], step: int) -> dict[str, T]:
        """Calls every active session concurrently; drops those that fail; returns answers by worker."""
        sessions = list(self.active)
        results = await asyncio.gather(*(call(s) for s in sessions), return_exceptions=True)
        answers: dict[str, T] = {}
        for session, result in zip(sessions, results):
            if isinstance(result, WorkerFailed):
                self._drop(session, result, step)
            elif isinstance(result, BaseException):
                raise result
            else:
                answers[session.name] = result
        return answers

    async def close_all(self) -> None:
        """Closes every session that was placed, concurrently."""
        placed = [s for s in self.active + self._dropped_sessions if s.placed]
        await asyncio.gather(*(s.close() for s in placed))

    def _drop(self, session: WorkerSession, error: WorkerFailed, step: int) -> None:
        reason = str(error)
        logger.warning("dropping worker %s: %s", session.name, reason, extra={"request_id": self._request_id})
        self._observer.on_drop(self._purpose, session.name, error)
        self.active.remove(session)
        self._dropped_sessions.append(session)  # its session is still closed at the end, if reachable
        self.dropped.append(Dropped(session.name, reason, step))
        self._rejections += isinstance(error, WorkerRejected)
        if not self.active:
            failures = "; ".join(f"{d.worker}: {d.reason}" for d in self.dropped)
            if self._rejections == len(self.dropped):
                raise RejectedByAllWorkers(f"every worker refused the request: {failures}")
            raise NoWorkersLeft(f"no workers left: {failures}")
