"""A loop's sessions on its workers: placement on replicas, re-opening, fail-over, dropping, closing.

The fusion loop (fusion.py) decides what to ask; this module decides where each session lives and
what happens when a worker or its pod fails (docs/design.md section 5).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from coolfusion.constraints import Constraint
from coolfusion.orchestrator.domain import CandidateScore, Dropped, GeneratedSegment, Prompt
from coolfusion.orchestrator.observer import FusionObserver
from coolfusion.orchestrator.replicas import ReplicaSet
from coolfusion.orchestrator.sampling import Draw
from coolfusion.orchestrator.worker_client import (
    SessionLost,
    WorkerBusy,
    WorkerClient,
    WorkerFailed,
    WorkerRejected,
    WorkerUnavailable,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Closing sessions must not hang a finished request on a dead worker; an undelivered close is
# retried in the background (ReplicaSet.close_later).
_CLOSE_TIMEOUT_S = 2.0
# A busy worker is asked again after a short, growing, jittered pause: long enough for a batching
# worker to finish a few passes, short enough to add little latency once it has room.
_BUSY_FIRST_PAUSE_S = 0.05
_BUSY_MAX_PAUSE_S = 1.0


class NoWorkersLeft(Exception):
    """Every worker of the request failed; the message names each failure."""


class RejectedByAllWorkers(NoWorkersLeft):
    """Every worker refused the request as invalid: the request is bad, not the service."""


class WorkersOverloaded(Exception):
    """A worker stayed busy (RESOURCE_EXHAUSTED) for longer than the request may wait: the request
    fails as a whole, retryable, rather than going on without that worker."""


@dataclass(frozen=True)
class Deadline:
    """When a request must end, how long one worker call may take, and how long a call may keep
    waiting for a busy worker."""

    at: float  # time.monotonic()
    call_timeout_s: float
    busy_wait_s: float = 30.0

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

    def __init__(
        self,
        replicas: ReplicaSet,
        session_id: str,
        prompt: Prompt,
        request_id: str,
        constraint: Constraint | None = None,
    ):
        self.replicas = replicas
        self.session_id = session_id
        self.prompt_tokens = 0
        self.context_tokens = 0
        self._prompt = prompt
        self._constraint = constraint  # sent with every open, re-opens included
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
        draw: Draw | None = None,
    ) -> GeneratedSegment:
        """Appends `append` (the end of `answer_text`, not yet sent), then generates a segment
        (greedily, or drawn as `draw` says: a retry draws with the same seed)."""

        def call(client: WorkerClient, reopened: bool) -> Awaitable[GeneratedSegment]:
            sent = "" if reopened else append  # a re-opened context already holds it
            return client.generate(
                self.session_id, self.context_tokens, len(answer_text) - len(sent), sent,
                max_tokens, stop_strings, deadline.timeout(), draw,
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
        """Closes the session where it lives, if it was placed; never raises. A close that cannot
        be delivered now is retried in the background, so the session does not hold the worker's
        memory until its idle TTL."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await client.close(self.session_id, _CLOSE_TIMEOUT_S)
        except SessionLost:
            pass  # already gone (evicted, or its worker restarted)
        except (WorkerFailed, WorkerBusy) as error:
            logger.info("closing %s's session failed (%s); retrying in the background", self.name, error)
            self.replicas.close_later(client, self.session_id)
            return  # the retry releases the session's place on the pod
        self.replicas.release(client)

    # ---- internals ------------------------------------------------------------------------

    async def _call(
        self, call: Callable[[WorkerClient, bool], Awaitable[T]], answer_text: str, deadline: Deadline
    ) -> T:
        """`call(client, reopened=False)`; when the session was lost, or its pod is gone, re-opens
        it (on another replica if the pod is gone) and tries once more with `reopened=True`."""
        try:
            return await self._patiently(lambda: call(self._replica, False), deadline)
        except SessionLost as lost:
            logger.info("re-opening %s after %s", self.name, lost, extra={"request_id": self._request_id})
            await self._reopen(answer_text, deadline)
        except WorkerUnavailable as gone:
            await self._fail_over(gone, answer_text, deadline)
        try:
            return await self._patiently(lambda: call(self._replica, True), deadline)
        except SessionLost as lost:
            raise WorkerFailed(f"session lost twice: {lost}") from lost

    async def _patiently(self, call: Callable[[], Awaitable[T]], deadline: Deadline) -> T:
        """`call()`, asked again while the worker is busy, until the request's deadline or its
        busy wait runs out; then the whole request fails as overloaded (docs/design.md section 5.4)."""
        pause, give_up = _BUSY_FIRST_PAUSE_S, time.monotonic() + deadline.busy_wait_s
        while True:
            try:
                return await call()
            except WorkerBusy as busy:
                if time.monotonic() + pause >= min(give_up, deadline.at):
                    raise WorkersOverloaded(f"{self.name} stayed busy: {busy}") from busy
                await asyncio.sleep(pause * random.uniform(0.5, 1.5))
                pause = min(2 * pause, _BUSY_MAX_PAUSE_S)

    async def _open(self, answer_text: str, deadline: Deadline) -> None:
        opened = await self._patiently(
            lambda: self._replica.open(
                self.session_id, self._prompt, answer_text, deadline.timeout(), self._constraint
            ),
            deadline,
        )
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

    def drop(self, name: str, error: WorkerFailed, step: int) -> None:
        """Leaves a worker out of the rest of the loop, as if its call had failed with `error`."""
        self._drop(next(s for s in self.active if s.name == name), error, step)

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
