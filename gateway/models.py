"""The models the gateway serves: the fusion of all registered workers, and each worker alone."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from coolfusion.client import AsyncFusionClient, FuseOptions
from coolfusion.gateway.errors import ApiError
from coolfusion.gateway.parsing import FusionCall, bind_model
from coolfusion.v1 import orchestrator_pb2

logger = logging.getLogger(__name__)

# ListWorkers probes every worker with a 2 s limit of its own; this bounds the whole call.
LIST_TIMEOUT_S = 10.0


class ModelCatalogue:
    """Answers /v1/models and resolves a request's model to its workers. The registry comes from
    ListWorkers, fetched at most once per `ttl_s`: every request naming a worker checks it, and
    ListWorkers probes every worker."""

    def __init__(self, client: AsyncFusionClient, fusion_model: str, ttl_s: float, created: int):
        self._client = client
        self._fusion_model = fusion_model
        self._ttl_s = ttl_s
        self._created = created  # the gateway's start: the models' creation time, stable across calls
        self._workers: list[orchestrator_pb2.WorkerStatus] = []
        self._fetched = -math.inf
        self._lock = asyncio.Lock()  # one ListWorkers at a time; the others wait for its answer

    async def workers(self) -> list[orchestrator_pb2.WorkerStatus]:
        """The registered workers, except one named like the fusion model (the fusion keeps the name)."""
        async with self._lock:
            if time.monotonic() - self._fetched > self._ttl_s:
                statuses = await self._client.list_workers(timeout_s=LIST_TIMEOUT_S)
                if any(s.name == self._fusion_model for s in statuses):
                    logger.warning("worker %r is hidden behind the fusion model of that name", self._fusion_model)
                self._workers = [s for s in statuses if s.name != self._fusion_model]
                self._fetched = time.monotonic()
        return self._workers

    async def options_for(self, call: FusionCall) -> FuseOptions:
        """The fusion options with the model's workers; 404 for a model that does not exist."""
        if call.model == self._fusion_model:  # needs no look-up: the orchestrator checks `workers`
            return bind_model(call, self._fusion_model, is_worker=False)
        names = {w.name for w in await self.workers()}
        return bind_model(call, self._fusion_model, is_worker=call.model in names)

    async def listing(self) -> dict[str, Any]:
        """The /v1/models body: the fusion first, then each worker in registry order."""
        workers = await self.workers()
        return {"object": "list", "data": [self._fusion_card(workers), *map(self._worker_card, workers)]}

    async def card(self, model: str) -> dict[str, Any]:
        """The /v1/models/{model} body."""
        workers = await self.workers()
        if model == self._fusion_model:
            return self._fusion_card(workers)
        for worker in workers:
            if worker.name == model:
                return self._worker_card(worker)
        raise ApiError(404, f"The model {model!r} does not exist", param="model", code="model_not_found")

    def _card(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": self._created, "owned_by": "coolfusion"}

    def _fusion_card(self, workers: list[orchestrator_pb2.WorkerStatus]) -> dict[str, Any]:
        return {**self._card(self._fusion_model), "root": self._fusion_model, "workers": [w.name for w in workers]}

    def _worker_card(self, worker: orchestrator_pb2.WorkerStatus) -> dict[str, Any]:
        info = worker.info
        return {
            **self._card(worker.name),
            "root": info.model_id or worker.name,  # the model the worker serves
            "max_model_len": info.limits.max_context_tokens or None,
            "serving": worker.serving,
        }
