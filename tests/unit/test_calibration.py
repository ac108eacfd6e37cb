"""Fitted selection rules: how they score and choose, their files, and the fit that replays trees."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from coolfusion.calibration import (
    Calibration,
    CalibrationError,
    FittedWorker,
    SelectionRule,
    Unit,
    WorkerFit,
    load_calibration,
    nll_per_unit,
    shipped_calibrations,
)
from coolfusion.calibration.file import from_document, save_calibration, to_document
from coolfusion.calibration.scope import Scope
from coolfusion.cli import tasks
from coolfusion.cli.calibrate import _Params, _walk, compile_tree, fit_rule
from coolfusion.cli.explore import Explored
from coolfusion.cli.tasks.export import labelled
from coolfusion.orchestrator.domain import (
    CandidateScore,
    Finish,
    FusionTree,
    StepCandidate,
    TreeAnswer,
    TreeBranch,
    TreeNode,
)
from coolfusion.orchestrator.replay import replay
from coolfusion.orchestrator.strategy import RepetitionGuard, Strategy

PAIR = {"a": WorkerFit(), "b": WorkerFit()}


def test_a_lead_keeps_its_candidate_unless_another_scores_lower_by_more_than_the_margin() -> None:
    own = {"a": 1.0, "b": 3.0}  # a's candidate: 2.0 on average
    other = {"a": 2.5, "b": 0.5}  # b's candidate: 1.5
    for margin, winner in ((math.inf, 0), (1.0, 0), (0.5, 0), (0.25, 1), (0.0, 1)):
        rule = SelectionRule(PAIR, lead="a", margin=margin)
        scores = [rule.score(own, ["a"]), rule.score(other, ["b"])]
        assert rule.choose(scores, [["a"], ["b"]]) == winner, margin
    assert SelectionRule(PAIR).choose([2.0, 1.5], [["a"], ["b"]]) == 1  # no lead: the lowest
    assert SelectionRule(PAIR, lead="a", margin=0.0).choose([1.5, 2.0], [["b"], ["a"]]) == 0


def test_scales_weights_and_priors_shape_the_fused_score() -> None:
    rule = SelectionRule({"a": WorkerFit(scale=2.0, weight=3.0, prior=0.5), "b": WorkerFit(weight=1.0)})
    assert rule.score({"a": 4.0, "b": 1.0}, ["a"]) == pytest.approx((3 * 4.0 / 2 + 1.0) / 4 - 0.5)
    silent = SelectionRule({"a": WorkerFit(weight=0.0, prior=1.0), "b": WorkerFit()})
    assert silent.score({"a": math.inf, "b": 2.0}, ["a"]) == 1.0  # a proposes without judging
    assert SelectionRule(PAIR).choose([1.0, 1.0], [["b"], ["a"]]) == 0  # ties go to the earliest
    assert SelectionRule(PAIR, lead="a", margin=0.0).choose([1.0, 2.0], [["b"], ["b"]]) == 0  # lead dropped


def test_nll_is_per_token_or_per_character_and_an_eos_counts_as_one_character() -> None:
    assert nll_per_unit(Unit.CHARACTER, -6.0, 3, " ab", False) == 2.0
    assert nll_per_unit(Unit.CHARACTER, -6.0, 2, " a", True) == 2.0
    assert nll_per_unit(Unit.TOKEN, -6.0, 2, " a", True) == 3.0
    assert nll_per_unit(Unit.TOKEN, 0.0, 0, "", False) == math.inf  # nothing scored is never preferred


def _calibration(margin: float = math.inf) -> Calibration:
    fits = {"a": WorkerFit(1.5, 2.0, 0.25), "b": WorkerFit(0.5, 0.0, 0.0)}
    rule = SelectionRule(fits, lead="b", margin=margin, unit=Unit.TOKEN)
    return Calibration("x", (FittedWorker("a", "model-a"), FittedWorker("b", "model-b")), rule, "stop")


@pytest.mark.parametrize("margin", [math.inf, 0.75])
def test_a_calibration_file_reads_back_as_written(tmp_path, margin: float) -> None:
    save_calibration(_calibration(margin), tmp_path / "x.json")
    assert load_calibration(tmp_path / "x.json") == _calibration(margin)
    scoped = replace(_calibration(margin), scope=Scope(("extract",), ("chat",), 64), held_out={"items": 3})
    save_calibration(scoped, tmp_path / "scoped.json")
    assert load_calibration(tmp_path / "scoped.json") == scoped


def test_a_scope_says_why_a_request_lies_outside_it() -> None:
    scope = Scope(("facts", "arithmetic"), ("plain",), 16)
    assert scope.excludes("", "plain", 16) is None  # an untagged request is judged by form and length
    assert scope.excludes("facts", "plain", 8) is None
    assert (
        scope.excludes("chat-support", "plain", 8)
        == "the request's tag is 'chat-support'; it was fitted on tags facts, arithmetic"
    )
    assert scope.excludes("", "chat", 8) == "the request's prompt is chat; it was fitted on plain prompts"
    assert scope.excludes("", "plain", 48) == "the request allows 48 new tokens; it was fitted on answers of at most 16"
    assert Scope().excludes("any", "chat", 4096) == "the request's tag is 'any'; it was fitted on untagged items"
    assert Scope().excludes("", "chat", 4096) is None
    assert (
        scope.excludes("facts", "plain", 8, "json_schema")
        == "the request's answer is held to a json_schema constraint; it was fitted on free text"
    )
    assert Scope(answers=("json_schema",)).excludes("", "plain", 8) is not None  # a fit on JSON, not on text


def test_every_shipped_calibration_is_scoped_to_plain_short_answers_of_the_task_families() -> None:
    for _, calibration in shipped_calibrations():
        assert calibration.scope is not None and calibration.scope.forms == ("plain",)
        assert set(calibration.scope.tags) <= set(tasks.FAMILIES) and calibration.scope.max_new_tokens <= 16
        assert calibration.scope.excludes("", "chat", 48) is not None  # open chat gets the unfitted default


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda d: d.update(format="other"), "format is 'other'"),
        (lambda d: d["rule"].update(lead="c"), "lead 'c' is not one of its workers"),
        (lambda d: d["workers"][0].update(scale=0), "scale must be positive"),
        (lambda d: d["workers"][1].update(weight=-1), "weight must be >= 0"),
        (lambda d: d["rule"].update(margin=-0.5), "margin must be >= 0"),
        (lambda d: d["workers"].append(dict(d["workers"][0])), "workers must be distinct"),
        (lambda d: d.update(repetition_guard="loud"), "repetition_guard is 'loud'"),
        (lambda d: d["rule"].update(unit="byte"), "unit is 'byte'"),
        (lambda d: d["workers"][0].pop("model_id"), "missing or malformed field"),
        (lambda d: d.update(scope={"prompt_forms": ["voice"]}), "scope.prompt_forms must list one or both"),
        (lambda d: d.update(scope={"max_new_tokens": 0}), "scope.max_new_tokens must be a positive"),
    ],
)
def test_a_malformed_calibration_is_refused_saying_what_is_wrong(tmp_path, change, says: str) -> None:
    document = to_document(_calibration())
    change(document)
    with pytest.raises(CalibrationError, match=says):
        from_document(document)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="bad.json"):
        load_calibration(tmp_path / "bad.json")


def test_a_calibration_names_how_workers_differ_from_those_it_was_fitted_for() -> None:
    calibration = _calibration()
    assert calibration.mismatch({"a": "model-a", "b": "model-b"}) is None
    assert "fitted for workers ['a', 'b'], not ['b', 'a']" in calibration.mismatch({"b": "model-b", "a": "model-a"})
    assert "fitted for b serving 'model-b'; it serves 'model-c'" in calibration.mismatch(
        {"a": "model-a", "b": "model-c"}
    )


# ---- fitting ----------------------------------------------------------------------------------


def _scored(text: str, nll_per_character: float) -> CandidateScore:
    return CandidateScore(scored_tokens=1, log_prob_sum=-nll_per_character * len(text), context_tokens_with_text=0)


def _one_step(item: tasks.TaskItem, proposals: dict[str, str], judged: dict[str, dict[str, float]]) -> Explored:
    """An item whose answer is one step: each worker proposes `proposals[worker]`, every worker
    scores each candidate with `judged[text][scorer]` nats per character, and each candidate ends
    the answer (the newline stop)."""
    candidates: dict[str, StepCandidate] = {}
    for worker, text in proposals.items():
        candidates.setdefault(text, StepCandidate(text, False, []))
        candidates[text].proposed_by.append(worker)
    for c in candidates.values():
        c.scores = {w: _scored(c.text, judged[c.text][w]) for w in proposals}
    answers = [TreeAnswer(t, False, {w: _scored(t, judged[t][w]) for w in proposals}) for t in candidates]
    branches = [TreeBranch(answer=i, finish=Finish.STOP) for i in range(len(answers))]
    root = TreeNode("", dict.fromkeys(proposals, 0), list(candidates.values()), branches)
    empty = TreeAnswer("", False, {w: _scored("x", 9.0) for w in proposals})
    tree = FusionTree(list(proposals), dict.fromkeys(proposals, 10), [root], [*answers, empty], True)
    return Explored(labelled(item), tree, 8)


def _specialists(count: int, seed: int = 3) -> list[Explored]:
    """Arithmetic items where worker `sure` is right on 3 in 4 and sure of itself, `loose` is right
    on half of them and on the rest only where `sure` is wrong, and `noisy` is rarely right."""
    rng = random.Random(seed)
    made = []
    for item in tasks.items("arithmetic", "tuning")[:count]:
        right, wrong, other = f" {item.reference}", f" {int(float(item.reference)) + 1}", " 0"
        sure_right, loose_right = rng.random() < 0.75, rng.random() < 0.5
        proposals = {
            "sure": right if sure_right else wrong,
            "loose": right if (loose_right or not sure_right) else other,
            "noisy": other,
        }
        judged = {
            right: {"sure": 0.2 if sure_right else 1.5, "loose": 0.8, "noisy": 1.0},
            wrong: {"sure": 0.6, "loose": 1.2, "noisy": 1.0},
            other: {"sure": 2.0, "loose": 0.9, "noisy": 0.1},
        }
        made.append(_one_step(item, proposals, judged))
    return made


def test_a_fit_is_never_below_the_best_worker_alone_and_equals_its_replay() -> None:
    items = _specialists(80)
    fit = fit_rule(items, ("sure", "loose", "noisy"))
    best_alone = max(fit.reached[f"{w} alone"] for w in fit.workers)
    assert fit.correct >= best_alone
    assert fit.correct > best_alone  # here a rule can take the loose worker's answer where sure is unsure
    strategy = Strategy(repetition_guard=RepetitionGuard.STOP, calibration=Calibration("f", (), fit.rule, "stop"))
    assert fit.correct == sum(
        e.item.correct(e.item.read(replay(e.tree, fit.workers, strategy, e.max_new_tokens).text)) for e in items
    )


def test_the_compiled_walk_chooses_as_replay_does_for_any_rule() -> None:
    items, workers = _specialists(40, seed=11), ("sure", "loose", "noisy")
    rng = random.Random(5)
    spreads = {Unit.TOKEN: (0.7, 1.3, 2.0), Unit.CHARACTER: (0.4, 0.9, 1.1)}
    compiled = [compile_tree(e, workers) for e in items]
    for _ in range(60):
        params = _Params(
            rng.choice([None, 0, 1, 2]), rng.choice([0.0, 0.3, 1.0, math.inf]),
            tuple(rng.choice([0.0, 0.5, 1.0, 2.0]) for _ in workers), tuple(rng.choice([0.0, 0.25, 1.0]) for _ in workers),
            rng.choice(list(Unit)), rng.choice([False, True]),
        )  # fmt: skip
        scales = spreads[params.unit] if params.scaled else (1.0, 1.0, 1.0)
        rule = SelectionRule(
            {w: WorkerFit(scales[i], params.weights[i], params.priors[i]) for i, w in enumerate(workers)},
            None if params.lead is None else workers[params.lead], params.margin, params.unit,
        )  # fmt: skip
        strategy = Strategy(repetition_guard=RepetitionGuard.STOP, calibration=Calibration("r", (), rule, "stop"))
        for e, nodes in zip(items, compiled):
            text = replay(e.tree, workers, strategy, e.max_new_tokens).text
            assert _walk(nodes, params, spreads) == e.item.correct(e.item.read(text))


def _coin_flips(count: int, seed: int = 7) -> list[Explored]:
    """Arithmetic items where `sure` is right on 3 in 4 and `coin` on a random half, each candidate
    scored at random by both: no rule can know when to trust `coin`, so any gain a fit finds on
    these items is their noise."""
    rng = random.Random(seed)
    made = []
    for item in tasks.items("arithmetic", "tuning")[:count]:
        right, wrong = f" {item.reference}", f" {int(float(item.reference)) + 1}"
        proposals = {"sure": right if rng.random() < 0.75 else wrong, "coin": right if rng.random() < 0.5 else wrong}
        judged = {text: {w: rng.uniform(0.2, 2.0) for w in proposals} for text in (right, wrong)}
        made.append(_one_step(item, proposals, judged))
    return made


def test_a_fit_that_only_wins_on_its_own_items_gives_way_to_the_best_worker_alone() -> None:
    fit = fit_rule(_coin_flips(120), ("sure", "coin"))
    searched = max(score for label, score in fit.reached.items() if label.startswith("fit from"))
    assert searched > fit.reached["sure alone"]  # the search found a rule that wins on these items...
    assert fit.reached["cross-validated fitted"] <= fit.reached["cross-validated best alone"]  # ...by chance
    assert (fit.rule.lead, fit.rule.margin) == ("sure", math.inf)
    assert fit.correct == fit.reached["sure alone"]


def test_a_fit_that_wins_on_unseen_folds_is_kept() -> None:
    fit = fit_rule(_specialists(80), ("sure", "loose", "noisy"))
    assert fit.reached["cross-validated fitted"] > fit.reached["cross-validated best alone"]
    assert not math.isinf(fit.rule.margin) or fit.rule.lead is None


def test_workers_alone_that_tie_go_by_the_preference_given() -> None:
    """Two workers right on the same number of items, each candidate scored at random: no rule can
    know whom to trust, the fit falls back to a worker alone, and the tie goes by the preference
    (calibrate passes the workers' order on all of a deployment's tuning items)."""
    rng = random.Random(14)
    made = []
    for n, item in enumerate(tasks.items("arithmetic", "tuning")[:80]):
        right, wrong = f" {item.reference}", f" {int(float(item.reference)) + 1}"
        proposals = {"first": right if n % 2 else wrong, "second": wrong if n % 2 else right}
        judged = {text: {w: rng.uniform(0.2, 2.0) for w in proposals} for text in (right, wrong)}
        made.append(_one_step(item, proposals, judged))
    workers = ("first", "second")
    plain, preferred = fit_rule(made, workers), fit_rule(made, workers, preference=("second",))
    assert plain.reached["first alone"] == plain.reached["second alone"] and math.isinf(preferred.rule.margin)
    assert (plain.rule.lead, preferred.rule.lead) == (plain.best_alone, preferred.best_alone) == ("first", "second")
