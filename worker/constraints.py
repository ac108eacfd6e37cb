"""How a worker holds its answers to a constraint (docs/design.md section 9.2), for every engine:
the model's vocabulary as the grammar engine reads it, and each session's place in the language.

A session's committed answer holds other models' segments, so its place in the language follows
the answer's *text*, not this model's tokens: the committed text is spelled in this model's tokens
(any spelling will do, since the grammar engine reads bytes) and the segment's own tokens follow.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np

from coolfusion.constraints import Constraint, ConstraintKind
from coolfusion.worker.backend import SessionGuide
from coolfusion.worker.errors import InvalidRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Every kind of constraint the grammar engine compiles; a worker on either engine enforces them all.
ENFORCED_KINDS = tuple(ConstraintKind)
# Distinct grammars a worker keeps compiled; each session's guide is a copy of its grammar's.
_COMPILED_GRAMMARS = 256


class UnreadableVocabulary(Exception):
    """llguidance cannot read this model's tokenizer: the worker serves it without constraints."""


def load_vocabulary(tokenizer: PreTrainedTokenizerBase, logits_width: int, eos_ids: Collection[int]):
    """The model's ConstraintVocabulary, or None (and a warning) when the grammar engine cannot read
    its tokenizer: the worker then enforces no constraint and says so in GetInfo."""
    try:
        return ConstraintVocabulary(tokenizer, logits_width, eos_ids)
    except UnreadableVocabulary as error:
        logger.warning("this worker will enforce no constraints: %s", error)
        return None


class ConstraintVocabulary:
    """This model's tokens as llguidance reads them, and the grammars compiled against them.

    Building it reads the whole vocabulary (about 10 s for Gemma-3's 262k tokens on two cores,
    holding the interpreter throughout), so a worker builds it once, while starting."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, logits_width: int, eos_ids: Collection[int]):
        from transformers import PreTrainedTokenizerFast  # heavy; a worker has imported it already

        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise UnreadableVocabulary(f"constraints need a fast tokenizer, not a {type(tokenizer).__name__}")
        started = time.perf_counter()
        # The mask covers every row of the logits: ids past the tokenizer's are never allowed.
        self.width = max(logits_width, len(tokenizer))
        self.logits_width = logits_width
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.width, eos_token=sorted(eos_ids))
        except ValueError as error:  # a tokenizer whose decoding llguidance does not know
            raise UnreadableVocabulary(str(error)) from None
        self.compiles = 0  # grammars compiled so far (a metric: a repeated schema compiles nothing)
        self._compiled = functools.lru_cache(maxsize=_COMPILED_GRAMMARS)(self._compile)
        logger.info("constraint vocabulary of %d tokens built in %.1f s", self.width, time.perf_counter() - started)

    def guide(self, constraint: Constraint) -> AnswerGuide:
        """A guide at the empty answer, copied from the grammar compiled for `constraint`."""
        return AnswerGuide(self, self._compiled(constraint.grammar).deep_copy())

    def spell(self, text: str) -> list[int]:
        """`text` in this model's tokens; InvalidRequest when the vocabulary cannot spell it."""
        tokens = self.tokenizer.greedy_tokenize(text)
        if self.tokenizer.decode_bytes(tokens) != text.encode():
            raise InvalidRequest("the answer holds characters this model's vocabulary cannot spell")
        return tokens

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        self.compiles += 1
        return llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)


class AnswerGuide(SessionGuide):
    """One session's place in its constraint's language, used on the model thread only: it follows
    the committed answer lazily (`follow`), then takes one segment's tokens and gives them back.

    A call that was cancelled may leave its segment's tokens taken; the next segment gives them
    back first, so the guide is always at the committed answer when a segment starts."""

    def __init__(self, vocabulary: ConstraintVocabulary, matcher: llguidance.LLMatcher):
        self._vocabulary = vocabulary
        self._matcher = matcher
        self._answer = ""  # the committed answer the matcher has read
        self._answer_tokens = 0
        self._segment_tokens = 0
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, vocabulary.width)

    def start_segment(self, answer: str) -> None:
        """Gives back any segment's tokens, then reads the committed answer up to `answer`."""
        self._matcher.rollback(self._segment_tokens)
        self._segment_tokens = 0
        if not answer.startswith(self._answer):  # a session's answer only grows; this is a re-open
            self._matcher.rollback(self._answer_tokens)
            self._answer, self._answer_tokens = "", 0
        tokens = self._vocabulary.spell(answer[len(self._answer) :])
        taken = self._matcher.try_consume_tokens(tokens)
        if taken < len(tokens):
            self._matcher.rollback(taken)
            raise InvalidRequest("the answer leaves the constraint's language")
        self._answer, self._answer_tokens = answer, self._answer_tokens + taken

    def allowed(self) -> np.ndarray:
        """Which next tokens keep the answer within the language, as booleans over the logits'
        rows; EOS ids are allowed only where the language may end."""
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._bitmask)
        bits = np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")
        return bits[: self._vocabulary.logits_width].astype(bool)

    def take(self, token: int) -> None:
        """Reads one token of the segment (one that `allowed` allowed)."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"token {token} was not allowed: {self._matcher.get_error()}")
        self._segment_tokens += 1

    def end_segment(self) -> None:
        """Gives back the segment's tokens: the guide is at the committed answer again."""
        self._matcher.rollback(self._segment_tokens)
        self._segment_tokens = 0
