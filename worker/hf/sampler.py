"""The next token of a segment: the argmax, or a draw from the call's own generator after the
temperature, top-k and top-p filters (docs/design.md section 10.1)."""

from __future__ import annotations

import torch

from coolfusion.worker.backend import Sampling

# Seeds are unsigned 64-bit in the protocol; torch's generators take them below 2**63.
_SEED_SPACE = 2**63


class TokenChooser:
    """Chooses one token per call from logits, greedily or by drawing. Each chooser has its own
    generator, seeded once for its call: the draws depend on the call's seed and its logits only,
    never on shared state or on which other sessions share a pass."""

    def __init__(self, sampling: Sampling | None):
        self._sampling = sampling if sampling is not None and sampling.temperature > 0 else None
        self._generator: torch.Generator | None = None
        if self._sampling is not None:
            self._generator = torch.Generator().manual_seed(self._sampling.seed % _SEED_SPACE)

    def __call__(self, logits: torch.Tensor) -> int:
        """`logits` over the vocabulary (disallowed tokens at -inf); the chosen token's id."""
        if self._sampling is None:
            return int(torch.argmax(logits))
        probabilities = filtered_probabilities(logits.float().cpu(), self._sampling)
        return int(torch.multinomial(probabilities, 1, generator=self._generator))


def filtered_probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution a token is drawn from: softmax(logits / temperature) restricted to the
    top_k most likely tokens, then to the smallest set whose probability reaches top_p; renormalised."""
    scaled = logits / sampling.temperature  # (vocab,)
    if 0 < sampling.top_k < scaled.numel():
        kth = torch.topk(scaled, sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -torch.inf)
    probabilities = torch.softmax(scaled, dim=-1)
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(probabilities, descending=True)
        before = torch.cumsum(ordered, dim=-1) - ordered  # the mass of the more likely tokens
        probabilities[order[before >= sampling.top_p]] = 0.0  # the most likely token always stays
        probabilities = probabilities / probabilities.sum()
    return probabilities
