"""Calibration files: a fitted selection rule, the workers and model ids it was fitted for, the data
it was fitted on and what each choice reached there (docs/design.md section 3.7)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from coolfusion.calibration.rule import SelectionRule, Unit, WorkerFit
from coolfusion.calibration.scope import Scope, scope_document, scope_from_document

FORMAT = "coolfusion.calibration/v1"
GUARDS = ("off", "stop", "steer")


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class FittedWorker:
    """A worker a calibration was fitted for: its registry name and the model it served."""

    name: str
    model_id: str


@dataclass(frozen=True)
class Calibration:
    """A fitted rule for one ordered set of workers. It applies only to those workers serving those
    models: another model, or another order (ties and the length stop follow the first worker),
    would make the fitted figures meaningless."""

    name: str
    workers: tuple[FittedWorker, ...]
    rule: SelectionRule
    repetition_guard: str = "stop"
    # The traffic it was fitted on, where it runs as a deployment's default; None (a file written
    # before scopes were recorded): every request.
    scope: Scope | None = None
    # Where the fit came from and what it reached, kept for whoever reads the file: the data, the
    # right answers of each choice on the tuning items, and, measured once after fitting, on the
    # held-out items (each worker alone, the default, the fit, the gain over the best alone).
    fitted_on: Mapping[str, Any] = field(default_factory=dict)
    tuning: Mapping[str, Any] = field(default_factory=dict)
    held_out: Mapping[str, Any] = field(default_factory=dict)

    @property
    def worker_names(self) -> tuple[str, ...]:
        return tuple(w.name for w in self.workers)

    def mismatch(self, workers: Mapping[str, str]) -> str | None:
        """Why this calibration does not apply to `workers` (name -> model id, in request order);
        None when it does."""
        if tuple(workers) != self.worker_names:
            return f"calibration {self.name!r} was fitted for workers {list(self.worker_names)}, not {list(workers)}"
        for fitted in self.workers:
            if workers[fitted.name] != fitted.model_id:
                return (
                    f"calibration {self.name!r} was fitted for {fitted.name} serving {fitted.model_id!r}; "
                    f"it serves {workers[fitted.name]!r}"
                )
        return None


def load_calibration(path: Path) -> Calibration:
    """Reads and checks a calibration file; CalibrationError names the file and the problem."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        return from_document(document)
    except (OSError, json.JSONDecodeError, CalibrationError) as error:
        raise CalibrationError(f"{path}: {error}") from None


def from_document(document: Mapping[str, Any]) -> Calibration:
    if document.get("format") != FORMAT:
        raise CalibrationError(f"format is {document.get('format')!r}, expected {FORMAT!r}")
    try:
        workers = [
            (FittedWorker(str(w["name"]), str(w["model_id"])), _fit(w))
            for w in document["workers"]
        ]  # fmt: skip
        name, rule = str(document["name"]), document["rule"]
        guard, unit = str(document.get("repetition_guard", "stop")), str(rule["unit"])
    except (KeyError, TypeError) as error:
        raise CalibrationError(f"missing or malformed field: {error}") from None
    names = [fitted.name for fitted, _ in workers]
    if len(names) < 1 or len(set(names)) != len(names):
        raise CalibrationError(f"workers must be distinct and at least one: {names}")
    lead = rule.get("lead")
    if lead is not None and lead not in names:
        raise CalibrationError(f"lead {lead!r} is not one of its workers {names}")
    margin = math.inf if rule.get("margin") is None else float(rule["margin"])
    if not margin >= 0:
        raise CalibrationError(f"margin must be >= 0 (null: the lead always stands), got {margin}")
    if unit not in set(Unit):
        raise CalibrationError(f"unit is {unit!r}; choose from {', '.join(Unit)}")
    if guard not in GUARDS:
        raise CalibrationError(f"repetition_guard is {guard!r}; choose from {', '.join(GUARDS)}")
    try:
        scope = None if document.get("scope") is None else scope_from_document(document["scope"])
    except (ValueError, AttributeError) as error:
        raise CalibrationError(str(error)) from None
    return Calibration(
        name=name,
        workers=tuple(fitted for fitted, _ in workers),
        rule=SelectionRule({fitted.name: fit for fitted, fit in workers}, lead, margin, Unit(unit)),
        repetition_guard=guard,
        scope=scope,
        fitted_on=document.get("fitted_on", {}),
        tuning=document.get("tuning", {}),
        held_out=document.get("held_out", {}),
    )


def _fit(worker: Mapping[str, Any]) -> WorkerFit:
    fit = WorkerFit(float(worker["scale"]), float(worker["weight"]), float(worker["prior"]))
    if not (fit.scale > 0 and math.isfinite(fit.scale)):
        raise CalibrationError(f"worker {worker['name']!r}: scale must be positive and finite, got {fit.scale}")
    if not (fit.weight >= 0 and math.isfinite(fit.weight)) or not math.isfinite(fit.prior):
        raise CalibrationError(f"worker {worker['name']!r}: weight must be >= 0 and prior finite")
    return fit


def to_document(calibration: Calibration) -> dict[str, Any]:
    rule = calibration.rule
    return {
        "format": FORMAT,
        "name": calibration.name,
        "workers": [
            {"name": w.name, "model_id": w.model_id, **_fit_fields(rule.workers[w.name])} for w in calibration.workers
        ],
        # JSON has no infinity: a lead that never yields is written with a null margin.
        "rule": {"lead": rule.lead, "margin": None if math.isinf(rule.margin) else rule.margin, "unit": str(rule.unit)},
        "repetition_guard": calibration.repetition_guard,
        "scope": None if calibration.scope is None else scope_document(calibration.scope),
        "fitted_on": dict(calibration.fitted_on),
        "tuning": dict(calibration.tuning),
        "held_out": dict(calibration.held_out),
    }


def _fit_fields(fit: WorkerFit) -> dict[str, float]:
    return {"scale": fit.scale, "weight": fit.weight, "prior": fit.prior}


def save_calibration(calibration: Calibration, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_document(calibration), indent=2) + "\n", encoding="utf-8")


def shipped_calibrations() -> list[tuple[Path, Calibration]]:
    """The calibrations that ship with coolfusion (calibration/fitted/, fitted for the presets on the
    task families' tuning parts), with their paths."""
    folder = Path(str(resources.files("coolfusion.calibration") / "fitted"))
    return [(path, load_calibration(path)) for path in sorted(folder.glob("*.json"))]
