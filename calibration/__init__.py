"""Selection rules fitted on labelled data, and the calibration files that carry them (docs/design.md section 3.7)."""

from coolfusion.calibration.file import (
    Calibration,
    CalibrationError,
    FittedWorker,
    load_calibration,
    save_calibration,
    shipped_calibrations,
)
from coolfusion.calibration.rule import SelectionRule, Unit, WorkerFit, nll_per_unit

__all__ = [
    "Calibration",
    "CalibrationError",
    "FittedWorker",
    "SelectionRule",
    "Unit",
    "WorkerFit",
    "load_calibration",
    "nll_per_unit",
    "save_calibration",
    "shipped_calibrations",
]
