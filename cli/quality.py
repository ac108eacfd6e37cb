"""Fusion quality per task family: accuracy of every mode, the oracle, oracle capture and disagreement."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_Z95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval
ORACLE = "oracle (either source right)"


def wilson_interval(correct: int, total: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion; unlike the normal approximation it stays inside [0, 1]."""
    if total == 0:
        return 0.0, 1.0  # no evidence either way
    p = correct / total
    denominator = 1 + z**2 / total
    centre = (p + z**2 / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z**2 / (4 * total**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference_interval(
    first: Sequence[bool], second: Sequence[bool], z: float = _Z95
) -> tuple[float, float, float]:
    """The difference of two accuracies on the same items (first minus second) with its 95%
    interval, by Newcombe's hybrid score method for paired proportions (Statistics in Medicine
    17:2635, 1998, method 10; as R's biostatUZH::confIntPairedProportion): Wilson intervals of each accuracy, joined through the correlation
    of the two answers per item, so the interval stays inside [-1, 1] and narrows where both are
    right or wrong on the same items, as two rules over the same models mostly are."""
    n = len(first)
    if n == 0 or len(second) != n:
        raise ValueError(f"paired accuracies need the same items, got {len(first)} and {len(second)}")
    both = sum(a and b for a, b in zip(first, second))
    only_first = sum(a and not b for a, b in zip(first, second))
    only_second = sum(b and not a for a, b in zip(first, second))
    neither = n - both - only_first - only_second
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    (l1, u1), (l2, u2) = wilson_interval(both + only_first, n, z), wilson_interval(both + only_second, n, z)
    margins = (both + only_first) * (neither + only_second) * (both + only_second) * (neither + only_first)
    # Newcombe's correlation estimate, with his correction: a positive association counts only
    # beyond half an item per item pair, so that few concordant items do not narrow the interval.
    association = both * neither - only_first * only_second
    corrected = association - n / 2 if association > n / 2 else min(association, 0)
    phi = corrected / math.sqrt(margins) if margins else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return p1 - p2, max(-1.0, p1 - p2 - below), min(1.0, p1 - p2 + above)


@dataclass(frozen=True)
class Tally:
    """k of n, with its 95% Wilson interval."""

    hits: int
    total: int

    @property
    def rate(self) -> float:
        return self.hits / self.total if self.total else 0.0

    def describe(self) -> str:
        """The rate and its interval, e.g. 79.0% (69.9–85.8%); a dash without data."""
        if not self.total:
            return "—"
        low, high = wilson_interval(self.hits, self.total)
        return f"{100 * self.rate:.1f}% ({100 * low:.1f}–{100 * high:.1f}%)"


@dataclass(frozen=True)
class ModeScore:
    """One mode on one family: accuracy, and for a fusion how much of the oracle it kept."""

    mode: str
    accuracy: Tally
    mean_seconds: float  # nan when every answer was taken from a Cool+R record
    capture: Tally | None = None  # right among the items some source got right
    one_right: Tally | None = None  # right among the items exactly one source got right


@dataclass(frozen=True)
class FamilyReport:
    """Every mode of one family over the same items, and what the sources alone could reach."""

    family: str
    label: str  # which items, e.g. "tuning, items 0-99"
    scores: list[ModeScore]
    oracle: Tally | None  # None without two or more solo modes
    disagreement: Tally | None


def family_report(
    family: str, label: str, records: Iterable[Mapping[str, Any]], item_ids: Sequence[str], modes: Sequence[Any]
) -> FamilyReport:
    """Scores `modes` (objects with .name and .workers) on this family's `item_ids` only."""
    wanted = set(item_ids)
    found = {(r["mode"], r["id"]): r for r in records if r["family"] == family and r["id"] in wanted}
    solos = [m.name for m in modes if len(m.workers) == 1]
    # The oracle and disagreement need every source's answer; partial items are left out of both.
    complete = [i for i in item_ids if all((s, i) in found for s in solos)] if len(solos) > 1 else []
    right = {i: [found[(s, i)]["correct"] for s in solos] for i in complete}
    oracle_ids = {i for i in complete if any(right[i])}
    one_right_ids = {i for i in complete if sum(right[i]) == 1}
    scores = []
    for mode in modes:
        mine = [found[(mode.name, i)] for i in item_ids if (mode.name, i) in found]
        fused = len(mode.workers) > 1 and len(solos) > 1
        scores.append(
            ModeScore(
                mode.name,
                Tally(sum(r["correct"] for r in mine), len(mine)),
                _mean_seconds(mine),
                _tally(mine, oracle_ids) if fused else None,
                _tally(mine, one_right_ids) if fused else None,
            )
        )
    if len(solos) < 2:
        return FamilyReport(family, label, scores, None, None)
    differ = sum(len({_same_answer_key(found[(s, i)]) for s in solos}) > 1 for i in complete)
    return FamilyReport(family, label, scores, Tally(len(oracle_ids), len(complete)), Tally(differ, len(complete)))


def _tally(records: list[Mapping[str, Any]], among: set[str]) -> Tally:
    chosen = [r for r in records if r["id"] in among]
    return Tally(sum(r["correct"] for r in chosen), len(chosen))


def _same_answer_key(record: Mapping[str, Any]) -> str | None:
    """What two sources' answers are compared by: the answer as read, so "Paris." equals "paris"."""
    prediction = record["prediction"]
    try:
        return repr(float(prediction))  # numbers: "12" equals "12.0"
    except (TypeError, ValueError):
        return prediction


def _mean_seconds(records: list[Mapping[str, Any]]) -> float:
    timed = [r["seconds"] for r in records if r["seconds"] is not None]  # answers taken from Cool+R have none
    return sum(timed) / len(timed) if timed else float("nan")


# tables -------------------------------------------------------------------------------------------

_HEADER = (
    "| mode | accuracy | correct / total | 95% CI (Wilson) | oracle capture (95% CI) | right where one source is | mean s |\n"
    "|:-----|---------:|----------------:|:---------------:|:-----------------------:|--------------------------:|-------:|"
)


def family_table(report: FamilyReport, seconds: bool = True) -> str:
    """A Markdown section: one row per mode, the oracle's row, then the disagreement rate; without
    the seconds column for answers that were replayed rather than asked."""
    header = _HEADER if seconds else "\n".join(line.rsplit("|", 2)[0] + "|" for line in _HEADER.split("\n"))
    lines = [f"### {report.family} ({report.label})", "", header]

    def row(mode: str, tally: Tally, capture: str, one_right: str, spent: str) -> str:
        line = _row(mode, tally, capture, one_right, spent)
        return line if seconds else line.rsplit("|", 2)[0] + "|"

    for s in report.scores:
        lines.append(row(s.mode, s.accuracy, _capture(s), _count(s.one_right), _seconds(s.mean_seconds)))
    if report.oracle is not None and report.disagreement is not None:
        lines.append(row(ORACLE, report.oracle, "", "", ""))
        d = report.disagreement
        lines += ["", f"Sources disagree on {d.hits} of {d.total} items: {d.describe()}."]
    return "\n".join(lines)


def _row(mode: str, tally: Tally, capture: str, one_right: str, seconds: str) -> str:
    low, high = wilson_interval(tally.hits, tally.total)
    return (
        f"| {mode} | {100 * tally.rate:.1f}% | {tally.hits} / {tally.total} "
        f"| {100 * low:.1f}–{100 * high:.1f}% | {capture} | {one_right} | {seconds} |"
    )


def _capture(score: ModeScore) -> str:
    if score.capture is None:
        return ""
    if not score.capture.total:
        return "—"
    return f"{score.capture.describe()}, {score.capture.hits} / {score.capture.total}"


def _count(tally: Tally | None) -> str:
    return "" if tally is None else f"{tally.hits} / {tally.total}"


def _seconds(mean: float) -> str:
    return "in cool_r" if math.isnan(mean) else f"{mean:.1f}"


def report_json(report: FamilyReport) -> dict[str, Any]:
    """The report's numbers, for summary.json."""

    def tally(t: Tally | None) -> dict[str, Any] | None:
        return None if t is None else {"hits": t.hits, "total": t.total, "ci95": wilson_interval(t.hits, t.total)}

    return {
        "family": report.family,
        "items": report.label,
        "oracle": tally(report.oracle),
        "disagreement": tally(report.disagreement),
        "modes": [
            {
                "mode": s.mode, "accuracy": tally(s.accuracy), "capture": tally(s.capture),
                "one_right": tally(s.one_right), "mean_seconds": None if math.isnan(s.mean_seconds) else s.mean_seconds,
            }
            for s in report.scores
        ],
    }  # fmt: skip


def plot_accuracy(reports: list[FamilyReport], path: Path) -> None:
    """One panel per family: accuracy per mode and the oracle, with Wilson 95% error bars, as PNG."""
    # Imported here: matplotlib is an optional extra, and the Agg canvas needs no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    widest = max((len(r.scores) + 1 for r in reports), default=1)
    figure = Figure(figsize=(1.1 * widest + 2, 3.6 * max(1, len(reports))), layout="constrained")
    FigureCanvasAgg(figure)
    for row, report in enumerate(reports, start=1):
        bars = [(s.mode, s.accuracy) for s in report.scores]
        bars += [("oracle", report.oracle)] if report.oracle is not None else []
        _panel(figure.add_subplot(len(reports), 1, row), report, bars)
    figure.savefig(path, dpi=120)


def _panel(axes: Any, report: FamilyReport, bars: list[tuple[str, Tally]]) -> None:
    accuracies = [100 * t.rate for _, t in bars]
    intervals = [wilson_interval(t.hits, t.total) for _, t in bars]
    # Clamped: at 0/n or n/n the bound equals the accuracy up to rounding, and matplotlib rejects -1e-15.
    below = [max(0.0, a - 100 * low) for a, (low, _) in zip(accuracies, intervals)]
    above = [max(0.0, 100 * high - a) for a, (_, high) in zip(accuracies, intervals)]
    colours = ["tab:gray" if name == "oracle" else "tab:blue" for name, _ in bars]
    axes.bar([name for name, _ in bars], accuracies, yerr=[below, above], capsize=6, color=colours)
    axes.set_ylim(0, 100)
    axes.set_ylabel("accuracy, % (95% CI)")
    axes.set_title(f"{report.family} ({report.label})")
    axes.tick_params(axis="x", labelrotation=20)
