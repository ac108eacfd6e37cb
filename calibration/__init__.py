"""Selection rules fitted on labelled data, and the calibration files that carry them (docs/design.md section 3.7)."""

from coolfusion.calibration.file import Calibration, CalibrationError, FittedWorker, load_calibration, save_calibration
from coolfusion.calibration.rule import SelectionRule, WorkerFit, per_character_nll

__all__ = [
    "Calibration",
    "CalibrationError",
    "FittedWorker",
    "SelectionRule",
    "WorkerFit",
    "load_calibration",
    "per_character_nll",
    "save_calibration",
]
