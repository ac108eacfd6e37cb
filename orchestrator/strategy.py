"""How a fusion chooses segments: score aggregation, worker weights, the repetition guard and
per-worker prompt templates. `PAPER` is docs/design.md section 2 exactly."""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

from coolfusion.calibration import Calibration, nll_per_unit
from coolfusion.orchestrator.domain import CandidateScore, Prompt


class Aggregation(enum.StrEnum):
    PPL_MEAN = "ppl_mean"  # the paper: arithmetic mean of perplexities
    NLL_MEAN = "nll_mean"  # geometric mean of perplexities
    ROBUST = "robust"  # nll_mean without an outlying scorer
    PROPOSER = "proposer"  # nll_mean in which a worker's score of its own proposal counts PROPOSER_WEIGHT times


class RepetitionGuard(enum.StrEnum):
    OFF = "off"
    STOP = "stop"  # end the answer before the repeated text
    STEER = "steer"  # prefer a candidate that does not repeat; STOP when none is left


# A repeat of at least this many characters is a loop: shorter ones ("= 5", "apples") recur in
# correct worked solutions, verbatim repeats of a whole clause do not.
MIN_REPEAT_CHARS = 32
# ROBUST drops a scorer whose mean negative log-likelihood per token is this far (nats) from the
# median of the others: a factor of e in perplexity, far beyond how similar models disagree.
OUTLIER_NATS = 1.0
# PROPOSER counts a worker's score of a candidate it proposed this many times. Its perplexity of
# its own greedy proposal says how sure it is; its perplexity of a peer's proposal mixes how wrong
# that proposal is with how sharply the worker spreads its probability (a chat-tuned model finds
# any wording but its own surprising), so a sure proposer should not be outvoted by a sharp peer.
# 3 was the best of 1.5, 2, 3 and 5 on the first 100 tuning items of each task family; on the next
# 100 it did no better than nll_mean, so it is an option, not the default (README, Results).
PROPOSER_WEIGHT = 3.0
PROMPT_SLOT = "{prompt}"


@dataclass(frozen=True)
class Strategy:
    aggregation: Aggregation = Aggregation.PPL_MEAN
    weights: Mapping[str, float] = field(default_factory=dict)  # worker name -> weight; missing = 1
    repetition_guard: RepetitionGuard = RepetitionGuard.OFF
    prompt_templates: Mapping[str, str] = field(default_factory=dict)  # worker name -> template
    # A fitted selection rule (docs/design.md section 3.7); when set it replaces the aggregation
    # and the weights. Only for the workers and models it was fitted for (calibrations.py checks).
    calibration: Calibration | None = None

    def overridden_by(self, other: StrategyOverrides) -> Strategy:
        """This strategy with every field `other` sets replaced (mappings: per worker). A request
        that names an aggregation leaves any calibration behind; one that names a calibration
        takes its repetition guard unless it names a guard too."""
        calibration = other.calibration or (None if other.aggregation else self.calibration)
        guard = other.repetition_guard or (
            RepetitionGuard(other.calibration.repetition_guard) if other.calibration else self.repetition_guard
        )
        return replace(
            self,
            aggregation=other.aggregation or self.aggregation,
            weights={**self.weights, **other.weights},
            repetition_guard=guard,
            prompt_templates={**self.prompt_templates, **other.prompt_templates},
            calibration=calibration,
        )

    def score(
        self, text: str, ends_with_eos: bool, scores: Mapping[str, CandidateScore], proposed_by: Collection[str]
    ) -> float:
        """A candidate's fused score (lower is better) from every worker's score of it; `proposed_by`
        names the workers whose own candidate it is."""
        if self.calibration is not None:
            rule = self.calibration.rule
            nlls = {
                name: nll_per_unit(rule.unit, s.log_prob_sum, s.scored_tokens, text, ends_with_eos)
                for name, s in scores.items()
            }  # fmt: skip
            return rule.score(nlls, proposed_by)
        return self.fused_score({name: s.perplexity for name, s in scores.items()}, proposed_by)

    def nats(self, score: float) -> float:
        """A fused score in nats per token (per unit, for a calibration), as sampling weighs it:
        the aggregations' scores are perplexities; a calibration's rule scores in nats already."""
        if self.calibration is not None:
            return score
        return math.log(score) if score > 0 else -math.inf

    def rank(self, scores: Sequence[float], proposers: Sequence[Collection[str]]) -> list[int]:
        """Indices best first: the lowest score, ties to the earlier; a calibration with a lead
        puts first what its rule chooses (the lead's own unless beaten by its margin)."""
        order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
        if self.calibration is not None:
            chosen = self.calibration.rule.choose(scores, proposers)
            order = [chosen] + [i for i in order if i != chosen]
        return order

    def fused_score(self, perplexities: Mapping[str, float], proposed_by: Collection[str] = ()) -> float:
        """One candidate's fused score from each worker's perplexity of it; lower is better.
        `proposed_by` names the workers whose own candidate it is (only PROPOSER reads it)."""
        weights = {name: self.weights.get(name, 1.0) for name in perplexities}
        if self.aggregation == Aggregation.PPL_MEAN:
            return _weighted_mean(perplexities, weights)
        nlls = {name: math.log(ppl) for name, ppl in perplexities.items()}
        if self.aggregation == Aggregation.ROBUST:
            nlls = without_outlier(nlls)
        if self.aggregation == Aggregation.PROPOSER:
            weights = {name: w * (PROPOSER_WEIGHT if name in proposed_by else 1.0) for name, w in weights.items()}
        return math.exp(_weighted_mean(nlls, weights))

    def prompt_for(self, worker: str, prompt: Prompt) -> Prompt:
        """What `worker` is asked: the request's prompt, or it put into the worker's template."""
        template = self.prompt_templates.get(worker)
        if template is None:
            return prompt
        text = prompt.text if prompt.text is not None else "\n\n".join(turn.content for turn in prompt.chat)
        return Prompt(text=template.replace(PROMPT_SLOT, text))


@dataclass(frozen=True)
class StrategyOverrides:
    """What a request or a registry sets; None or empty leaves the default."""

    aggregation: Aggregation | None = None
    weights: Mapping[str, float] = field(default_factory=dict)
    repetition_guard: RepetitionGuard | None = None
    prompt_templates: Mapping[str, str] = field(default_factory=dict)
    calibration: Calibration | None = None


PAPER = Strategy()
# The product's default (README "Fusion strategies" and "Results" have the measurements behind it):
# the same answers as the paper's rule until a loop, at lower cost, and no model outvotes the rest
# by being surprised. On the task families' tuning parts no other aggregation beat it beyond noise.
DEFAULT = Strategy(aggregation=Aggregation.NLL_MEAN, repetition_guard=RepetitionGuard.STOP)


def _weighted_mean(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    return sum(weights[name] * value for name, value in values.items()) / sum(weights[name] for name in values)


def without_outlier(nlls: Mapping[str, float]) -> dict[str, float]:
    """The scores without the one farthest from the median of the others, if it is an outlier.
    Needs three scorers: with two, each is as far from the other as the other is from it."""
    if len(nlls) < 3:
        return dict(nlls)

    def distance(name: str) -> float:
        return abs(nlls[name] - statistics.median(v for n, v in nlls.items() if n != name))

    farthest = max(nlls, key=distance)
    if distance(farthest) <= OUTLIER_NATS:
        return dict(nlls)
    return {name: value for name, value in nlls.items() if name != farthest}


def repeated_tail(text: str, min_chars: int = MIN_REPEAT_CHARS) -> int | None:
    """Where the answer started repeating itself, when its last `min_chars` characters already
    occur earlier (overlapping or not): the start of the repeated text, so that cutting there
    keeps one copy of what loops. None when the text does not end in a repeat."""
    tail_start = len(text) - min_chars
    if tail_start <= 0:
        return None
    earlier = text.rfind(text[tail_start:], 0, len(text) - 1)
    if earlier < 0:
        return None
    period = tail_start - earlier
    start = tail_start
    # Walk back while the text still equals itself one period earlier: that is all repetition.
    while start - 1 - period >= 0 and text[start - 1] == text[start - 1 - period]:
        start -= 1
    return start
