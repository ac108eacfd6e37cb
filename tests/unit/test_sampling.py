"""Sampling draws from filtered distributions, from seeds derived where each draw happens, so that
the same seed gives the same draws; temperature 0 is the argmax."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from coolfusion.orchestrator.sampling import SamplingPlan, Selection
from coolfusion.orchestrator.servicer import InvalidFusionRequest, choices, parse_request
from coolfusion.orchestrator.settings import RequestLimits
from coolfusion.orchestrator.strategy import DEFAULT
from coolfusion.v1 import orchestrator_pb2 as opb
from coolfusion.v1 import worker_pb2 as wpb
from coolfusion.worker.backend import Sampling
from coolfusion.worker.hf.sampler import TokenChooser, filtered_probabilities

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -torch.inf])


def test_temperature_scales_the_softmax_and_a_masked_token_is_never_drawn():
    probabilities = filtered_probabilities(LOGITS, Sampling(temperature=0.5))
    assert torch.allclose(probabilities, torch.softmax(LOGITS / 0.5, -1))
    assert probabilities[-1] == 0


def test_top_k_keeps_the_k_most_likely_tokens():
    probabilities = filtered_probabilities(LOGITS, Sampling(temperature=1.0, top_k=2))
    assert (probabilities[2:] == 0).all()
    assert torch.allclose(probabilities[:2], torch.softmax(LOGITS[:2], -1))


def test_top_p_keeps_the_fewest_tokens_that_reach_it_and_always_the_best():
    full = torch.softmax(LOGITS, -1)
    probabilities = filtered_probabilities(LOGITS, Sampling(temperature=1.0, top_p=float(full[0] + full[1]) - 1e-6))
    assert (probabilities[2:] == 0).all() and math.isclose(float(probabilities.sum()), 1.0, rel_tol=1e-6)
    only_best = filtered_probabilities(LOGITS, Sampling(temperature=1.0, top_p=1e-9))
    assert only_best[0] == 1


def test_a_seeded_chooser_draws_the_same_tokens_and_another_seed_others():
    logits = torch.zeros(50)
    draws = [[TokenChooser(Sampling(1.0, seed=seed))(logits) for _ in range(1)] for seed in (7, 7, 8)]
    sequence = TokenChooser(Sampling(1.0, seed=7))
    again = TokenChooser(Sampling(1.0, seed=7))
    assert [sequence(logits) for _ in range(20)] == [again(logits) for _ in range(20)]
    assert draws[0] == draws[1]
    assert len({TokenChooser(Sampling(1.0, seed=s))(logits) for s in range(40)}) > 10


def test_temperature_zero_or_no_sampling_is_the_argmax():
    assert TokenChooser(None)(LOGITS) == 0
    assert TokenChooser(Sampling(0.0, seed=3))(LOGITS) == 0


def test_call_seeds_depend_on_the_request_seed_and_on_where_the_draw_is():
    plan = SamplingPlan(0.7, seed=42)
    seed = plan.call_seed("fused", 0, 3, "gemma3")
    assert seed == SamplingPlan(0.7, seed=42).call_seed("fused", 0, 3, "gemma3")  # any process, any time
    others = {
        SamplingPlan(0.7, seed=43).call_seed("fused", 0, 3, "gemma3"),
        plan.call_seed("solo", 0, 3, "gemma3"),
        plan.call_seed("fused", 1, 3, "gemma3"),
        plan.call_seed("fused", 0, 4, "gemma3"),
        plan.call_seed("fused", 0, 3, "smollm2"),
    }
    assert seed not in others and len(others) == 5 and 0 <= seed < 2**64


def test_a_drawn_winner_follows_exp_of_minus_the_score_over_the_temperature():
    plan = SamplingPlan(1.0, selection=Selection.SAMPLE)
    scores = [0.0, math.log(3), math.inf]  # weights 1, 1/3, 0
    drawn = Counter(plan.draw_winner(scores, seed) for seed in range(4000))
    assert drawn[2] == 0 and 0.70 < drawn[0] / 4000 < 0.80  # 3/4, within a few standard errors


def parse(**sampling) -> SamplingPlan | None:
    parameters = opb.FusionParameters(prompt=wpb.Prompt(text="x"), sampling=opb.Sampling(**sampling))
    return parse_request(parameters, RequestLimits(), "r", DEFAULT, set()).sampling


def test_a_request_samples_only_above_temperature_zero_and_reports_a_seed_it_drew():
    assert parse() is None and parse(temperature=0.0, seed=5) is None
    plan = parse(temperature=0.8, top_p=0.9, top_k=40, seed=5, selection=opb.SELECTION_SAMPLE)
    assert plan == SamplingPlan(0.8, 0.9, 40, 5, Selection.SAMPLE)
    drawn = parse(temperature=0.8)
    assert drawn.top_p == 1.0 and drawn.selection == Selection.BEST and 0 <= drawn.seed < 2**63


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 1, "top_p": 1.5}, "top_p"),
    ],
)
def test_out_of_range_sampling_is_refused_naming_the_field(sampling, field):
    with pytest.raises(InvalidFusionRequest, match=f"sampling.{field}"):
        parse(**sampling)


def test_n_is_one_to_the_cap():
    limits = RequestLimits(max_choices=4)
    assert choices(opb.FusionParameters(), limits) == 1
    assert choices(opb.FusionParameters(n=4), limits) == 4
    with pytest.raises(InvalidFusionRequest, match=r"n is 5; it must be in \[1, 4\]"):
        choices(opb.FusionParameters(n=5), limits)
