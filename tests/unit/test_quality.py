"""Fusion quality tables: Wilson intervals, the oracle, oracle capture and the disagreement rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coolfusion.cli import quality
from coolfusion.cli.eval import build_modes
from coolfusion.cli.quality import Tally

MODES = build_modes({"solo", "cool"}, ["a", "b"], ["paper", "calibrated"])


@pytest.mark.parametrize(
    ("correct", "total", "low", "high"),
    # Published values (e.g. Newcombe 1998, Table I; statsmodels proportion_confint(method="wilson")).
    [(5, 10, 0.2366, 0.7634), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (81, 263, 0.2553, 0.3662)],
)
def test_wilson_interval_matches_published_values(correct: int, total: int, low: float, high: float) -> None:
    assert quality.wilson_interval(correct, total) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_without_data_is_uninformative() -> None:
    assert quality.wilson_interval(0, 0) == (0.0, 1.0)
    assert Tally(0, 0).describe() == "—" and Tally(5, 10).describe() == "50.0% (23.7–76.3%)"


def _records(rows: dict[str, list[tuple[str | None, bool]]]) -> list[dict[str, Any]]:
    """mode -> per item (prediction, correct), items named "0", "1", ..."""
    return [
        {"mode": mode, "family": "facts", "id": str(i), "prediction": p, "correct": c, "seconds": None}
        for mode, answers in rows.items()
        for i, (p, c) in enumerate(answers)
    ]


# Five items: both right; only a right; only b right; both wrong but different; both wrong alike.
RECORDS = _records({
    "solo:a": [("rome", True), ("paris", True), ("lyon", False), ("x", False), ("y", False)],
    "solo:b": [("rome", True), ("nice", False), ("madrid", True), ("z", False), ("y", False)],
    "cool@paper": [("rome", True), ("nice", False), ("madrid", True), ("x", False), ("y", False)],
    "cool@calibrated": [("rome", True), ("paris", True), ("madrid", True), ("w", True), ("y", False)],
})  # fmt: skip
IDS = ["0", "1", "2", "3", "4"]


def test_oracle_capture_and_disagreement_over_the_same_items() -> None:
    report = quality.family_report("facts", "tuning, items 0-4", RECORDS, IDS, MODES)
    assert report.oracle == Tally(3, 5) and report.disagreement == Tally(3, 5)
    scores = {s.mode: s for s in report.scores}
    assert scores["solo:a"].capture is None and scores["solo:a"].accuracy == Tally(2, 5)
    assert scores["cool@paper"].capture == Tally(2, 3) and scores["cool@paper"].one_right == Tally(1, 2)
    # Right beyond the oracle (item 3) counts in accuracy, not in capture, which stays a proportion.
    assert scores["cool@calibrated"].accuracy == Tally(4, 5) and scores["cool@calibrated"].capture == Tally(3, 3)


def test_items_without_every_source_are_left_out_of_oracle_and_disagreement() -> None:
    partial = [r for r in RECORDS if not (r["mode"] == "solo:b" and r["id"] == "1")]
    report = quality.family_report("facts", "x", partial, IDS, MODES)
    assert report.oracle == Tally(2, 4) and report.disagreement == Tally(2, 4)
    assert {s.mode: s.accuracy.total for s in report.scores}["solo:b"] == 4


def test_numbers_that_read_the_same_agree() -> None:
    records = _records({"solo:a": [("12", True)], "solo:b": [("12.0", True)]})
    assert quality.family_report("facts", "x", records, ["0"], MODES).disagreement == Tally(0, 1)


def test_family_table_has_a_row_per_mode_the_oracle_and_the_disagreement() -> None:
    table = quality.family_table(quality.family_report("facts", "tuning, items 0-4", RECORDS, IDS, MODES))
    lines = table.splitlines()
    assert lines[0] == "### facts (tuning, items 0-4)"
    assert lines[6] == "| cool@paper | 40.0% | 2 / 5 | 11.8–76.9% | 66.7% (20.8–93.9%), 2 / 3 | 1 / 2 | in cool_r |"
    assert lines[8].startswith("| oracle (either source right) | 60.0% | 3 / 5 |")
    assert lines[-1] == "Sources disagree on 3 of 5 items: 60.0% (23.1–88.2%)."


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    # 0/5 and 5/5 put the accuracy on an interval bound, where rounding once made an error bar negative.
    report = quality.family_report("facts", "x", RECORDS, IDS, MODES)
    quality.plot_accuracy([report, report], tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
