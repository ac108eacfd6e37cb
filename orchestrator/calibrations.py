"""The calibrations an orchestrator loaded, and which one a request runs with: the one it names,
checked against its workers and their models, or the operator's default where it fits
(docs/design.md section 3.7)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from coolfusion.calibration import Calibration
from coolfusion.orchestrator.replicas import ReplicaSet
from coolfusion.orchestrator.worker_client import SessionLost, WorkerFailed

# A worker's model id is asked again after this long: a rolling update may put another model
# behind the same name, and a calibration must not outlive the model it was fitted for by much.
_MODEL_ID_TTL_S = 30.0
_GET_INFO_TIMEOUT_S = 5.0


class CalibrationRefused(ValueError):
    """A request named a calibration that does not exist or does not fit its workers (INVALID_ARGUMENT)."""


class CalibrationUncheckable(Exception):
    """A worker could not say which model it serves, so a named calibration cannot be checked (UNAVAILABLE)."""


class Calibrations:
    """Loaded calibrations by name, the default one (if any), and the workers' model ids, cached."""

    def __init__(self, loaded: Sequence[Calibration], default: str | None = None):
        self.by_name = {c.name: c for c in loaded}
        if len(self.by_name) != len(loaded):
            raise ValueError(f"two calibrations share a name: {sorted(c.name for c in loaded)}")
        if default is not None and default not in self.by_name:
            raise ValueError(f"the default calibration {default!r} is not loaded; loaded: {sorted(self.by_name)}")
        self.default = self.by_name[default] if default else None
        self._model_ids: dict[str, tuple[float, str]] = {}

    def named(self, name: str) -> Calibration:
        if name not in self.by_name:
            known = ", ".join(sorted(self.by_name)) or "none"
            raise CalibrationRefused(f"unknown calibration {name!r}; loaded: {known}")
        return self.by_name[name]

    async def for_request(self, named: str, chose_aggregation: bool, workers: list[ReplicaSet]) -> Calibration | None:
        """The calibration a request runs with: the one it names, which must fit its workers; else,
        unless it chose an aggregation, the default where it fits these workers; else none."""
        names = tuple(w.name for w in workers)
        if named:
            calibration = self.named(named)
            models = await self._models(workers) if names == calibration.worker_names else dict.fromkeys(names, "")
            if reason := calibration.mismatch(models):
                raise CalibrationRefused(reason)
            return calibration
        if self.default is None or chose_aggregation or names != self.default.worker_names:
            return None
        try:
            fits = self.default.mismatch(await self._models(workers)) is None
        except CalibrationUncheckable:
            return None  # the request goes on without it, and fails there if the worker is really gone
        return self.default if fits else None

    async def _models(self, workers: list[ReplicaSet]) -> dict[str, str]:
        """Each worker's model id, in request order."""
        return {w.name: await self._model_id(w) for w in workers}

    async def _model_id(self, replicas: ReplicaSet) -> str:
        cached = self._model_ids.get(replicas.name)
        if cached is not None and time.monotonic() - cached[0] < _MODEL_ID_TTL_S:
            return cached[1]
        errors = []
        for pod in await replicas.pods():
            try:
                model_id = (await pod.get_info(_GET_INFO_TIMEOUT_S)).model_id
            except (WorkerFailed, SessionLost) as error:
                errors.append(str(error))
                continue
            self._model_ids[replicas.name] = (time.monotonic(), model_id)
            return model_id
        raise CalibrationUncheckable(
            f"cannot check the calibration: {replicas.name} did not say which model it serves ({'; '.join(errors) or 'no replica'})"
        )
