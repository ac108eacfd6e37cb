"""What a fusion reports while it runs (requests, steps, drops, worker calls), behind one small
interface, so that the fusion loop and the worker client know nothing of metrics or tracing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coolfusion.orchestrator.domain import Step

Metadata = tuple[tuple[str, str], ...]
_NOTHING = nullcontext()
_NO_METADATA: AbstractContextManager[Metadata] = nullcontext(())


class FusionObserver:
    """Receives a fusion's events. This base ignores them all, for a method call each."""

    def fusion(self, request_id: str) -> AbstractContextManager[object]:
        """Entered around one whole fusion request."""
        return _NOTHING

    def step(self, loop: str, index: int) -> AbstractContextManager[object]:
        """Entered around step `index` of `loop` ("fused", or "solo" for a Cool+R solo answer)."""
        return _NOTHING

    def on_step(self, loop: str, step: Step, step_ms: float) -> None:
        """A step of `loop` chose its winner after `step_ms` of wall time (called inside `step`)."""

    def on_drop(self, loop: str, worker: str, error: Exception) -> None:
        """`worker` was dropped from `loop` ("fused", "solo" or "rerank") because of `error`."""

    def worker_call(self, method: str, worker: str, address: str) -> AbstractContextManager[Metadata]:
        """Entered around one RPC (`/package.Service/Method`) to the replica at `address` of
        `worker`; yields metadata to send with it (the trace context)."""
        return _NO_METADATA


NO_OBSERVER = FusionObserver()
# The observer of the request being served. FusionLoop and WorkerClient are built by code that
# has no observer to hand them (fuse(), the registry), so the servicer sets it per request here;
# asyncio tasks copy it, so every worker call of the request's fan-outs sees it.
_current: ContextVar[FusionObserver] = ContextVar("coolfusion_fusion_observer", default=NO_OBSERVER)


@contextmanager
def observing(observer: FusionObserver) -> Iterator[None]:
    """Makes `observer` the one that fusion loops and worker calls started inside report to."""
    token = _current.set(observer)
    try:
        yield
    finally:
        _current.reset(token)


def current_observer() -> FusionObserver:
    return _current.get()
