"""Runs model work on one dedicated thread, so the event loop keeps serving health and cancels."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from coolfusion.worker.errors import OverCapacity

T = TypeVar("T")


class ModelThread:
    """A single worker thread with a bounded queue.

    One thread because the model (and the session store) is not thread-safe and a forward pass
    already uses every core; a bound so that overload is refused quickly instead of piling up.
    """

    def __init__(self, max_queued: int, after_each: Callable[[], None] | None = None):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._max_queued = max_queued
        self._queued = 0
        # Runs on this thread after every call (outside its timing): the one moment when state that
        # only this thread may touch, such as the session store's load, can be read safely.
        self._after_each = after_each

    @property
    def queued(self) -> int:
        """Calls waiting for the thread or running on it."""
        return self._queued

    async def run(self, fn: Callable[..., T], *args) -> T:
        result, _ = await self.run_timed(fn, *args)
        return result

    async def run_timed(self, fn: Callable[..., T], *args) -> tuple[T, float]:
        """Runs `fn(*args)` on the model thread; returns its result and its run time (ms, queueing excluded)."""
        if self._queued >= self._max_queued:
            raise OverCapacity(f"{self._queued} model calls already queued; the limit is {self._max_queued}")

        def timed() -> tuple[T, float]:
            started = time.perf_counter()
            try:
                result = fn(*args)
                return result, (time.perf_counter() - started) * 1000
            finally:  # a failed call may still have changed state (evicted sessions, say)
                if self._after_each is not None:
                    self._after_each()

        self._queued += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, timed)
        finally:
            self._queued -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
