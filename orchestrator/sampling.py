"""Sampled fusion (docs/design.md chapter 10): how each worker draws its proposals, reproducibly, and
how a step's winner is chosen among them.

Every random draw comes from a seed derived from the request's seed and where the draw happens
(the answer, the step, the worker), never from shared state: the same request with the same seed
and workers gives the same answers whatever else the workers serve at the time, in any process,
after any restart.
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


class Selection(enum.StrEnum):
    """How a step's winner is chosen among sampled candidates (proto Selection)."""

    BEST = "best"  # the best joint score, as in greedy fusion
    SAMPLE = "sample"  # drawn, each candidate with probability proportional to exp(-score / temperature)


@dataclass(frozen=True)
class SamplingPlan:
    """A request's sampling: the proposals' temperature (> 0), top_p, top_k and the request seed."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    selection: Selection = Selection.BEST

    def call_seed(self, purpose: str, choice: int, step: int, worker: str) -> int:
        """The seed of one draw: which loop (`purpose`, `choice`), which step, which worker (or
        "select" for the step's choice of winner). 64 bits of a keyed hash of all of them."""
        where = f"{purpose}/{choice}/{step}/{worker}".encode()
        digest = hashlib.blake2b(where, digest_size=8, key=self.seed.to_bytes(8, "big")).digest()
        return int.from_bytes(digest, "big")

    def draw_winner(self, scores: Sequence[float], seed: int) -> int:
        """Index of a candidate drawn with probability proportional to exp(-score / temperature);
        `scores` are joint scores per token in nats (lower is better)."""
        best = min(scores)
        weights = [math.exp(-(s - best) / self.temperature) if math.isfinite(s) else 0.0 for s in scores]
        return random.Random(seed).choices(range(len(scores)), weights=weights)[0]


@dataclass(frozen=True)
class Draw:
    """One worker call's sampling: the request's plan and the call's own seed."""

    plan: SamplingPlan
    seed: int


def draw_request_seed() -> int:
    """A seed for a request that gave none (reported back, so the answer can be replayed)."""
    return random.SystemRandom().getrandbits(63)
