"""Answer rules: how the answer a model gave is read out of its text and compared with the accepted
answers of a labelled item (docs/own-traffic.md states each rule in words)."""

from __future__ import annotations

import enum
import json
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

# Articles carry no meaning in a short answer ("the euro" is "euro"); "a" and "an" never are one.
_ARTICLES = frozenset({"the", "a", "an"})
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# Where a phrase may end inside a line: a clause or sentence mark followed by a space (or the line's
# end), an opening bracket, or a dash between spaces. "Paris. It is ..." and "Paris, the city of
# ..." both answer "Paris"; "F. Scott Fitzgerald" is read whole because the answer it names is
# tried at every boundary, shortest first.
_PHRASE_END = re.compile(r"[.,;:!?)\]](?=\s|$)|\s[(\[]|\s[-\u2013\u2014]\s")
_NUMERIC_TOLERANCE = 1e-6


class AnswerRule(enum.StrEnum):
    """How an item's answer is checked; the values are the `rule` field of a labelled-items file."""

    FIRST_PHRASE = "first_phrase"  # the first line's first phrase, normalised, equals an accepted answer
    NUMBER = "number"  # the first number of the first line equals an accepted answer numerically
    CONTAINS = "contains"  # the normalised answer contains a normalised accepted answer as whole words
    REGEX = "regex"  # some accepted answer, a regular expression, matches somewhere in the answer
    JSON_FIELD = "json_field"  # the first JSON object's `field` equals an accepted answer


def normalise(text: str) -> str:
    """Lower case, accents dropped (NFKD), punctuation turned into spaces, articles dropped, spaces
    collapsed: "Brasília." and "brasilia" read the same, "Washington, D.C." reads "washington d c"."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()
    words = re.sub(r"[\W_]+", " ", bare).split()
    return " ".join(word for word in words if word not in _ARTICLES)


def first_line(text: str) -> str:
    """The answer proper: a continuation that runs on past it starts a new line."""
    return text.strip().split("\n", 1)[0]


def phrases(line: str) -> list[str]:
    """The line cut at each place a phrase may end, shortest first, the whole line last; each
    normalised, without repeats or empties."""
    cuts = [m.start() for m in _PHRASE_END.finditer(line)] + [len(line)]
    return list(dict.fromkeys(p for p in (normalise(line[:cut]) for cut in cuts) if p))


def first_number(text: str) -> str | None:
    """The first number of the first line (thousands commas dropped), as written."""
    found = _NUMBER.search(first_line(text).replace(",", ""))
    return found.group() if found else None


def read(rule: AnswerRule, text: str, answers: Sequence[str], field: str | None = None) -> str | None:
    """The answer `text` gives under `rule`, in the form `matches` compares; None when it gives none.

    A model may go on talking after its answer ("Paris. The capital of ..."), so a first phrase is
    the first phrase of the first line that is one of `answers`, else its first phrase: whatever
    follows the answer neither helps nor hurts. `contains` and `regex` read the accepted answer they
    found (None: none), so two texts that find the same one read alike."""
    if rule == AnswerRule.NUMBER:
        return first_number(text)
    if rule == AnswerRule.FIRST_PHRASE:
        candidates = phrases(first_line(text))
        accepted = {normalise(answer) for answer in answers}
        return next((p for p in candidates if p in accepted), candidates[0] if candidates else None)
    if rule == AnswerRule.CONTAINS:
        padded = f" {normalise(text)} "
        return next((n for n in map(normalise, answers) if n and f" {n} " in padded), None)
    if rule == AnswerRule.REGEX:
        return next((found.group() for p in answers if (found := re.search(p, text))), None)
    value = json_field(text, field or "")
    return None if value is None else _as_text(value)


def matches(rule: AnswerRule, prediction: str | None, answers: Sequence[str]) -> bool:
    """Whether a read answer is one of the accepted ones (numbers: within 1e-6)."""
    if prediction is None:
        return False
    if rule in (AnswerRule.CONTAINS, AnswerRule.REGEX):
        return True  # read() found an accepted answer, or returned None
    if rule == AnswerRule.NUMBER:
        return any(abs(float(prediction) - float(answer.replace(",", ""))) <= _NUMERIC_TOLERANCE for answer in answers)
    number = _number(prediction) if rule == AnswerRule.JSON_FIELD else None
    if number is not None and any(number == _number(answer) for answer in answers):
        return True
    return normalise(prediction) in {normalise(answer) for answer in answers}


def json_field(text: str, field: str) -> Any:
    """The value at `field` (keys joined by dots; a list index is a number) of the first JSON object
    in `text`; None when there is none or it lacks the field."""
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            document, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        return _at(document, field.split("."))
    return None


def _at(document: Any, path: list[str]) -> Any:
    for key in path:
        if isinstance(document, dict) and key in document:
            document = document[key]
        elif isinstance(document, list) and key.isdigit() and int(key) < len(document):
            document = document[int(key)]
        else:
            return None
    return document


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
