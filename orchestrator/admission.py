"""Admission control: at most so many fusions run at once; a few more wait briefly; the rest are
refused with RESOURCE_EXHAUSTED before any worker session opens (docs/design.md section 5.4)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass


class Overloaded(Exception):
    """The orchestrator is at its limit of fusions; the caller may retry later (RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class AdmissionLimits:
    """docs/performance.md has the measurements behind these defaults."""

    # Fusions running at once. Each holds a session on every worker; a batching worker advances
    # up to 16 sessions per pass by default, so more running fusions only queue inside the workers.
    max_running: int = 16
    # Fusions waiting for a slot; beyond it a request is refused at once.
    max_waiting: int = 64
    # How long a request may wait for a slot (and never past its own deadline).
    max_wait_s: float = 30.0


class Admission:
    """Slots for running fusions, handed to waiters in arrival order."""

    def __init__(self, limits: AdmissionLimits, on_refused: Callable[[str], None] | None = None):
        self.limits = limits
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._on_refused = on_refused or (lambda reason: None)  # reason: "queue_full" or "wait_timeout"

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def slot(self, wait_s: float) -> AsyncIterator[None]:
        """Holds a slot for the body; waits at most `wait_s` (capped by the limits) for one."""
        await self._acquire(min(wait_s, self.limits.max_wait_s))
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, wait_s: float) -> None:
        if self.running < self.limits.max_running and not self._waiting:
            self.running += 1
            return
        if len(self._waiting) >= self.limits.max_waiting:
            self._on_refused("queue_full")
            raise Overloaded(
                f"{self.running} fusions running and {len(self._waiting)} waiting, the orchestrator's limits "
                f"(--max-running-fusions {self.limits.max_running}, --max-waiting-fusions {self.limits.max_waiting})"
            )
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(granted)
        try:
            await asyncio.wait_for(asyncio.shield(granted), max(wait_s, 0.0))
        except (TimeoutError, asyncio.CancelledError) as stop:
            self._withdraw(granted)
            if isinstance(stop, asyncio.CancelledError):
                raise
            self._on_refused("wait_timeout")
            raise Overloaded(
                f"no fusion slot freed within {wait_s:.1f} s ({self.running} running, the limit is "
                f"{self.limits.max_running})"
            ) from None

    def _withdraw(self, granted: asyncio.Future[None]) -> None:
        """A waiter gives up; a slot granted to it at that very moment passes on."""
        if granted.done():
            self._release()
        else:
            granted.cancel()
            self._waiting.remove(granted)

    def _release(self) -> None:
        """Hands the slot to the first waiter, or frees it."""
        while self._waiting:
            granted = self._waiting.popleft()
            if not granted.done():
                granted.set_result(None)
                return
        self.running -= 1
