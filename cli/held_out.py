"""A fitted calibration measured once on the held-out items of its scope, replayed from their trees:
each worker alone, the unfitted default, the fit, the oracle (some worker alone right), and the
fit's gain over the worker that was best alone on the tuning items, with 95% intervals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coolfusion.calibration import Calibration
from coolfusion.cli.explore import Explored
from coolfusion.cli.quality import Tally, paired_difference_interval
from coolfusion.orchestrator.replay import Unexplored, replay
from coolfusion.orchestrator.strategy import DEFAULT, RepetitionGuard, Strategy

FITTED, UNFITTED, ROUTED = "fitted", "default", "each tag's fit"


@dataclass(frozen=True)
class HeldOut:
    """Right or wrong per held-out item, for each worker alone, the default and the fit."""

    calibration: str
    workers: tuple[str, ...]
    best_alone: str  # the worker best alone on the tuning items: what the deployment would serve
    right: dict[str, list[bool]]  # "<worker> alone", UNFITTED, FITTED -> per item
    unexplored: int  # answers of the fit that ran through a node the exploration did not visit

    @property
    def items(self) -> int:
        return len(self.right[FITTED])

    def tally(self, label: str) -> Tally:
        return Tally(sum(self.right[label]), self.items)

    @property
    def oracle(self) -> list[bool]:
        return [any(self.right[f"{w} alone"][i] for w in self.workers) for i in range(self.items)]

    def gain(self, label: str = FITTED) -> tuple[float, float, float]:
        """The accuracy of `label` minus that of the worker best alone on the tuning items, in points,
        with its 95% interval (paired: the same items)."""
        points = paired_difference_interval(self.right[label], self.right[f"{self.best_alone} alone"])
        return (100 * points[0], 100 * points[1], 100 * points[2])

    def document(self) -> dict[str, Any]:
        """What the calibration file records of the held-out measurement."""
        gain, low, high = self.gain()
        oracle = sum(self.oracle)
        recorded = {
            "items": self.items, "correct": sum(self.right[FITTED]), "default": sum(self.right[UNFITTED]),
            "alone": {w: sum(self.right[f"{w} alone"]) for w in self.workers}, "oracle": oracle,
            "best_alone_on_tuning": self.best_alone,
            "gain_points": round(gain, 2), "gain_interval_95": [round(low, 2), round(high, 2)],
            "unexplored": self.unexplored,
        }  # fmt: skip
        if ROUTED in self.right:
            routed, low, high = self.gain(ROUTED)
            recorded["each_tag_on_its_fit"] = {
                "correct": sum(self.right[ROUTED]), "gain_points": round(routed, 2),
                "gain_interval_95": [round(low, 2), round(high, 2)],
            }  # fmt: skip
        return recorded


def measure(
    calibration: Calibration,
    items: Sequence[Explored],
    best_alone: str,
    by_tag: Mapping[str, Calibration] | None = None,
) -> HeldOut:
    """Replays the held-out `items` for each of the calibration's workers alone, the unfitted
    default and the fit, and given `by_tag` (tag -> its own fit for these workers), each item under
    its tag's fit, as a deployment routing each tag to its fit answers (an untagged item: under
    the calibration); an answer through an unvisited node counts as wrong."""
    workers = calibration.worker_names
    labels = [*(f"{w} alone" for w in workers), UNFITTED, FITTED, *([ROUTED] if by_tag else [])]
    right: dict[str, list[bool]] = {label: [] for label in labels}
    unexplored = 0
    for e in items:
        for name in workers:
            right[f"{name} alone"].append(_right(e, (name,), DEFAULT) is True)
        right[UNFITTED].append(_right(e, workers, DEFAULT) is True)
        answer = _right(e, workers, _strategy(calibration))
        unexplored += answer is None
        right[FITTED].append(answer is True)
        if by_tag:
            right[ROUTED].append(_right(e, workers, _strategy(by_tag.get(e.item.tag, calibration))) is True)
    return HeldOut(calibration.name, workers, best_alone, right, unexplored)


def _strategy(calibration: Calibration) -> Strategy:
    return Strategy(repetition_guard=RepetitionGuard(calibration.repetition_guard), calibration=calibration)


def _right(explored: Explored, workers: Sequence[str], strategy: Strategy) -> bool | None:
    """Whether the replayed answer is right; None when it ran through an unvisited node."""
    try:
        text = replay(explored.tree, workers, strategy, explored.max_new_tokens).text
    except Unexplored:
        return None
    return explored.item.correct(explored.item.read(text))


def table(rows: Sequence[tuple[str, HeldOut]]) -> str:
    """fit.md's held-out table: per scope and worker set, accuracy (95% Wilson interval) of each
    worker alone, the default and the fit; the oracle, the fit's capture of it, and its gain over
    the worker best alone on the tuning items (95% paired interval). The pooled scope has a second
    line where each item is answered by its own tag's fit."""
    lines = [
        (
            "Held-out items, measured once after fitting (accuracy, 95% Wilson interval; gain: the fit minus the "
            "worker best alone on the tuning items, points, 95% paired Newcombe interval):"
        ),
        "",
        "| scope | workers | items | each alone | default | fitted | oracle | capture | gain over best alone |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scope, measured in rows:
        for label in (FITTED, ROUTED):
            if label in measured.right:
                lines.append(_row(scope if label == FITTED else f"{scope}, {ROUTED}", measured, label))
    return "\n".join(lines)


def _row(scope: str, measured: HeldOut, label: str) -> str:
    alone = "; ".join(f"{w} {measured.tally(f'{w} alone').describe()}" for w in measured.workers)
    oracle = measured.oracle
    captured = sum(f and o for f, o in zip(measured.right[label], oracle))
    gain, low, high = measured.gain(label)
    return (
        f"| {scope} | {', '.join(measured.workers)} | {measured.items} | {alone} "
        f"| {measured.tally(UNFITTED).describe()} | **{measured.tally(label).describe()}** "
        f"| {Tally(sum(oracle), measured.items).describe()} | {Tally(captured, sum(oracle)).describe()} "
        f"| {gain:+.1f} ({low:+.1f} to {high:+.1f}) over {measured.best_alone} |"
    )
