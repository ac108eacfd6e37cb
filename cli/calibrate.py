"""`coolfusion calibrate`: fits a selection rule (calibration/rule.py) for each tag of the explored
items (each task family) and for their pooled mix, for every ordered set of two or more explored
workers, by replaying the tuning trees of `coolfusion explore` (docs/design.md section 3.7); writes
one calibration file per fit, each with its scope, then measures every fit once on the held-out
items beside each worker alone (cli/held_out.py), and writes fit.md."""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from coolfusion.calibration import Calibration, FittedWorker, SelectionRule, Unit, WorkerFit, nll_per_unit
from coolfusion.calibration.file import save_calibration
from coolfusion.calibration.items import HELD_OUT, POOLED, TUNING
from coolfusion.calibration.scope import FORMS, Scope
from coolfusion.cli import held_out
from coolfusion.cli.eval import commit
from coolfusion.cli.explore import Explored, ExploredRun, load_explored
from coolfusion.orchestrator.domain import StepCandidate, TreeNode
from coolfusion.orchestrator.replay import Unexplored, branch_of, candidates_for, replay
from coolfusion.orchestrator.strategy import DEFAULT, PAPER, RepetitionGuard, Strategy

# The values the search tries, in scaled units (one unit: a worker's spread of NLL per character
# on the tuning items). Coarse on purpose: a few hundred items per family cannot tell finer
# steps apart, and a finer grid only fits their noise.
MARGINS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, math.inf)
WEIGHTS = (0.0, 0.5, 1.0, 2.0)
PRIORS = (0.0, 0.25, 0.5, 1.0, 2.0)
# Seeded random starting points besides the fixed ones: the right-answer count is a step function
# of the parameters, and coordinate ascent from a few points stops on its plateaus.
RANDOM_STARTS = 12
# A fitted rule is kept only where it wins under cross-validation: fitted without each fold of the
# tuning items (item i is in fold i % FOLDS), it must answer that fold better, in total, than the
# worker that is best alone without it. Else the calibration is that worker alone: a few items won
# on the data a rule was fitted on are no evidence that it switches well elsewhere. Each fold's
# search starts from fewer random points, to keep the five extra searches affordable.
FOLDS = 5
FOLD_RANDOM_STARTS = 4
# Fitted rules stop loops like the product's default does.
GUARD = RepetitionGuard.STOP


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trees", type=Path, help="a `coolfusion explore` folder")
    parser.add_argument(
        "--data", type=Path, default=None,
        help="the labelled-items file (default: the one the trees were explored from)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("calibrations"), help="where the calibration files go")
    parser.add_argument("--workers", default="", help="comma-separated workers to fit for (default: all explored)")


def run_calibrate(args: argparse.Namespace) -> int:
    run = load_explored(args.trees, args.data)
    tuning = [e for e in run.explored if e.item.split == TUNING]
    if not tuning:
        raise SystemExit(f"coolfusion: calibrate fits on tuning items only, and {args.trees} holds none")
    held = [e for e in run.explored if e.item.split == HELD_OUT]
    workers = [w for w in args.workers.split(",") if w] or run.settings["workers"]
    print(f"split: {_split_statement(run, len(tuning), len(held))}", flush=True)
    preference = tie_order(tuning, workers)
    print(f"workers alone that tie on a scope's items go in their order on all tuning items: {', '.join(preference)}")
    fits: list[tuple[str, Fit, Calibration]] = []
    for scope, items in scopes(tuning):
        for chosen in worker_sets(workers):
            started = time.monotonic()
            fit = fit_rule(items, chosen, preference=preference)
            calibration = _calibration(scope, fit, run, items)
            save_calibration(calibration, args.out / f"{calibration.name}.json")
            fits.append((scope, fit, calibration))
            print(f"{calibration.name}: {_summary(fit)} ({time.monotonic() - started:.0f} s)", flush=True)
    text = fit_table([(scope, fit) for scope, fit, _ in fits])
    if held:  # measured once, after every fit is written
        rows = []
        for scope, fit, calibration in fits:
            by_tag = {s: c for s, _, c in fits if s != POOLED and c.worker_names == fit.workers}
            routed = by_tag if scope == POOLED and by_tag else None
            measured = held_out.measure(calibration, in_scope(held, scope), fit.best_alone, routed)
            save_calibration(replace(calibration, held_out=measured.document()), args.out / f"{calibration.name}.json")
            rows.append((scope, measured))
        text += "\n\n" + held_out.table(rows)
        print("\n" + held_out.table(rows))
    (args.out / "fit.md").write_text(text + "\n", encoding="utf-8")
    print(f"\n{len(fits)} calibrations and fit.md in {args.out}")
    return 0


def _split_statement(run: ExploredRun, tuning: int, held: int) -> str:
    rule = run.data.split_rule() if run.data else "the task families' own split (cli/tasks/README.md)"
    measured = f"{held} held-out items, measured once after fitting" if held else "no held-out items explored"
    return f"{rule}: fitting on {tuning} tuning items; {measured}"


def scopes(explored: list[Explored]) -> Iterator[tuple[str, list[Explored]]]:
    """Each tag's items (a task family's), then all of them pooled (the mixed workload) where that
    is another set of items: with several tags, or untagged items beside the tagged."""
    tags = list(dict.fromkeys(e.item.tag for e in explored))
    for tag in (t for t in tags if t):
        yield tag, in_scope(explored, tag)
    if len(tags) > 1 or tags == [""]:
        yield POOLED, explored


def in_scope(explored: list[Explored], scope: str) -> list[Explored]:
    """The items a scope's fit is made on and measured on: a tag's, or all of them (pooled)."""
    return list(explored) if scope == POOLED else [e for e in explored if e.item.tag == scope]


def worker_sets(workers: Sequence[str]) -> list[tuple[str, ...]]:
    """Every ordered subset of two or more, in the explored order (its first worker is the lead
    whose tokens count the answer's length)."""
    return [s for size in range(2, len(workers) + 1) for s in itertools.combinations(workers, size)]


# ---- replay, compiled for the search ---------------------------------------------------------
#
# The search replays thousands of candidate rules; replay() itself (orchestrator/replay.py)
# rebuilds every step's candidates and scores each time. Compiled, a tree keeps per node only what
# a fitted rule reads: each candidate's scaled scores, who proposed it, and where it leads. fit_rule
# checks that the compiled replay of the rule it returns equals replay() on every item.


@dataclass(frozen=True)
class _Choice:
    nll: dict[Unit, tuple[float, ...]]  # per unit, per worker of the set: unscaled NLL (a lone candidate: empty)
    proposed: tuple[bool, ...]  # per worker of the set: whether it proposed this candidate
    node: int | None  # the compiled node it leads to, or None when the answer ends here
    right: bool = False  # the ended answer's correctness (an unexplored node counts as wrong)


@dataclass(frozen=True)
class _Node:
    choices: tuple[_Choice, ...] = ()  # empty: entering this node ends the answer, `right` says how
    right: bool = False


def compile_tree(explored: Explored, workers: Sequence[str]) -> list[_Node]:
    """The tree as a fusion of `workers` under a fitted rule (with GUARD) walks it; node 0 is the root."""
    tree, item, lead = explored.tree, explored.item, workers[0]
    compiled: list[_Node] = []
    index_of: dict[int, int] = {}

    def right(text: str) -> bool:
        return item.correct(item.read(text))

    def enter(i: int) -> int:
        if i in index_of:
            return index_of[i]
        index_of[i] = len(compiled)
        compiled.append(_Node())
        node = tree.nodes[i]
        if node.repetition_cut is not None:
            ended = _Node(right=right(node.text[: node.repetition_cut]))
        elif not node.visited:
            ended = _Node(right=False)
        elif node.answer_tokens[lead] >= explored.max_new_tokens:
            ended = _Node(right=right(node.text))
        else:
            ended = _Node(choices=tuple(choice(node, c) for c in candidates_for(node, workers)))
        compiled[index_of[i]] = ended
        return index_of[i]

    def choice(node: TreeNode, candidate: StepCandidate) -> _Choice:
        nll = {unit: _nlls(candidate, workers, unit) for unit in Unit} if candidate.scores else {}
        proposed = tuple(w in candidate.proposed_by for w in workers)
        branch = node.branches[branch_of(node, candidate)]
        if branch.answer is not None:
            return _Choice(nll, proposed, None, right(tree.answers[branch.answer].text))
        return _Choice(nll, proposed, enter(branch.node or 0))

    enter(0)
    return compiled


def _nlls(candidate: StepCandidate, workers: Sequence[str], unit: Unit) -> tuple[float, ...]:
    return tuple(
        nll_per_unit(unit, s.log_prob_sum, s.scored_tokens, candidate.text, candidate.ends_with_eos)
        for s in (candidate.scores[w] for w in workers)
    )


@dataclass(frozen=True)
class _Params:
    """A point of the search: the rule's parameters for one worker set."""

    lead: int | None  # index into the worker set
    margin: float
    weights: tuple[float, ...]
    priors: tuple[float, ...]
    unit: Unit = Unit.TOKEN
    scaled: bool = False  # whether each worker's NLL is divided by its spread (else by 1)

    def complexity(self) -> int:
        """How far from the plain rule (the product's default choice, nll_mean per token): a tie in
        right answers goes to the simpler point."""
        return (
            sum(w != 1.0 for w in self.weights) + sum(p != 0.0 for p in self.priors)
            + (self.lead is not None and not math.isinf(self.margin)) + (self.unit != Unit.TOKEN) + self.scaled
        )  # fmt: skip


Spreads = dict[Unit, tuple[float, ...]]


def _scales(params: _Params, spreads: Spreads) -> tuple[float, ...]:
    return spreads[params.unit] if params.scaled else (1.0,) * len(params.weights)


def _walk(nodes: list[_Node], params: _Params, spreads: Spreads) -> bool:
    """Whether the answer this rule reaches is right; mirrors SelectionRule.score and .choose."""
    node, scales = nodes[0], _scales(params, spreads)
    total = sum(params.weights)
    while node.choices:
        choices = node.choices
        if len(choices) == 1:
            chosen = choices[0]
        else:
            scores = []
            for c in choices:
                judged = 0.0
                if total > 0:
                    judged = sum(w * x / s for w, x, s in zip(params.weights, c.nll[params.unit], scales) if w) / total
                scores.append(judged - sum(p for p, by in zip(params.priors, c.proposed) if by))
            best = min(range(len(scores)), key=lambda i: (scores[i], i))
            own = (
                None
                if params.lead is None
                else next((i for i, c in enumerate(choices) if c.proposed[params.lead]), None)
            )
            pick = best if own is None or scores[best] < scores[own] - params.margin else own
            chosen = choices[pick]
        if chosen.node is None:
            return chosen.right
        node = nodes[chosen.node]
    return node.right


# ---- the search ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """A fitted rule for one worker set on one scope, and what each choice reached there."""

    workers: tuple[str, ...]
    rule: SelectionRule
    items: int
    correct: int
    reached: dict[str, int]  # label -> correct answers on the tuning items (solo, paper, default, each start)
    unexplored: int  # answers some choice reached through a node the exploration did not visit
    best_alone: str  # the worker best alone on these items (ties by the preference given to fit_rule)


def fit_rule(items: list[Explored], workers: tuple[str, ...], seed: int = 0, preference: Sequence[str] = ()) -> Fit:
    """The rule of the family (calibration/rule.py) with the most right answers on `items`, found by
    coordinate ascent from every worker alone (a lead that never yields), from the product's default
    choice (NLL per token, unscaled), from per-character scaled scores and from seeded random
    points; ties go to the simpler rule. It is kept only if it also wins under cross-validation
    (FOLDS), else the best worker alone stands; workers alone that tie go by `preference` (workers
    named earlier first, then the order of `workers`). Starting from each worker alone, the fit is
    never worse than the best of them on these items."""
    spreads = {unit: tuple(_spread(items, w, unit) for w in workers) for unit in Unit}
    trees = [compile_tree(e, workers) for e in items]
    rng = random.Random(f"{seed}/{','.join(workers)}/{len(items)}")
    ranks = _ranks(workers, preference)
    best, reached = _search(trees, spreads, _starts(rng, workers, RANDOM_STARTS), len(workers))
    reached["cross-validated fitted"], reached["cross-validated best alone"] = _cross_validated(
        trees, spreads, rng, workers, ranks
    )
    if reached["cross-validated fitted"] <= reached["cross-validated best alone"]:
        best = _best_alone(trees, spreads, ranks)
    rule = _rule(best, spreads, workers)
    exact, unexplored = _replayed(items, workers, Strategy(repetition_guard=GUARD, calibration=_bare(rule, workers)))
    if exact != _correct(trees, best, spreads):
        raise AssertionError(f"compiled replay found {_correct(trees, best, spreads)} right, replay() {exact}")
    for name in workers:
        reached[f"{name} alone"] = _replayed(items, [name], DEFAULT)[0]
    reached["paper"] = _replayed(items, workers, PAPER)[0]
    reached["default"] = _replayed(items, workers, DEFAULT)[0]
    best_alone = max(workers, key=lambda w: (reached[f"{w} alone"], -ranks[workers.index(w)]))
    return Fit(workers, rule, len(items), exact, reached, unexplored, best_alone)


Compiled = list[list[_Node]]


def _correct(trees: Compiled, params: _Params, spreads: Spreads) -> int:
    return sum(_walk(nodes, params, spreads) for nodes in trees)


def _alone(size: int, lead: int) -> _Params:
    """A worker alone: the lead of a rule that never yields."""
    return _Params(lead, math.inf, (1.0,) * size, (0.0,) * size)


def _starts(rng: random.Random, workers: Sequence[str], random_starts: int) -> dict[str, _Params]:
    size = len(workers)
    plain = _Params(None, math.inf, (1.0,) * size, (0.0,) * size)
    starts = {f"{name} alone": _alone(size, i) for i, name in enumerate(workers)}
    starts |= {"plain": plain, "per character, scaled": replace(plain, unit=Unit.CHARACTER, scaled=True)}
    return starts | {f"random {n}": _random_point(rng, size) for n in range(random_starts)}


def _search(trees: Compiled, spreads: Spreads, starts: dict[str, _Params], size: int) -> tuple[_Params, dict[str, int]]:
    """The best point coordinate ascent reaches from any start, and what each start reached."""
    reached, best, best_key = {}, next(iter(starts.values())), (-1, 0)
    for label, start in starts.items():
        point, score = _ascend(start, lambda p: _correct(trees, p, spreads), size)
        reached[f"fit from {label}"] = score
        if (score, -point.complexity()) > best_key:
            best, best_key = point, (score, -point.complexity())
    return best, reached


def _ranks(workers: Sequence[str], preference: Sequence[str]) -> tuple[int, ...]:
    """Each worker's place in the tie order: those in `preference` first, in its order, then the rest."""
    order = [w for w in preference if w in workers] + [w for w in workers if w not in preference]
    return tuple(order.index(w) for w in workers)


def _best_alone(trees: Compiled, spreads: Spreads, ranks: Sequence[int]) -> _Params:
    """The worker with the most right answers alone; ties go to the lowest rank."""
    size = len(ranks)
    return max((_alone(size, i) for i in range(size)), key=lambda p: (_correct(trees, p, spreads), -ranks[p.lead or 0]))


def _cross_validated(
    trees: Compiled, spreads: Spreads, rng: random.Random, workers: Sequence[str], ranks: Sequence[int]
) -> tuple[int, int]:
    """Right answers on each fold of the rule fitted without it, and of the worker best alone
    without it, summed over the folds. The spreads (unlabelled) come from all the items."""
    fitted = alone = 0
    for fold in range(FOLDS):
        train = [t for i, t in enumerate(trees) if i % FOLDS != fold]
        test = [t for i, t in enumerate(trees) if i % FOLDS == fold]
        point, _ = _search(train, spreads, _starts(rng, workers, FOLD_RANDOM_STARTS), len(workers))
        fitted += _correct(test, point, spreads)
        alone += _correct(test, _best_alone(train, spreads, ranks), spreads)
    return fitted, alone


def _rule(params: _Params, spreads: Spreads, workers: Sequence[str]) -> SelectionRule:
    scales = _scales(params, spreads)
    return SelectionRule(
        {w: WorkerFit(scales[i], params.weights[i], params.priors[i]) for i, w in enumerate(workers)},
        None if params.lead is None else workers[params.lead],
        params.margin,
        params.unit,
    )


def _random_point(rng: random.Random, size: int) -> _Params:
    return _Params(
        rng.choice([None, *range(size)]), rng.choice(MARGINS),
        tuple(rng.choice(WEIGHTS) for _ in range(size)), tuple(rng.choice(PRIORS) for _ in range(size)),
        rng.choice(list(Unit)), rng.choice([False, True]),
    )  # fmt: skip


def _ascend(start: _Params, correct: Callable[[_Params], int], size: int) -> tuple[_Params, int]:
    """Coordinate ascent: one parameter at a time, each value of its grid, while (right answers,
    simplicity) improves."""
    point, key = start, (correct(start), -start.complexity())
    improved = True
    while improved:
        improved = False
        for candidate in _neighbours(point, size):
            candidate_key = (correct(candidate), -candidate.complexity())
            if candidate_key > key:
                point, key, improved = candidate, candidate_key, True
    return point, key[0]


def _neighbours(point: _Params, size: int) -> Iterator[_Params]:
    for lead in [None, *range(size)]:
        yield replace(point, lead=lead)
    for margin in MARGINS:
        yield replace(point, margin=margin)
    for unit in Unit:
        for scaled in (False, True):
            yield replace(point, unit=unit, scaled=scaled)
    for k in range(size):
        for weight in WEIGHTS:
            yield replace(point, weights=point.weights[:k] + (weight,) + point.weights[k + 1 :])
        for prior in PRIORS:
            yield replace(point, priors=point.priors[:k] + (prior,) + point.priors[k + 1 :])


def _spread(items: list[Explored], worker: str, unit: Unit) -> float:
    """The worker's standard deviation of NLL per unit over every candidate it scored: its
    temperature, so that one scaled unit means as much for every worker."""
    values = [
        x
        for e in items
        for node in e.tree.nodes
        for c in node.candidates
        if worker in c.scores
        and math.isfinite(x := nll_per_unit(unit, c.scores[worker].log_prob_sum, c.scores[worker].scored_tokens, c.text, c.ends_with_eos))
    ]  # fmt: skip
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return spread if spread > 0 else 1.0


def _replayed(items: list[Explored], workers: Sequence[str], strategy: Strategy) -> tuple[int, int]:
    """(right answers, answers through an unexplored node) of replay() over the items."""
    right = unexplored = 0
    for e in items:
        try:
            text = replay(e.tree, workers, strategy, e.max_new_tokens).text
        except Unexplored:
            unexplored += 1
            continue
        right += e.item.correct(e.item.read(text))
    return right, unexplored


def _bare(rule: SelectionRule, workers: Sequence[str]) -> Calibration:
    return Calibration("fit", tuple(FittedWorker(w, "") for w in workers), rule, GUARD.value)


# ---- output -------------------------------------------------------------------------------------


def _calibration(scope: str, fit: Fit, run: ExploredRun, items: list[Explored]) -> Calibration:
    tags: dict[str, int] = {}
    for e in items:
        tags[e.item.tag or "(untagged)"] = tags.get(e.item.tag or "(untagged)", 0) + 1
    data = run.data.describe() if run.data else {"task families": sorted(tags)}
    return Calibration(
        name=f"{scope}-{'-'.join(fit.workers)}",
        workers=tuple(FittedWorker(w, run.settings["models"][w]) for w in fit.workers),
        rule=fit.rule,
        repetition_guard=GUARD.value,
        scope=scope_of(items),
        fitted_on={"scope": scope, "split": "tuning", "items": tags, "data": data, "commit": commit()},
        tuning={"items": fit.items, "correct": fit.correct, "unexplored": fit.unexplored, "reached": fit.reached},
    )


def scope_of(items: list[Explored]) -> Scope:
    """Where a fit on `items` applies: their tags, their prompt forms and their longest answer cap."""
    return Scope(
        tags=tuple(dict.fromkeys(e.item.tag for e in items if e.item.tag)),
        forms=tuple(form for form in FORMS if any(e.item.form == form for e in items)),
        max_new_tokens=max(e.max_new_tokens for e in items),
        answers=tuple(dict.fromkeys(e.item.answer_form for e in items)),
    )


def tie_order(tuning: list[Explored], workers: Sequence[str]) -> list[str]:
    """The workers by their right answers alone on every tuning item, most first (ties: their order).
    A tag has few items and workers alone often tie there; the record on all of a deployment's
    tuning items is the larger evidence of which to serve alone."""
    right = {w: _replayed(tuning, [w], DEFAULT)[0] for w in workers}
    return sorted(workers, key=lambda w: -right[w])


def _summary(fit: Fit) -> str:
    best = fit.best_alone
    return (
        f"fitted {fit.correct}/{fit.items}, best alone {best} {fit.reached[f'{best} alone']}, "
        f"paper {fit.reached['paper']}, default {fit.reached['default']}; {describe_rule(fit.rule)}"
    )


def describe_rule(rule: SelectionRule) -> str:
    """The rule in one line, e.g. 'lead gemma3, margin 1.5; qwen weight 2, prior 0.5'."""
    if rule.lead and math.isinf(rule.margin):
        return f"{rule.lead} alone"
    parts = [f"lead {rule.lead}, margin {rule.margin:g}" if rule.lead else "no lead", f"per {rule.unit}"]
    parts += [
        f"{name} weight {fit.weight:g}, prior {fit.prior:g}, scale {fit.scale:.3g}"
        for name, fit in rule.workers.items()
    ]
    return "; ".join(parts)


def fit_table(fits: list[tuple[str, Fit]]) -> str:
    """fit.md: per scope and worker set, right answers of each worker alone, the paper's rule, the
    default and the fitted rule on the tuning items, and the cross-validation that kept the rule
    or the best worker alone."""
    lines = [
        "| scope | workers | items | best alone | paper | default | fitted | cross-validated: rule / best alone | rule |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scope, fit in fits:
        best = fit.best_alone
        lines.append(
            f"| {scope} | {', '.join(fit.workers)} | {fit.items} | {best} {fit.reached[f'{best} alone']} "
            f"| {fit.reached['paper']} | {fit.reached['default']} | **{fit.correct}** "
            f"| {fit.reached['cross-validated fitted']} / {fit.reached['cross-validated best alone']} "
            f"| {describe_rule(fit.rule)} |"
        )
    return "\n".join(lines)
