"""The models the gateway serves: the fusion of all registered workers, each route of the
orchestrator's registry (a calibration on its workers, e.g. `coolfusion/extract`), and each worker alone."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import replace
from typing import Any

from coolfusion.client import AsyncFusionClient, FuseOptions
from coolfusion.gateway.errors import ApiError
from coolfusion.gateway.parsing import FusionCall, bind_model
from coolfusion.v1 import orchestrator_pb2

logger = logging.getLogger(__name__)

# ListWorkers probes every worker with a 2 s limit of its own; this bounds the whole call.
LIST_TIMEOUT_S = 10.0


class ModelCatalogue:
    """Answers /v1/models and resolves a request's model to its workers or route. The registry comes
    from ListWorkers, fetched at most once per `ttl_s`: every request naming a worker or route
    checks it, and ListWorkers probes every worker."""

    def __init__(self, client: AsyncFusionClient, fusion_model: str, ttl_s: float, created: int):
        self._client = client
        self._fusion_model = fusion_model
        self._ttl_s = ttl_s
        self._created = created  # the gateway's start: the models' creation time, stable across calls
        self._workers: list[orchestrator_pb2.WorkerStatus] = []
        self._routes: list[orchestrator_pb2.Route] = []
        self._fetched = -math.inf
        self._lock = asyncio.Lock()  # one ListWorkers at a time; the others wait for its answer

    async def workers(self) -> list[orchestrator_pb2.WorkerStatus]:
        """The registered workers, except one named like the fusion model (the fusion keeps the name)."""
        await self._refresh()
        return self._workers

    async def routes(self) -> list[orchestrator_pb2.Route]:
        """The registry's routes, except one named like the fusion model."""
        await self._refresh()
        return self._routes

    async def _refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._fetched > self._ttl_s:
                registry = await self._client.describe(timeout_s=LIST_TIMEOUT_S)
                names = [w.name for w in registry.workers] + [r.name for r in registry.routes]
                if self._fusion_model in names:
                    logger.warning("%r is hidden behind the fusion model of that name", self._fusion_model)
                self._workers = [s for s in registry.workers if s.name != self._fusion_model]
                self._routes = [r for r in registry.routes if r.name != self._fusion_model]
                self._fetched = time.monotonic()

    async def options_for(self, call: FusionCall) -> FuseOptions:
        """The fusion options with the model's workers, or its route (whose calibration the
        orchestrator runs on that calibration's workers); 404 for a model that does not exist."""
        if call.model == self._fusion_model:  # needs no look-up: the orchestrator checks `workers`
            return bind_model(call, self._fusion_model, is_worker=False)
        if any(route.name == call.model for route in await self.routes()):
            return replace(call.options, route=call.model)
        names = {w.name for w in await self.workers()}
        return bind_model(call, self._fusion_model, is_worker=call.model in names)

    async def listing(self) -> dict[str, Any]:
        """The /v1/models body: the fusion first, then each route, then each worker in registry order."""
        workers, routes = await self.workers(), await self.routes()
        cards = [self._fusion_card(workers), *map(self._route_card, routes), *map(self._worker_card, workers)]
        return {"object": "list", "data": cards}

    async def card(self, model: str) -> dict[str, Any]:
        """The /v1/models/{model} body."""
        workers = await self.workers()
        if model == self._fusion_model:
            return self._fusion_card(workers)
        for route in await self.routes():
            if route.name == model:
                return self._route_card(route)
        for worker in workers:
            if worker.name == model:
                return self._worker_card(worker)
        raise ApiError(404, f"The model {model!r} does not exist", param="model", code="model_not_found")

    def _card(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": self._created, "owned_by": "coolfusion"}

    def _fusion_card(self, workers: list[orchestrator_pb2.WorkerStatus]) -> dict[str, Any]:
        return {**self._card(self._fusion_model), "root": self._fusion_model, "workers": [w.name for w in workers]}

    def _route_card(self, route: orchestrator_pb2.Route) -> dict[str, Any]:
        """A route: the fusion of its calibration's workers under that calibration."""
        return {
            **self._card(route.name),
            "root": self._fusion_model,
            "calibration": route.calibration,
            "workers": list(route.workers),
        }

    def _worker_card(self, worker: orchestrator_pb2.WorkerStatus) -> dict[str, Any]:
        info = worker.info
        return {
            **self._card(worker.name),
            "root": info.model_id or worker.name,  # the model the worker serves
            "max_model_len": info.limits.max_context_tokens or None,
            "serving": worker.serving,
        }
