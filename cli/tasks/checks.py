"""How a task family reads an answer out of a model's text and compares it with the accepted
answers: `text` and `number` are the labelled-items rules `first_phrase` and `number`
(calibration/answers.py), GSM8K keeps its own."""

from __future__ import annotations

import enum

from coolfusion.calibration.answers import AnswerRule, first_line, normalise, phrases
from coolfusion.calibration.answers import matches as rule_matches
from coolfusion.calibration.answers import read as rule_read
from coolfusion.cli.gsm8k import extract_answer

__all__ = ["Rule", "first_line", "matches", "normalise", "phrases", "read"]


class Rule(enum.StrEnum):
    """A family's answer rule (cli/tasks/README.md states each in words)."""

    TEXT = "text"  # the first line, or a first phrase of it, normalised, equals one accepted answer, normalised
    NUMBER = "number"  # the first number on the first line equals the answer numerically
    GSM8K = "gsm8k"  # the number after the last `####`, else the last number (cli/gsm8k.py)

    @property
    def answer_rule(self) -> AnswerRule:
        """The labelled-items rule that reads answers exactly as this one does (not GSM8K's)."""
        return {Rule.TEXT: AnswerRule.FIRST_PHRASE, Rule.NUMBER: AnswerRule.NUMBER}[self]


def read(rule: Rule, text: str, answers: tuple[str, ...] = ()) -> str | None:
    """The answer `text` gives under `rule`, in the form `matches` compares; None when it gives none."""
    if rule == Rule.GSM8K:
        return extract_answer(text)
    return rule_read(rule.answer_rule, text, answers)


def matches(rule: Rule, prediction: str | None, answers: tuple[str, ...]) -> bool:
    """Whether a read answer is one of the accepted ones (numbers: within 1e-6)."""
    return rule_matches(AnswerRule.NUMBER if rule == Rule.GSM8K else rule.answer_rule, prediction, answers)
