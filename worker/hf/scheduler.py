"""Continuous batching: one model thread that, each pass, advances every pending call of every
session in one packed forward pass (docs/design.md section 4.6).

A call joins at the next pass after it arrives and leaves as soon as its result is known, so no
session waits for another's whole segment. Decoding sessions are served first (one token each),
then prefill chunks and candidates to score fill the pass up to its token limit, in arrival order:
a long prefill is chunked beside the decoding sessions instead of stalling them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any, TypeVar

import torch

from coolfusion.worker.backend import PassObserver, PassStats, Timed
from coolfusion.worker.errors import OverCapacity, SessionNotFound
from coolfusion.worker.hf.jobs import Job
from coolfusion.worker.hf.kv import SessionKV
from coolfusion.worker.hf.model import Feed, HFModel
from coolfusion.worker.settings import BatchLimits

logger = logging.getLogger(__name__)

T = TypeVar("T")
# A session's next call is a round trip through gRPC and the event loop, about a millisecond each
# for a handful of sessions on a CPU; waiting up to a quarter of a pass for them costs at most a
# quarter pass and saves whole passes run without them (docs/performance.md has the figures).
_COALESCE_SHARE = 0.25
_COALESCE_MAX_S = 0.05


class Scheduler:
    """Owns the model thread. Calls are submitted from the event loop as jobs; their futures are
    resolved from the model thread; a cancelled future drops its job at the next pass.

    The queues change only under `_wake`, so that the event loop can tell at any moment whether
    a session's cache is in use by a call (`release`).
    """

    def __init__(self, model: HFModel, limits: BatchLimits):
        self._model = model
        self._limits = limits
        self._last_pass_s = 0.0
        self._incoming: deque[Job] = deque()
        self._active: list[Job] = []
        self._wake = threading.Condition()
        self._stopping = False
        self.passes = 0  # forward passes run so far
        self.observer: PassObserver | None = None  # told of every pass (the worker's metrics)
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Calls waiting or running (a plain read, safe from any thread)."""
        return len(self._incoming) + len(self._active)

    async def run(self, job: Job) -> Timed[Any]:
        """Runs `job` to its end; cancelling the caller drops the job at the next pass."""
        with self._wake:
            if self._stopping:
                raise OverCapacity("the worker is shutting down")
            if self.queue_depth >= self._limits.max_queued:
                raise OverCapacity(
                    f"{self.queue_depth} model calls already queued; the limit is {self._limits.max_queued}"
                )
            self._incoming.append(job)
            self._wake.notify()
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            # At once, not through the event loop's callbacks: the session's next call may be
            # submitted as soon as this one unwinds, and must not meet this job still running.
            job.future.cancel()
            raise

    def release(self, kv: SessionKV) -> None:
        """Frees the cache of a session that is gone (closed or evicted), never waiting for the
        model thread: at once when none of its calls is queued or running; otherwise that call
        fails with NOT_FOUND before its next pass, and the cache is freed as it leaves (a pass
        already running on it ends first)."""
        with self._wake:
            kv.closed = True
            self._free_unheld([kv])

    def stop(self) -> None:
        """Ends the model thread after its current pass; pending calls fail."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    # ---- the model thread -----------------------------------------------------------------

    def _run(self) -> None:
        returning: set[int] = set()  # sessions (ids of their caches) whose call just ended
        while self._admit(returning):
            self._drop_abandoned()
            # A call can end as it starts (a segment whose first token already ends it, a context
            # already in the cache): it is answered at once, not after somebody else's pass.
            if returning := self._retire():
                continue
            plan = self._plan()
            if plan:
                self._pass(plan)
            del plan  # while the thread waits, a closed session's cache must be freeable
            returning = self._retire()
        for job in [*self._active, *self._incoming]:
            job.fail(OverCapacity("the worker is shutting down"))
            job.settle()

    def _admit(self, returning: set[int]) -> bool:
        """Waits for work; starts the calls that arrived. False once the scheduler stops.

        A session's calls come one after another, each a round trip through the event loop; a
        pass started the moment the last one ended would run without the sessions that just
        finished a call and are sending their next. So while other calls are in flight, the
        next pass waits for those `returning` sessions to come back, up to a share of a pass.
        It waits for those very sessions: counting any arrival would let two groups of sessions,
        each arriving while the other's pass runs, alternate in half-full passes for good.
        """
        with self._wake:
            while not self._incoming and not self._active and not self._stopping:
                self._wake.wait()
            if returning and (self._active or self._incoming):
                wait_s = min(_COALESCE_MAX_S, _COALESCE_SHARE * self._last_pass_s)
                self._wake.wait_for(lambda: self._stopping or returning <= self._arriving(), wait_s)
            if self._stopping:
                return False
            arrived = [job for job in self._incoming if not job.future.cancelled()]
            # A session has one call at a time; an older job on its cache belongs to a caller
            # that gave up, and must not touch the cache any more.
            superseded: list[Job] = []
            for job in arrived:
                superseded += [other for other in self._active if other.kv is job.kv]
                self._active = [other for other in self._active if other.kv is not job.kv] + [job]
            dropped = [job.kv for job in self._incoming]
            self._incoming.clear()
            self._free_unheld(dropped)
        for job in superseded:
            job.fail(RuntimeError("superseded by a newer call on the same session"))
            job.settle()
        for job in arrived:
            try:
                job.start()
            except Exception as error:  # noqa: BLE001 - a job that cannot start fails alone
                job.fail(error)
        return True

    def _arriving(self) -> set[int]:
        return {id(job.kv) for job in self._incoming}

    def _plan(self) -> list[tuple[Job, list[Feed]]]:
        """This pass's feeds: decoding jobs first, then the others in arrival order."""
        limits = self._limits
        budget = limits.max_tokens
        plan: list[tuple[Job, list[Feed]]] = []
        ordered = sorted((j for j in self._active if not j.finished), key=lambda job: not job.decoding)
        for job in ordered[: limits.max_sessions]:
            try:
                feeds = job.next_feeds(budget, alone=not plan)
            except Exception as error:  # a call that cannot plan fails alone, not the thread
                logger.exception("planning a call failed", exc_info=error)
                job.kv.clear()
                job.fail(error)
                continue
            if feeds:
                plan.append((job, feeds))
                budget -= sum(len(feed.tokens) for feed in feeds)
        return plan

    def _pass(self, plan: list[tuple[Job, list[Feed]]]) -> None:
        feeds = [feed for _, job_feeds in plan for feed in job_feeds]
        for job, _ in plan:
            job.mark_pass()
        started = time.perf_counter()
        try:
            logits = self._model.forward(feeds)
        except Exception as error:  # noqa: BLE001 - the pass's calls fail; the others go on
            self._fail_pass(plan, error)
            return
        self.passes += 1
        self._last_pass_s = time.perf_counter() - started
        if self.observer is not None:
            tokens = sum(len(feed.tokens) for feed in feeds)
            self.observer(PassStats(len(plan), tokens, self._last_pass_s))
        at = 0
        for job, job_feeds in plan:
            job.absorb(job_feeds, logits[at : at + len(job_feeds)])
            at += len(job_feeds)

    def _fail_pass(self, plan: list[tuple[Job, list[Feed]]], error: Exception) -> None:
        """A pass that raised leaves its sessions' caches unknown: they are cleared (the next call
        re-prefills) and the pass's calls fail; the other calls go on."""
        if isinstance(error, torch.OutOfMemoryError):
            error = OverCapacity(f"the model ran out of device memory for a pass of {len(plan)} calls")
        logger.exception("a forward pass failed; failing its %d calls", len(plan), exc_info=error)
        for job, _ in plan:
            job.kv.clear()
            job.fail(error)

    def _drop_abandoned(self) -> None:
        """Before planning a pass: calls whose caller gave up leave; calls on a closed session
        fail, to be retired with their caches freed."""
        for job in self._active:
            if job.kv.closed and not job.finished:
                job.fail(SessionNotFound("the session was closed while this call was queued or running"))
        with self._wake:
            cancelled = [job for job in self._active if job.future.cancelled()]
            self._active = [job for job in self._active if job not in cancelled]
            self._free_unheld([job.kv for job in cancelled])

    def _retire(self) -> set[int]:
        """Hands finished calls their results; returns their sessions (ids of their caches)."""
        finished = [job for job in self._active if job.finished]
        # Out of the queue before their callers hear back: a caller's next call must find room.
        with self._wake:
            self._active = [job for job in self._active if not job.finished]
            self._free_unheld([job.kv for job in finished])
        for job in finished:
            job.settle()
        return {id(job.kv) for job in finished}

    def _free_unheld(self, caches: list[SessionKV]) -> None:
        """Frees each closed cache that no queued or running call holds (called under `_wake`)."""
        held = {id(job.kv) for job in (*self._incoming, *self._active)}
        for kv in caches:
            if kv.closed and id(kv) not in held:
                kv.free()
