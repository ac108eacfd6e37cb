"""How an answer is read out of a model's text and compared with the accepted answers, per rule."""

from __future__ import annotations

import enum
import re
import unicodedata

from coolfusion.cli.gsm8k import extract_answer

# Articles carry no meaning in a short answer ("the euro" is "euro"); "a" and "an" never are one.
_ARTICLES = frozenset({"the", "a", "an"})
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# Where a phrase may end inside a line: a clause or sentence mark followed by a space (or the line's
# end), an opening bracket, or a dash between spaces. "Paris. It is ..." and "Paris, the city of
# ..." both answer "Paris"; "F. Scott Fitzgerald" is read whole because the answer it names is
# tried at every boundary, shortest first.
_PHRASE_END = re.compile(r"[.,;:!?)\]](?=\s|$)|\s[(\[]|\s[-\u2013\u2014]\s")
_NUMERIC_TOLERANCE = 1e-6


class Rule(enum.StrEnum):
    """A family's answer rule (cli/tasks/README.md states each in words)."""

    TEXT = "text"  # the first line, or a first phrase of it, normalised, equals one accepted answer, normalised
    NUMBER = "number"  # the first number on the first line equals the answer numerically
    GSM8K = "gsm8k"  # the number after the last `####`, else the last number (cli/gsm8k.py)


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


def read(rule: Rule, text: str, answers: tuple[str, ...] = ()) -> str | None:
    """The answer `text` gives under `rule`, in the form `matches` compares; None when it gives none.

    A model may go on talking after its answer, on the same line ("Paris. The capital of ..."), so
    a text answer is the first phrase of the first line that is one of `answers`, else its first
    phrase: whatever follows the answer neither helps nor hurts."""
    if rule == Rule.GSM8K:
        return extract_answer(text)
    line = first_line(text)
    if rule == Rule.NUMBER:
        found = _NUMBER.search(line.replace(",", ""))
        return found.group() if found else None
    candidates = phrases(line)
    accepted = {normalise(answer) for answer in answers}
    return next((p for p in candidates if p in accepted), candidates[0] if candidates else None)


def matches(rule: Rule, prediction: str | None, answers: tuple[str, ...]) -> bool:
    """Whether a read answer is one of the accepted ones (numbers: within 1e-6)."""
    if prediction is None:
        return False
    if rule == Rule.TEXT:
        return prediction in {normalise(answer) for answer in answers}
    return any(abs(float(prediction) - float(answer)) <= _NUMERIC_TOLERANCE for answer in answers)
