"""Design 4 of the fitted selection rules (docs/results.md, "Fitting designs"): Cool+R with a rerank
fitted on its own, on the tuning trees only.

For each item, the answers Cool+R chooses among (the fused answer, and each worker's answer alone),
each whole answer scored by every worker (the trees hold these scores). The rerank is the step
rule's family applied to whole answers: per-worker weights on NLL per token or per character, a
prior per source (the fused answer is a source of its own), a lead source with a switch margin,
and a support term: how many workers alone read the same answer (the family's answer rule). It is
fitted by coordinate ascent on calibrate's grids from every source alone, the plain rule and
seeded random points, and scored by 5-fold cross-validation like calibrate's keep-or-fallback.

    python scripts/study_answer_rerank.py eval-results/trees-tuning --fused default
    python scripts/study_answer_rerank.py eval-results/trees-tuning --fused fitted --calibrations calibration/fitted

With --fused fitted, the fused answer comes from the shipped step rule, fitted on all the tuning
items: the cross-validated figures then flatter the rerank (its test folds were seen by the step
rule). With --fused default (nll_mean per token, the product's default) nothing leaks.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from coolfusion.calibration import Unit, load_calibration, nll_per_unit
from coolfusion.cli.calibrate import FOLDS, MARGINS, PRIORS, WEIGHTS, scopes, worker_sets
from coolfusion.cli.explore import Explored, load_explored, read_run
from coolfusion.orchestrator.replay import replay
from coolfusion.orchestrator.strategy import DEFAULT, RepetitionGuard, Strategy

SUPPORTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
RANDOM_STARTS, FOLD_RANDOM_STARTS = 8, 3


@dataclass(frozen=True)
class Answer:
    nll: dict[Unit, tuple[float, ...]]  # per unit, per worker: the whole answer's NLL
    sources: tuple[bool, ...]  # the fused answer, then each worker alone: whether it gave this answer
    right: bool
    support: int  # workers alone whose answer reads the same


@dataclass(frozen=True)
class Rerank:
    lead: int | None  # a source index (0: the fused answer)
    margin: float
    weights: tuple[float, ...]  # per worker
    priors: tuple[float, ...]  # per source
    unit: Unit = Unit.TOKEN
    support: float = 0.0

    def complexity(self) -> int:
        return (
            sum(w != 1.0 for w in self.weights)
            + sum(p != 0.0 for p in self.priors)
            + (self.support != 0.0)
            + (self.lead is not None and not math.isinf(self.margin))
            + (self.unit != Unit.TOKEN)
        )

    def choose(self, answers: Sequence[Answer]) -> Answer:
        total = sum(self.weights)
        scores = []
        for a in answers:
            judged = sum(w * x for w, x in zip(self.weights, a.nll[self.unit]) if w) / total if total else 0.0
            scores.append(judged - sum(p for p, by in zip(self.priors, a.sources) if by) - self.support * a.support)
        best = min(range(len(scores)), key=lambda i: (scores[i], i))
        own = None if self.lead is None else next((i for i, a in enumerate(answers) if a.sources[self.lead]), None)
        return answers[best if own is None or scores[best] < scores[own] - self.margin else own]


def answers_of(explored: Explored, workers: Sequence[str], fused: Strategy) -> list[Answer]:
    """The distinct answers among the fused one and each worker's alone, as Cool+R sees them."""
    tree, item = explored.tree, explored.item
    entries = [replay(tree, list(workers), fused, explored.max_new_tokens)]
    entries += [replay(tree, [w], DEFAULT, explored.max_new_tokens) for w in workers]
    whole = {(a.text, a.ends_with_eos): a.scores for a in tree.answers}
    reads = [item.read(a.text) for a in entries[1:]]
    merged: dict[tuple[str, bool], list[int]] = {}
    for source, a in enumerate(entries):
        merged.setdefault((a.text, a.ends_with_eos), []).append(source)
    found = []
    for (text, eos), sources in merged.items():
        scores = whole[text, eos]
        nll = {
            u: tuple(nll_per_unit(u, scores[w].log_prob_sum, scores[w].scored_tokens, text, eos) for w in workers)
            for u in Unit
        }  # fmt: skip
        read = item.read(text)
        flags = tuple(s in sources for s in range(len(entries)))
        found.append(Answer(nll, flags, item.correct(read), sum(r == read for r in reads)))
    return found


def correct(items: list[list[Answer]], rule: Rerank) -> int:
    return sum(rule.choose(answers).right for answers in items)


def neighbours(rule: Rerank, size: int) -> Iterator[Rerank]:
    for lead in [None, *range(size + 1)]:
        yield replace(rule, lead=lead)
    for margin in MARGINS:
        yield replace(rule, margin=margin)
    for unit in Unit:
        yield replace(rule, unit=unit)
    for support in SUPPORTS:
        yield replace(rule, support=support)
    for k in range(size):
        for weight in WEIGHTS:
            yield replace(rule, weights=rule.weights[:k] + (weight,) + rule.weights[k + 1 :])
    for k in range(size + 1):
        for prior in PRIORS:
            yield replace(rule, priors=rule.priors[:k] + (prior,) + rule.priors[k + 1 :])


def ascend(items: list[list[Answer]], rule: Rerank, size: int) -> tuple[Rerank, int]:
    key = (correct(items, rule), -rule.complexity())
    improved = True
    while improved:
        improved = False
        for candidate in neighbours(rule, size):
            candidate_key = (correct(items, candidate), -candidate.complexity())
            if candidate_key > key:
                rule, key, improved = candidate, candidate_key, True
    return rule, key[0]


def alone(size: int, source: int) -> Rerank:
    return Rerank(source, math.inf, (1.0,) * size, (0.0,) * (size + 1))


def search(items: list[list[Answer]], size: int, rng: random.Random, random_starts: int) -> Rerank:
    starts = [alone(size, s) for s in range(size + 1)] + [Rerank(None, math.inf, (1.0,) * size, (0.0,) * (size + 1))]
    starts += [
        Rerank(
            rng.choice([None, *range(size + 1)]),
            rng.choice(MARGINS),
            tuple(rng.choice(WEIGHTS) for _ in range(size)),
            tuple(rng.choice(PRIORS) for _ in range(size + 1)),
            rng.choice(list(Unit)),
        )
        for _ in range(random_starts)
    ]
    best, best_key = starts[0], (-1, 0)
    for start in starts:
        rule, right = ascend(items, start, size)
        if (right, -rule.complexity()) > best_key:
            best, best_key = rule, (right, -rule.complexity())
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", type=Path, help="a `coolfusion explore --split tuning` folder")
    parser.add_argument("--fused", choices=("default", "fitted"), default="default")
    parser.add_argument("--calibrations", type=Path, default=Path("calibration/fitted"))
    args = parser.parse_args()
    explored = load_explored(args.trees)
    if {e.item.split for e in explored} != {"tuning"}:
        raise SystemExit("the study reads tuning trees only")
    print("| scope | workers | fused answer | rerank, fitted on all | rerank, cross-validated | rule |")
    print("|---|---|---|---|---|---|")
    for scope, items in scopes(explored):
        for workers in worker_sets(read_run(args.trees)["workers"]):
            fused = DEFAULT
            if args.fused == "fitted":
                calibration = load_calibration(args.calibrations / f"{scope}-{'-'.join(workers)}.json")
                fused = Strategy(repetition_guard=RepetitionGuard.STOP, calibration=calibration)
            compiled = [answers_of(e, workers, fused) for e in items]
            size, rng = len(workers), random.Random(0)
            rule = search(compiled, size, rng, RANDOM_STARTS)
            folds = 0
            for fold in range(FOLDS):
                train = [a for i, a in enumerate(compiled) if i % FOLDS != fold]
                test = [a for i, a in enumerate(compiled) if i % FOLDS == fold]
                folds += correct(test, search(train, size, rng, FOLD_RANDOM_STARTS))
            print(
                f"| {scope} | {', '.join(workers)} | {correct(compiled, alone(size, 0))} | {correct(compiled, rule)} "
                f"| {folds} | {rule} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
