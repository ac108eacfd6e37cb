"""The calibrations an orchestrator loaded, its routes, and which rule a request runs with: the
calibration it or its route names, checked against its workers and their models; else the
operator's default calibration where the request is inside its scope and its workers and models
fit; else the unfitted default. The choice is reported with its reason (docs/design.md section 3.7)."""

from __future__ import annotations

import enum
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coolfusion.calibration import Calibration
from coolfusion.calibration.scope import TEXT
from coolfusion.orchestrator.replicas import ReplicaSet
from coolfusion.orchestrator.worker_client import SessionLost, WorkerFailed

logger = logging.getLogger(__name__)

# A worker's model id is asked again after this long: a rolling update may put another model
# behind the same name, and a calibration must not outlive the model it was fitted for by much.
_MODEL_ID_TTL_S = 30.0
_GET_INFO_TIMEOUT_S = 5.0
# A request's tag, spelled as the tags of labelled items are (they name calibrations and routes).
_TAG = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class CalibrationRefused(ValueError):
    """A request named a calibration or route that does not exist or does not fit its workers (INVALID_ARGUMENT)."""


class CalibrationUncheckable(Exception):
    """A worker could not say which model it serves, so a named calibration cannot be checked (UNAVAILABLE)."""


class RuleReason(enum.Enum):
    """Why a request runs with the rule it runs with (the proto's RuleReason, without its prefix)."""

    REQUESTED = "requested"  # it named the calibration, or chose its own aggregation
    ROUTE = "route"  # its route names the calibration
    DEFAULT_CALIBRATION = "default_calibration"  # the default calibration; the request is inside its scope
    OUTSIDE_SCOPE = "outside_scope"  # outside the default calibration's scope: the unfitted default
    OTHER_WORKERS = "other_workers"  # the default calibration was fitted for other workers or models
    NO_DEFAULT_CALIBRATION = "no_default_calibration"  # none is set: the orchestrator's default strategy


@dataclass(frozen=True)
class RuleChoice:
    """The calibration a request runs with (None: an aggregation) and why, with what to add in words."""

    calibration: Calibration | None
    reason: RuleReason
    detail: str = ""


@dataclass(frozen=True)
class Traits:
    """What a request's scope is judged by: its tag ("" when it has none), its prompt's form
    ("plain" or "chat"), its answer cap (tokens) and what its answer is held to ("text", or its
    constraint's kind)."""

    tag: str
    form: str
    max_new_tokens: int
    answer: str = TEXT


class Calibrations:
    """Loaded calibrations by name, the routes to them, the default one (if any), and the workers'
    model ids, cached."""

    def __init__(
        self, loaded: Sequence[Calibration], default: str | None = None, routes: Mapping[str, str] | None = None
    ):
        self.by_name = {c.name: c for c in loaded}
        if len(self.by_name) != len(loaded):
            raise ValueError(f"two calibrations share a name: {sorted(c.name for c in loaded)}")
        if default is not None and default not in self.by_name:
            raise ValueError(f"the default calibration {default!r} is not loaded; loaded: {sorted(self.by_name)}")
        self.routes = dict(routes or {})
        if unknown := {r: c for r, c in self.routes.items() if c not in self.by_name}:
            route, name = next(iter(unknown.items()))
            raise ValueError(
                f"route {route!r} names calibration {name!r}, which is not loaded; loaded: {sorted(self.by_name)}"
            )
        self.default = self.by_name[default] if default else None
        self._model_ids: dict[str, tuple[float, str]] = {}
        self._warned: set[str] = set()  # default calibrations whose mismatch was logged

    def named(self, name: str) -> Calibration:
        if name not in self.by_name:
            known = ", ".join(sorted(self.by_name)) or "none"
            raise CalibrationRefused(f"unknown calibration {name!r}; loaded: {known}")
        return self.by_name[name]

    def requested(self, route: str, name: str, chose_aggregation: bool) -> tuple[Calibration | None, RuleReason]:
        """The calibration a request names itself or through its route (None: neither), before its
        workers are known: a route's calibration also says which workers it fuses."""
        if not route:
            return (self.named(name) if name else None), RuleReason.REQUESTED
        if route not in self.routes:
            known = ", ".join(self.routes) or "none"
            raise CalibrationRefused(f"unknown route {route!r}; routes: {known}")
        calibration = self.by_name[self.routes[route]]
        if name and name != calibration.name:
            raise CalibrationRefused(f"route {route!r} runs calibration {calibration.name!r}, not {name!r}")
        if chose_aggregation:
            raise CalibrationRefused(
                f"route {route!r} runs calibration {calibration.name!r}, which replaces the aggregation"
            )
        return calibration, RuleReason.ROUTE

    async def for_request(
        self,
        named: Calibration | None,
        how: RuleReason,
        chose_aggregation: bool,
        workers: list[ReplicaSet],
        traits: Traits,
    ) -> RuleChoice:
        """The rule a request runs with: the calibration it (or its route) names, which must fit its
        workers; else, unless it chose an aggregation, the default calibration where the request
        is inside its scope and its workers and models fit; else none (the unfitted default)."""
        names = tuple(w.name for w in workers)
        if named is not None:
            models = await self._models(workers) if names == named.worker_names else dict.fromkeys(names, "")
            if reason := named.mismatch(models):
                raise CalibrationRefused(reason)
            return RuleChoice(named, how)
        if chose_aggregation:
            return RuleChoice(None, RuleReason.REQUESTED)
        default = self.default
        if default is None:
            return RuleChoice(None, RuleReason.NO_DEFAULT_CALIBRATION)
        if default.scope is not None and (
            outside := default.scope.excludes(traits.tag, traits.form, traits.max_new_tokens, traits.answer)
        ):
            return RuleChoice(
                None, RuleReason.OUTSIDE_SCOPE, f"outside the scope of default calibration {default.name!r}: {outside}"
            )
        if names != default.worker_names:
            return RuleChoice(
                None,
                RuleReason.OTHER_WORKERS,
                f"default calibration {default.name!r} was fitted for workers {list(default.worker_names)}",
            )
        try:
            mismatch = default.mismatch(await self._models(workers))
        except CalibrationUncheckable as error:
            # The request goes on without it, and fails there if the worker is really gone.
            return RuleChoice(None, RuleReason.OTHER_WORKERS, str(error))
        if mismatch:
            self._warn_once(default.name, mismatch)
            return RuleChoice(None, RuleReason.OTHER_WORKERS, mismatch)
        if (own := self._tag_fit(default, traits)) is not None:
            return RuleChoice(
                own, RuleReason.DEFAULT_CALIBRATION, f"the fit for tag {traits.tag!r}, in place of {default.name!r}"
            )
        return RuleChoice(default, RuleReason.DEFAULT_CALIBRATION)

    def _tag_fit(self, default: Calibration, traits: Traits) -> Calibration | None:
        """A loaded calibration fitted on the request's tag alone, for the default's workers and
        models, with the request inside its scope: where the default was fitted on several tags,
        each tag's own fit answers its traffic (`calibrate` fits and measures both; on its held-out
        items the pooled traffic gains more by each tag's fit than by one rule for all of it).
        Of several, the first by name."""
        if not traits.tag or default.scope is None or default.scope.tags == (traits.tag,):
            return None
        for name in sorted(self.by_name):
            fit = self.by_name[name]
            if (
                fit is not default
                and fit.workers == default.workers
                and fit.scope is not None
                and fit.scope.tags == (traits.tag,)
                and fit.scope.excludes(traits.tag, traits.form, traits.max_new_tokens, traits.answer) is None
            ):
                return fit
        return None

    def _warn_once(self, name: str, mismatch: str) -> None:
        """Says once in the log that the default calibration is ignored: the models it was fitted
        for are not those served, which an operator wants to know before reading any result."""
        if name not in self._warned:
            self._warned.add(name)
            logger.warning("default calibration ignored: %s", mismatch)

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


def check_tag(tag: str) -> None:
    """Refuses a malformed request tag (INVALID_ARGUMENT): it is compared with calibrations' tags."""
    if tag and not _TAG.fullmatch(tag):
        raise CalibrationRefused(f"tag {tag!r} must be lowercase letters, digits and '-', at most 63 characters")
