"""`coolfusion report`: accuracy on explored items of every worker alone, every pair and the trio,
under the paper's rule, the default and the fitted calibrations, with Cool+R, the oracle, oracle
capture and disagreement, per task family and for their pooled mix, all replayed from the trees
of `coolfusion explore` (docs/design.md section 3.7)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from coolfusion.calibration import Calibration, CalibrationError, load_calibration
from coolfusion.calibration.items import HELD_OUT, POOLED
from coolfusion.cli import quality
from coolfusion.cli.calibrate import scopes, worker_sets
from coolfusion.cli.explore import Explored, load_explored
from coolfusion.orchestrator.replay import Unexplored, replay, rerank
from coolfusion.orchestrator.strategy import DEFAULT, PAPER, RepetitionGuard, Strategy

FITTED, FITTED_POOLED = "fitted", "fitted (pooled fit)"


@dataclass(frozen=True)
class Mode:
    """One way of answering, named as the tables show it; `workers` as quality.family_report reads it."""

    name: str
    workers: tuple[str, ...]
    strategy: Strategy
    rerank: bool = False


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "trees", type=Path, help="a `coolfusion explore` folder (its held-out items, where it holds both parts)"
    )
    parser.add_argument("--calibrations", type=Path, help="the folder `coolfusion calibrate` wrote")
    parser.add_argument("--out", type=Path, default=None, help="where report.md/json and the chart go (default: TREES)")


def run_report(args: argparse.Namespace) -> int:
    run = load_explored(args.trees)
    settings = run.settings
    # A folder of a labelled-items file holds both parts: report the held-out one, which no fit saw.
    explored = [e for e in run.explored if e.item.split == HELD_OUT] or run.explored
    if len(explored) < len(run.explored):
        print(f"report: the {len(explored)} held-out items of {len(run.explored)}", file=sys.stderr)
    calibrations = _calibrations(args.calibrations, settings["models"])
    out = args.out or args.trees
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for scope, items in scopes(explored):
        for chosen in worker_sets(settings["workers"]):
            modes = modes_for(scope, chosen, calibrations)
            reports.append(_report(scope, chosen, items, modes))
    text = "\n\n".join(quality.family_table(r, seconds=False) for r in reports)
    (out / "report.md").write_text(summary_table(reports) + "\n\n" + text + "\n", encoding="utf-8")
    (out / "report.json").write_text(json.dumps([quality.report_json(r) for r in reports], indent=2) + "\n")
    trio = [r for r in reports if r.label.count(",") == len(settings["workers"]) - 1]
    try:
        quality.plot_accuracy(trio, out / "report.png")
    except ImportError:
        print("coolfusion: matplotlib is not installed; skipping report.png", file=sys.stderr)
    print(summary_table(reports))
    print(f"\ntables: {out / 'report.md'}")
    return 0


def _calibrations(folder: Path | None, models: dict[str, str]) -> dict[str, Calibration]:
    """The folder's calibration files by name, each checked against the explored models."""
    if folder is None:
        return {}
    found = {}
    for path in sorted(folder.glob("*.json")):
        try:
            calibration = load_calibration(path)
        except CalibrationError as error:
            raise SystemExit(f"coolfusion: {error}") from None
        if reason := calibration.mismatch({w: models.get(w, "") for w in calibration.worker_names}):
            raise SystemExit(f"coolfusion: {path}: {reason} in these trees")
        found[calibration.name] = calibration
    return found


def modes_for(scope: str, workers: tuple[str, ...], calibrations: dict[str, Calibration]) -> list[Mode]:
    """Each worker alone, then Cool and Cool+R under the paper's rule, the default and the fitted
    calibrations (the scope's own, and for a family the pooled fit too) where they exist."""
    strategies = {"paper": PAPER, "default": DEFAULT}
    for label, name in ((FITTED, f"{scope}-{'-'.join(workers)}"), (FITTED_POOLED, f"{POOLED}-{'-'.join(workers)}")):
        if name in calibrations and not (label == FITTED_POOLED and scope == POOLED):
            calibration = calibrations[name]
            strategies[label] = Strategy(
                repetition_guard=RepetitionGuard(calibration.repetition_guard), calibration=calibration
            )
    modes = [Mode(f"{name} alone", (name,), DEFAULT) for name in workers]
    modes += [Mode(f"cool, {label}", workers, s) for label, s in strategies.items()]
    modes += [Mode(f"cool_r, {label}", workers, s, rerank=True) for label, s in strategies.items()]
    return modes


def _report(scope: str, workers: tuple[str, ...], items: list[Explored], modes: list[Mode]) -> quality.FamilyReport:
    records = [answer_record(scope, e, mode) for e in items for mode in modes]
    ids = [_item_key(scope, e) for e in items]
    return quality.family_report(scope, ", ".join(workers), records, ids, modes)


def answer_record(scope: str, explored: Explored, mode: Mode) -> dict[str, Any]:
    """What `mode` answers to one explored item, as quality.family_report reads it; an answer that
    runs through a node the exploration did not visit counts as wrong."""
    tree, item = explored.tree, explored.item
    ask: Callable[..., Any] = rerank if mode.rerank else replay
    try:
        found = ask(tree, mode.workers, mode.strategy, explored.max_new_tokens)
        text = found[1].text if mode.rerank else found.text
    except Unexplored:
        text = ""
    prediction = item.read(text)
    return {
        "mode": mode.name, "family": scope, "id": _item_key(scope, explored), "text": text,
        "prediction": prediction, "correct": item.correct(prediction), "seconds": None,
    }  # fmt: skip


def _item_key(scope: str, explored: Explored) -> str:
    return f"{explored.item.tag}:{explored.item.id}" if scope == POOLED else explored.item.id


def _accuracy_cell(scores: dict[str, quality.ModeScore], mode: str) -> str:
    score = scores.get(mode)
    return "—" if score is None else f"{100 * score.accuracy.rate:.1f}%"


def summary_table(reports: Sequence[quality.FamilyReport]) -> str:
    """One line per scope and worker set: the best worker alone against each fusion."""
    header = (
        "| scope | workers | best alone | cool, paper | cool, default | cool, fitted | cool_r, fitted "
        "| oracle | capture (fitted) | sources disagree |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        by_name = {s.mode: s for s in r.scores}
        solos = [s for s in r.scores if s.mode.endswith(" alone")]
        best = max(solos, key=lambda s: s.accuracy.hits)
        fitted = by_name.get(f"cool, {FITTED}")
        cell = partial(_accuracy_cell, by_name)
        capture = fitted.capture.describe() if fitted and fitted.capture else "—"
        oracle = r.oracle.describe() if r.oracle else "—"
        disagree = r.disagreement.describe() if r.disagreement else "—"
        lines.append(
            f"| {r.family} | {r.label} | {best.mode.removesuffix(' alone')} {100 * best.accuracy.rate:.1f}% "
            f"| {cell('cool, paper')} | {cell('cool, default')} | {cell(f'cool, {FITTED}')} "
            f"| {cell(f'cool_r, {FITTED}')} | {oracle} | {capture} | {disagree} |"
        )
    return "\n".join(lines)
