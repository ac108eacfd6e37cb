"""A selection rule fitted on labelled data: each worker's scores put on one scale, weighted, a
prior for the candidates each worker proposed, and optionally a lead worker whose candidate stands
unless the others' evidence beats it by a margin (docs/design.md section 3.7)."""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass


class Unit(enum.StrEnum):
    """What a worker's negative log-likelihood of a candidate is divided by."""

    TOKEN = "token"  # its own tokens of the candidate: the paper's mean per token
    CHARACTER = "character"  # the candidate's characters, the same for every worker (an EOS counts as one)


@dataclass(frozen=True)
class WorkerFit:
    """What one worker's score counts for under a fitted rule."""

    # The worker's negative log-likelihood per character is divided by this: its spread on the
    # tuning data, a temperature that puts sharp and flat models on one scale.
    scale: float = 1.0
    # Its say in the fused score; 0 lets it propose without judging.
    weight: float = 1.0
    # Taken off the fused score of every candidate it proposed, in scaled units: how far a
    # worker's own choice is trusted beyond what the scores say.
    prior: float = 0.0


@dataclass(frozen=True)
class SelectionRule:
    """Scores candidates by each worker's NLL per `unit`, scaled and weighted, less the priors of
    their proposers, and picks the lowest, or, with a lead, the lead's own candidate unless another
    scores lower by more than `margin`. With an infinite margin the rule is the lead worker alone,
    so a fit that considers it can never do worse than the best worker on its data."""

    workers: Mapping[str, WorkerFit]
    lead: str | None = None
    margin: float = math.inf  # scaled units; read only with a lead
    unit: Unit = Unit.CHARACTER

    def score(self, nll_per_unit: Mapping[str, float], proposed_by: Collection[str]) -> float:
        """A candidate's fused score (lower wins) from each judging worker's NLL per unit."""
        fits = {name: self.workers[name] for name in nll_per_unit if name in self.workers}
        total = sum(fit.weight for fit in fits.values())
        judged = 0.0
        if total > 0:
            judged = sum(fit.weight * nll_per_unit[name] / fit.scale for name, fit in fits.items() if fit.weight)
            judged /= total
        return judged - sum(self.workers[name].prior for name in proposed_by if name in self.workers)

    def choose(self, scores: Sequence[float], proposers: Sequence[Collection[str]]) -> int:
        """The winner's index: the lowest score (ties to the earliest), unless the lead's own
        candidate is within `margin` of it."""
        best = min(range(len(scores)), key=lambda i: (scores[i], i))
        own = next((i for i, by in enumerate(proposers) if self.lead in by), None)
        if own is None or scores[best] < scores[own] - self.margin:
            return best
        return own


def nll_per_unit(unit: Unit, log_prob_sum: float, scored_tokens: int, text: str, ends_with_eos: bool) -> float:
    """A score's negative log-likelihood per token of the worker's, or per character of the
    candidate (its EOS counts as one); infinite when the worker scored nothing, so that such a
    candidate is never preferred."""
    count = scored_tokens if unit == Unit.TOKEN else len(text) + (1 if ends_with_eos else 0)
    if scored_tokens == 0 or count == 0:
        return math.inf
    return -log_prob_sum / count
