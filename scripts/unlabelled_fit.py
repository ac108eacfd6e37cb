"""Fitting without labels, measured against the labelled fit (docs/results.md, "Without labels"):
the tuning items' answers are replaced by what the workers' own answers say, weighted by how
reliable each worker is, then fitted as `coolfusion calibrate` fits, and measured on the held-out
items with their real answers.

    .venv/bin/python scripts/unlabelled_fit.py eval-results/trees-records --out eval-results/unlabelled-records

The pseudo-label of an item is the one-coin Dawid-Skene estimate over the workers' answers alone
(read by the item's rule without its answers): each worker is right with its own probability per
tag, a wrong worker says one of many wrong things, and expectation-maximisation finds both the
probabilities and each item's likeliest answer. An item whose likeliest answer is "none the
workers gave" is left out of the fit. Nothing of the held-out items is used but to measure."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from coolfusion.calibration import Calibration, FittedWorker
from coolfusion.calibration.answers import AnswerRule, normalise, read
from coolfusion.calibration.items import HELD_OUT, TUNING
from coolfusion.cli import held_out
from coolfusion.cli.calibrate import GUARD, fit_rule, in_scope, scopes, tie_order
from coolfusion.cli.explore import Explored, load_explored
from coolfusion.orchestrator.replay import Unexplored, replay
from coolfusion.orchestrator.strategy import DEFAULT

WRONG_ANSWERS = 50  # how many different wrong answers a wrong worker chooses among
OTHER_PRIOR = 0.05  # the prior that the truth is none of the workers' answers
ROUNDS = 50


def answer_key(item, text: str) -> str | None:
    """A worker's answer as its item's rule reads it without the accepted answers, comparable."""
    found = read(item.rule, text, (), item.field)
    if found is None:
        return None
    if item.rule == AnswerRule.NUMBER:
        return f"{float(found):g}"
    return normalise(found) or None


def solo_answers(items: Sequence[Explored], workers: Sequence[str]) -> list[dict[str, str | None]]:
    answers = []
    for e in items:
        row: dict[str, str | None] = {}
        for w in workers:
            try:
                row[w] = answer_key(e.item, replay(e.tree, [w], DEFAULT, e.max_new_tokens).text)
            except Unexplored:
                row[w] = None
        answers.append(row)
    return answers


def dawid_skene(
    answers: list[dict[str, str | None]], workers: Sequence[str]
) -> tuple[list[str | None], dict[str, float]]:
    """Each item's likeliest answer (None: none the workers gave) and each worker's estimated accuracy."""
    accuracy = dict.fromkeys(workers, 0.7)
    posteriors: list[dict[str | None, float]] = []
    for _ in range(ROUNDS):
        posteriors = []
        for row in answers:
            candidates: list[str | None] = [*dict.fromkeys(a for a in row.values() if a is not None), None]
            scores = {}
            for c in candidates:
                log_p = math.log(OTHER_PRIOR if c is None else 1.0)
                for w in workers:
                    p = accuracy[w]
                    log_p += math.log(p) if c is not None and row[w] == c else math.log((1 - p) / WRONG_ANSWERS)
                scores[c] = log_p
            top = max(scores.values())
            total = sum(math.exp(v - top) for v in scores.values())
            posteriors.append({c: math.exp(v - top) / total for c, v in scores.items()})
        for w in workers:
            agreed = sum(post.get(row[w], 0.0) for row, post in zip(answers, posteriors) if row[w] is not None)
            accuracy[w] = min(0.99, max(0.01, agreed / len(answers)))
    labels = [max(post, key=lambda c: post[c]) for post in posteriors]
    return labels, accuracy


def pseudo_labelled(
    items: list[Explored], workers: Sequence[str]
) -> tuple[list[Explored], dict[str, dict[str, float]], int]:
    """The tuning items with pseudo-labels per tag, the accuracies estimated per tag, and how many
    pseudo-labels agree with the real answers."""
    labelled, accuracies, agreeing = [], {}, 0
    for tag in dict.fromkeys(e.item.tag for e in items):
        chosen = [e for e in items if e.item.tag == tag]
        labels, accuracies[tag] = dawid_skene(solo_answers(chosen, workers), workers)
        for e, label in zip(chosen, labels):
            if e.item.rule not in (AnswerRule.NUMBER, AnswerRule.FIRST_PHRASE):
                raise SystemExit(f"{e.item.id}: only first_phrase and number items are pseudo-labelled here")
            if label is not None:
                agreeing += e.item.correct(label)
                labelled.append(replace(e, item=replace(e.item, answers=(label,))))
    return labelled, accuracies, agreeing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run = load_explored(args.trees)
    workers = tuple(run.settings["workers"])
    tuning = [e for e in run.explored if e.item.split == TUNING]
    held = [e for e in run.explored if e.item.split == HELD_OUT]
    pseudo, accuracies, agreeing = pseudo_labelled(tuning, workers)
    print(f"{len(pseudo)} of {len(tuning)} tuning items pseudo-labelled; {agreeing} of them as the real answers say")
    print(
        "estimated accuracy per tag:",
        json.dumps({t: {w: round(p, 2) for w, p in a.items()} for t, a in accuracies.items()}),
    )
    rows, results = [], {}
    for label, items in (("labelled", tuning), ("unlabelled", pseudo)):
        preference = tie_order(items, workers)
        for scope, scoped in scopes(items):
            fit = fit_rule(scoped, workers, preference=preference)
            models = run.settings["models"]
            calibration = Calibration(
                f"{label}-{scope}", tuple(FittedWorker(w, models[w]) for w in workers), fit.rule, GUARD.value
            )
            measured = held_out.measure(calibration, in_scope(held, scope), fit.best_alone)
            rows.append((f"{scope} ({label})", measured))
            results[f"{scope} ({label})"] = measured.document()
    args.out.mkdir(parents=True, exist_ok=True)
    table = held_out.table(rows)
    (args.out / "unlabelled.md").write_text(table + "\n")
    (args.out / "unlabelled.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
