"""What each worker says of itself (GetInfo), asked at most every 30 seconds per worker: which
constraints it enforces decides whether it takes part in a constrained request."""

from __future__ import annotations

import asyncio
import time

from coolfusion.constraints import ConstraintKind
from coolfusion.constraints.protocol import kind_number
from coolfusion.orchestrator.domain import Dropped
from coolfusion.orchestrator.replicas import ReplicaSet
from coolfusion.orchestrator.worker_client import SessionLost, WorkerFailed
from coolfusion.v1 import worker_pb2

# A rolling update may put another build behind the same name; what a worker said is asked again
# after this long.
_INFO_TTL_S = 30.0
_GET_INFO_TIMEOUT_S = 5.0


class WorkerInfo:
    """GetInfo answers by worker name, each kept for 30 seconds."""

    def __init__(self) -> None:
        self._answers: dict[str, tuple[float, worker_pb2.GetInfoResponse]] = {}

    async def of(self, replicas: ReplicaSet) -> worker_pb2.GetInfoResponse | None:
        """The first replica's answer that comes; None when no replica answers (the request then
        meets the failure itself, and fails over or drops the worker as usual)."""
        cached = self._answers.get(replicas.name)
        if cached is not None and time.monotonic() - cached[0] < _INFO_TTL_S:
            return cached[1]
        for pod in await replicas.pods():
            try:
                info = await pod.get_info(_GET_INFO_TIMEOUT_S)
            except (WorkerFailed, SessionLost):
                continue
            self._answers[replicas.name] = (time.monotonic(), info)
            return info
        return None

    async def enforcing(
        self, workers: list[ReplicaSet], kind: ConstraintKind
    ) -> tuple[list[ReplicaSet], list[Dropped]]:
        """The workers that say they enforce `kind`, and the others, each with why it is left out."""
        answers = await asyncio.gather(*(self.of(w) for w in workers))
        wanted = kind_number(kind)
        kept, left_out = [], []
        for worker, info in zip(workers, answers):
            if info is None or wanted in info.constraint_kinds:
                kept.append(worker)
            else:
                engine = info.engine or "an unnamed engine"
                reason = (
                    f"does not enforce {kind} constraints (GetInfo.constraint_kinds; {engine} {info.server_version})"
                )
                left_out.append(Dropped(worker.name, reason, 0))
        return kept, left_out
