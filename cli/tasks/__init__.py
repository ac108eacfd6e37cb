"""Task families within the default pair's reach, each split into a tuning and a held-out part (README.md here)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from coolfusion.cli.tasks import arithmetic, facts, opposites
from coolfusion.cli.tasks.checks import Rule, matches, read

TUNING, HELD_OUT = "tuning", "held-out"
SPLITS = (TUNING, HELD_OUT)
# Where a completion ends: the few-shot lines put each answer on a line of its own, and a model
# that goes on talking on the same line ("English. To determine ...", as chat models do) has
# finished its answer at the end of the first sentence. An initial ("F. Scott Fitzgerald") is cut
# too: 10 of the 530 facts accept such a name, each but one also by a surname alone.
STOP = ("\n", ". ")
ANSWER_SLOT = "{answer}"


@dataclass(frozen=True)
class TaskItem:
    """One question: `index` is its position in its family's split (or its GSM8K line number)."""

    family: str
    id: str  # unique within the family, e.g. "capital:France"
    kind: str  # relation or operation; the first N items of a split take the kinds in turn
    split: str
    index: int
    prompt: str | list[dict[str, str]]  # plain text, or chat messages (GSM8K)
    answers: tuple[str, ...]  # accepted answers; the first is the reference shown
    rule: Rule

    @property
    def reference(self) -> str:
        return self.answers[0]

    def read(self, text: str) -> str | None:
        return read(self.rule, text, self.answers)

    def correct(self, prediction: str | None) -> bool:
        return matches(self.rule, prediction, self.answers)


@dataclass(frozen=True)
class Draft:
    """An item before the split: its kind, its subject (unique within the kind), prompt and answers."""

    kind: str
    subject: str
    prompt: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """A family: how its answers are checked, where they end, and how long they may be."""

    name: str
    rule: Rule
    stop: tuple[str, ...]
    max_new_tokens: int
    drafts: Callable[[], list[Draft]]  # in canonical order


def few_shot(sentence: str, shots: tuple[tuple[str, str], ...], subject: str) -> str:
    """The shots as complete lines, then the item's line up to where its answer goes."""
    lines = [sentence.format(subject=s, answer=a) for s, a in shots]
    asked = sentence.split(ANSWER_SLOT)[0].format(subject=subject).rstrip()
    return "\n".join([*lines, asked])


def _fact_drafts() -> list[Draft]:
    return [
        Draft(relation.name, subject, few_shot(relation.sentence, relation.shots, subject), answers)
        for relation in facts.RELATIONS
        for subject, answers in facts.parse_table(relation.table)
        if subject not in {s for s, _ in relation.shots}
    ]


def _arithmetic_drafts() -> list[Draft]:
    return [
        Draft(kind, expression, few_shot(arithmetic.SENTENCE, arithmetic.SHOTS, expression), answers)
        for kind, expression, answers in arithmetic.items()
    ]


def _opposite_drafts() -> list[Draft]:
    return [
        Draft("opposite", word, few_shot(opposites.SENTENCE, opposites.SHOTS, word), answers)
        for word, answers in opposites.items()
    ]


FAMILIES: dict[str, Family] = {
    "facts": Family("facts", Rule.TEXT, STOP, 16, _fact_drafts),
    "arithmetic": Family("arithmetic", Rule.NUMBER, STOP, 8, _arithmetic_drafts),
    "opposites": Family("opposites", Rule.TEXT, STOP, 8, _opposite_drafts),
}


@cache
def items(family: str, split: str) -> tuple[TaskItem, ...]:
    """A family's items in one split, in split order.

    The split was fixed before any tuning: within each kind, the canonical order is shuffled with
    the seed "<family>/<kind>" and the items alternate, tuning first. Each split then takes the
    kinds in turn (round robin, in order of first appearance), so any first N items are balanced."""
    spec = FAMILIES[family]
    by_kind: dict[str, list[Draft]] = {}
    for draft in spec.drafts():
        by_kind.setdefault(draft.kind, []).append(draft)
    parts = []
    for kind, drafts in by_kind.items():
        random.Random(f"{family}/{kind}").shuffle(drafts)
        parts.append(drafts[SPLITS.index(split) :: 2])
    return tuple(
        TaskItem(family, f"{d.kind}:{d.subject}", d.kind, split, index, d.prompt, d.answers, spec.rule)
        for index, d in enumerate(_round_robin(parts))
    )


def _round_robin(parts: list[list[Draft]]) -> list[Draft]:
    longest = max(map(len, parts), default=0)
    return [part[position] for position in range(longest) for part in parts if position < len(part)]
