"""Fusion strategies: aggregations, weights, the repetition guard's detector and choice, templates."""

from __future__ import annotations

import math

import pytest

from coolfusion.orchestrator.domain import ChatTurn, Prompt, StepCandidate
from coolfusion.orchestrator.fusion import FusionLoop, FusionRequest
from coolfusion.orchestrator.sessions import Deadline
from coolfusion.orchestrator.strategy import (
    PAPER,
    Aggregation,
    RepetitionGuard,
    Strategy,
    StrategyOverrides,
    repeated_tail,
    without_outlier,
)


def test_paper_is_the_mean_of_perplexities() -> None:
    assert PAPER.fused_score({"a": 2.0, "b": 40.0}) == 21.0


def test_nll_mean_is_the_geometric_mean_and_tames_the_most_surprised_model() -> None:
    nll = Strategy(aggregation=Aggregation.NLL_MEAN)
    assert nll.fused_score({"a": 2.0, "b": 8.0}) == pytest.approx(4.0)
    # a: X is much worse; b: Y is somewhat worse. The paper follows a's surprise, nll_mean does not.
    x, y = {"a": 60.0, "b": 1.5}, {"a": 3.0, "b": 40.0}
    assert PAPER.fused_score(x) > PAPER.fused_score(y)
    assert nll.fused_score(x) < nll.fused_score(y)


def test_weights_scale_each_workers_say() -> None:
    weighted = Strategy(aggregation=Aggregation.NLL_MEAN, weights={"a": 3.0})
    assert weighted.fused_score({"a": 2.0, "b": 32.0}) == pytest.approx(math.exp((3 * math.log(2) + math.log(32)) / 4))
    assert Strategy(weights={"a": 3.0}).fused_score({"a": 2.0, "b": 6.0}) == pytest.approx(3.0)


def test_proposer_counts_each_workers_score_of_its_own_proposal_three_times() -> None:
    proposer = Strategy(aggregation=Aggregation.PROPOSER, weights={"a": 2.0})
    # (2 * 3 * ln 2 + 1 * ln 32) / (2 * 3 + 1): a proposed it, with weight 2.
    expected = math.exp((6 * math.log(2) + math.log(32)) / 7)
    assert proposer.fused_score({"a": 2.0, "b": 32.0}, ["a"]) == pytest.approx(expected)
    # Proposed by everyone, or by no scorer, it is nll_mean.
    nll = Strategy(aggregation=Aggregation.NLL_MEAN, weights={"a": 2.0})
    assert proposer.fused_score({"a": 2.0, "b": 32.0}, ["a", "b"]) == pytest.approx(
        nll.fused_score({"a": 2.0, "b": 32.0})
    )
    assert proposer.fused_score({"a": 2.0, "b": 32.0}) == pytest.approx(nll.fused_score({"a": 2.0, "b": 32.0}))
    assert PAPER.fused_score({"a": 2.0, "b": 40.0}, ["a"]) == 21.0  # the others ignore who proposed


def test_proposer_lets_a_sure_proposer_win_over_a_sharp_peers_objection() -> None:
    """A measured case (per-token NLL, nats): a sharp model proposes a confident wrong answer and
    objects strongly to its peer's right one, whose proposer is sure of it too."""
    wrong = {"sharp": math.exp(0.62), "broad": math.exp(2.29)}  # proposed by "sharp"
    right = {"sharp": math.exp(3.81), "broad": math.exp(0.07)}  # proposed by "broad"
    nll, proposer = Strategy(aggregation=Aggregation.NLL_MEAN), Strategy(aggregation=Aggregation.PROPOSER)
    assert nll.fused_score(wrong) < nll.fused_score(right)
    assert proposer.fused_score(right, ["broad"]) < proposer.fused_score(wrong, ["sharp"])


def test_robust_drops_one_far_scorer_of_three_and_nothing_of_two() -> None:
    assert without_outlier({"a": 1.0, "b": 1.2, "c": 4.0}) == {"a": 1.0, "b": 1.2}
    assert without_outlier({"a": 1.0, "b": 1.2, "c": 1.9}) == {"a": 1.0, "b": 1.2, "c": 1.9}
    assert without_outlier({"a": 1.0, "b": 9.0}) == {"a": 1.0, "b": 9.0}
    robust = Strategy(aggregation=Aggregation.ROBUST)
    assert robust.fused_score({"a": math.e, "b": math.e, "c": 1000.0}) == pytest.approx(math.e)


@pytest.mark.parametrize(
    ("text", "cut"),
    [
        ("Tom has 5 apples and buys 3 more. " * 3, "Tom has 5 apples and buys 3 more. "),
        ("The answer is 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5", "The answer is 5"),
        ("He has 5 + 3 = 8 apples. Then 8 - 2 = 6 apples are left.\n#### 6", None),
        ("short", None),
    ],
)
def test_repeated_tail_finds_where_a_loop_starts(text: str, cut: str | None) -> None:
    start = repeated_tail(text)
    assert (None if start is None else text[:start]) == cut


def test_overrides_replace_only_what_they_set() -> None:
    base = Strategy(aggregation=Aggregation.NLL_MEAN, weights={"a": 2.0, "b": 3.0})
    merged = base.overridden_by(StrategyOverrides(weights={"b": 1.0}, repetition_guard=RepetitionGuard.STOP))
    assert merged == Strategy(Aggregation.NLL_MEAN, {"a": 2.0, "b": 1.0}, RepetitionGuard.STOP)


def test_prompt_template_turns_a_chat_into_plain_text_for_that_worker_only() -> None:
    strategy = Strategy(prompt_templates={"base": "Q: {prompt}\n\n"})
    chat = Prompt(chat=(ChatTurn("system", "Be brief."), ChatTurn("user", "2+2?")))
    assert strategy.prompt_for("base", chat) == Prompt(text="Q: Be brief.\n\n2+2?\n\n")
    assert strategy.prompt_for("chat", chat) is chat


def _loop(guard: RepetitionGuard, answer: str) -> FusionLoop:
    request = FusionRequest(Prompt(text="p"), 64, (), 16, False, "r", Strategy(repetition_guard=guard))
    loop = FusionLoop([], request, "fused", Deadline(at=0.0, call_timeout_s=1.0))
    loop._answer.text = answer
    return loop


def test_steer_picks_the_best_candidate_that_does_not_repeat() -> None:
    answer = "so the answer is twelve apples, so the answer is twelve"
    repeating = StepCandidate(" apples, so the answer", False, ["a"], fused_score=1.0)
    fresh = StepCandidate(" apples.\n#### 12", False, ["b"], fused_score=5.0)
    assert _loop(RepetitionGuard.STEER, answer)._winner_index([repeating, fresh]) == 1
    assert _loop(RepetitionGuard.STOP, answer)._winner_index([repeating, fresh]) == 0
    assert _loop(RepetitionGuard.OFF, answer)._winner_index([repeating, fresh]) == 0
