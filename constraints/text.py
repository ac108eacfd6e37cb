"""Following a constraint through text: whether a text keeps the answer within the language, and
whether the answer is complete. The orchestrator checks every candidate with it; it knows no
model's tokens (each UTF-8 byte is one symbol)."""

from __future__ import annotations

import functools
from typing import ClassVar

import llguidance

from coolfusion.constraints.grammar import Constraint

_EOS = 256  # the byte vocabulary's end of text, after the 256 bytes
# Distinct grammars whose compiled matcher a process keeps to copy; see TextMatcher.of.
_MATCHER_CACHE = 256


class _ByteVocabulary:
    """Every byte is a token, and one more token ends the text: llguidance's TokenizerWrapper
    protocol for a vocabulary in which any text has exactly one spelling."""

    eos_token_id = _EOS
    bos_token_id = None
    tokens: ClassVar[list[bytes]] = [bytes([b]) for b in range(256)] + [b""]
    special_token_ids: ClassVar[list[int]] = [_EOS]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


@functools.cache
def _byte_tokenizer() -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocabulary()))


@functools.lru_cache(maxsize=_MATCHER_CACHE)
def _compiled_matcher(grammar: str) -> llguidance.LLMatcher:
    return llguidance.LLMatcher(_byte_tokenizer(), grammar, log_level=0)


class TextMatcher:
    """The answer so far, as the constraint sees it: `advance` appends text, `allows` tries one."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    @classmethod
    def of(cls, constraint: Constraint) -> TextMatcher:
        """A matcher at the empty answer. The compiled matcher is kept per grammar and copied, so a
        second request with the same constraint compiles nothing."""
        return cls(_compiled_matcher(constraint.grammar).deep_copy())

    def allows(self, text: str, ends: bool = False) -> str | None:
        """None when appending `text` (then ending the answer, if `ends`) keeps the answer within
        the language; else why not. The matcher is left as it was."""
        trial = self._matcher.deep_copy()
        if not trial.consume_tokens(list(text.encode())):
            return f"leaves the constraint's language ({_first_line(trial.get_error())})"
        if ends and not trial.is_accepting():
            return "ends where the constraint's language cannot end"
        return None

    def after(self, text: str) -> TextMatcher:
        """A matcher for the answer with `text` appended (checked with `allows`); this one stays."""
        moved = TextMatcher(self._matcher.deep_copy())
        moved.advance(text)
        return moved

    def advance(self, text: str) -> None:
        """Appends text the caller checked with `allows`."""
        if not self._matcher.consume_tokens(list(text.encode())):
            raise ValueError(f"text outside the constraint's language: {_first_line(self._matcher.get_error())}")

    @property
    def complete(self) -> bool:
        """The answer is in the language and nothing can follow it: every model could only end it."""
        return self._matcher.is_accepting() and self._matcher.is_stopped()


def _first_line(error: str) -> str:
    return error.strip().splitlines()[0] if error.strip() else "no detail"
