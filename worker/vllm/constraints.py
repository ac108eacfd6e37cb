"""A session's constraint on the vLLM engine (docs/design.md section 4.7): what a generating request
carries to vLLM's engine process, how the logits processor there (worker/vllm/logits.py) follows
each constrained request, and when a running request still serves the session's next segment.

The engine process follows each constrained request by itself: the committed answer's text (spelled
in the model's tokens by worker/constraints.py's AnswerGuide, the transformers engine's own), then
the request's own tokens as vLLM generates them. The worker holds no matcher; its session guide
names the constraint. Nothing here needs vLLM.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from coolfusion.constraints import Constraint, ConstraintError, ConstraintKind
from coolfusion.worker.backend import SessionGuide
from coolfusion.worker.constraints import AnswerGuide, ConstraintVocabulary
from coolfusion.worker.errors import InvalidRequest

logger = logging.getLogger(__name__)

# The key of SamplingParams.extra_args under which a request carries its constraint.
EXTRA_ARGS_KEY = "coolfusion_constraint"


class EngineGuide(SessionGuide):
    """A vLLM session's guide: the constraint its requests carry. The place in the language lives
    in vLLM's engine process, one per request (worker/vllm/logits.py)."""

    def __init__(self, constraint: Constraint):
        self.constraint = constraint


@dataclass(frozen=True)
class RequestConstraint:
    """What a generating request's tokens must follow: the session's constraint, after the committed
    answer `answer_text` and then `tokens`, ids that end the request's prompt but belong to a
    segment in progress (a request started again mid-segment, docs/design.md section 4.7)."""

    constraint: Constraint
    answer_text: str
    tokens: tuple[int, ...] = ()

    def extra_args(self) -> dict[str, Any]:
        """The request's SamplingParams.extra_args: plain values, which vLLM serialises."""
        fields = {
            "kind": str(self.constraint.kind),
            "definition": self.constraint.definition,
            "answer_text": self.answer_text,
            "tokens": list(self.tokens),
        }
        return {EXTRA_ARGS_KEY: fields}

    @classmethod
    def of_extra_args(cls, extra_args: Mapping[str, Any] | None) -> RequestConstraint | None:
        """The constraint a request carries, None when it carries none; ValueError when malformed
        (vLLM then refuses the request)."""
        fields = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if fields is None:
            return None
        try:
            kind = ConstraintKind(fields["kind"])
            definition, answer_text, tokens = fields["definition"], fields["answer_text"], fields["tokens"]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] is malformed: {error!r}") from None
        texts = isinstance(definition, str) and isinstance(answer_text, str)
        ids = isinstance(tokens, list) and all(isinstance(token, int) and token >= 0 for token in tokens)
        if not (texts and ids):  # ValueError, not TypeError: what vLLM turns into a refused request
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] holds values of the wrong types")
        return cls(Constraint(kind, definition), answer_text, tuple(tokens))

    def read_text(self, vocabulary: ConstraintVocabulary, generated: Sequence[int] = ()) -> bytes:
        """The answer as the engine's guide reads it once the request generated `generated`."""
        return self.answer_text.encode() + vocabulary.tokenizer.decode_bytes([*self.tokens, *generated])


def serves(
    running: RequestConstraint | None,
    generated: Sequence[int],
    wanted: RequestConstraint | None,
    vocabulary: ConstraintVocabulary | None,
) -> bool:
    """Whether a request started under `running` that has since generated `generated` (tokens the
    next context ends with) holds its tokens to what a segment under `wanted` needs: no constraint
    for both, or the same constraint with the engine's guide at the same answer. The answers are
    compared as the grammar engine reads them, so that a spelling the engine reads otherwise than
    the session's text starts a new request instead of guiding tokens from the wrong place."""
    if running is None or wanted is None:
        return running is None and wanted is None
    if running.constraint != wanted.constraint or vocabulary is None:
        return False
    return running.read_text(vocabulary, generated) == wanted.read_text(vocabulary)


class ConstrainedRequest:
    """One constrained request in vLLM's batch: its guide, reading the request's output tokens (the
    list vLLM appends to) as they arrive."""

    def __init__(self, guide: AnswerGuide | None, output_ids: list[int], eos_only: np.ndarray):
        self._guide = guide  # None once it failed: EOS alone, from then on
        self._output_ids = output_ids
        self._read = 0  # output tokens the guide has taken
        self._eos_only = eos_only

    @classmethod
    def start(
        cls, vocabulary: ConstraintVocabulary, wanted: RequestConstraint, output_ids: list[int], eos_only: np.ndarray
    ) -> ConstrainedRequest:
        """A guide after the committed answer and the prompt's tokens of a segment in progress."""
        try:
            guide = vocabulary.guide(wanted.constraint)
            guide.start_segment(wanted.answer_text)
            for token in wanted.tokens:
                guide.take(token)
        except (ConstraintError, InvalidRequest, RuntimeError):
            logger.exception("a constrained request's answer could not be read; it is held to EOS")
            return cls(None, output_ids, eos_only)
        return cls(guide, output_ids, eos_only)

    def allowed(self) -> np.ndarray:
        """The next token's mask over the logits' rows, once the guide has taken every token the
        request generated. Under async scheduling a token not yet copied back is a placeholder
        (-1); vLLM fills it in before sampling, which is when this runs."""
        if self._guide is None:
            return self._eos_only
        while self._read < len(self._output_ids) and (token := self._output_ids[self._read]) >= 0:
            try:
                self._guide.take(token)
            except RuntimeError:
                logger.exception("a constrained request generated a token its mask did not allow")
                self._guide = None
                return self._eos_only
            self._read += 1
        return self._guide.allowed()
