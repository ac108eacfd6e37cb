"""Seeded arithmetic word problems (one and two steps, all four operations) as a GSM8K-format eval set."""

from __future__ import annotations

import json
import operator
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from coolfusion.cli.prompts import EXAMPLES

# The seed `coolfusion problems` uses unless told otherwise, so that sets quoted without a seed match.
DEFAULT_SEED = 7
# Every operand, intermediate and answer lies in [2, 999]: the set measures small models' reasoning,
# not their handling of big numbers; from 2 up, no "1 stickers" (and no "divide by 1") reaches the text.
SMALLEST, LARGEST = 2, 999

# Operation name -> (its symbol in worked solutions, the exact integer operation).
OPERATIONS: dict[str, tuple[str, Callable[[int, int], int]]] = {
    "add": ("+", operator.add),
    "sub": ("-", operator.sub),
    "mul": ("*", operator.mul),
    "div": ("/", operator.floordiv),  # exact: every division is drawn or checked to have no remainder
}
# (name, subject pronoun, possessive pronoun); "Nora" is left out, as a worked example's name.
NAMES = (
    ("Maya", "she", "her"), ("Omar", "he", "his"), ("Lena", "she", "her"), ("Tariq", "he", "his"),
    ("Priya", "she", "her"), ("Jonas", "he", "his"), ("Amara", "she", "her"), ("Diego", "he", "his"),
    ("Yuki", "she", "her"), ("Samuel", "he", "his"),
)  # fmt: skip
# Plural nouns that read well after "red", "packs of" and "a jar of".
THINGS = ("stickers", "marbles", "beads", "pencils", "balloons", "buttons", "crayons", "stamps")

# Operations (applied left to right: (a op1 b) op2 c) -> phrasings, each a (question, reasoning)
# pair of format strings over {name} {subj} {Subj} {poss} {things} {a} {b} {c} {r1} {answer}.
# Every reasoning spells out each step as "x op y = z", like the worked examples in prompts.py.
_TEMPLATES: dict[tuple[str, ...], tuple[tuple[str, str], ...]] = {
    ("add",): (
        (
            "{name} has {a} {things}. {Subj} buys {b} more. How many {things} does {name} have now?",
            "{name} now has {a} + {b} = {answer} {things}.",
        ),
        (
            (
                "A library lends out {a} books on Monday and {b} books on Tuesday. "
                "How many books does it lend out on the two days together?"
            ),
            "It lends out {a} + {b} = {answer} books.",
        ),
        (
            (
                "{name} walks {a} minutes to the park and then {b} minutes to the shop. "
                "How many minutes does {subj} walk in all?"
            ),
            "{Subj} walks {a} + {b} = {answer} minutes.",
        ),
    ),
    ("sub",): (
        (
            "{name} has {a} {things} and gives away {b} of them. How many {things} does {subj} have left?",
            "{Subj} has {a} - {b} = {answer} {things} left.",
        ),
        (
            "A jar holds {a} {things}. {name} takes out {b}. How many {things} are still in the jar?",
            "The jar still holds {a} - {b} = {answer} {things}.",
        ),
        (
            "{name} has {a} dollars and spends {b} dollars on a book. How many dollars does {subj} have left?",
            "{Subj} has {a} - {b} = {answer} dollars left.",
        ),
    ),
    ("mul",): (
        (
            "{name} buys {a} packs of {things}. Each pack has {b} {things}. How many {things} does {subj} buy?",
            "{Subj} buys {a} * {b} = {answer} {things}.",
        ),
        (
            "{name} buys {a} bus tickets at {b} dollars each. How many dollars does {subj} pay?",
            "{Subj} pays {a} * {b} = {answer} dollars.",
        ),
        (
            "{name} reads {b} pages every day. How many pages does {subj} read in {a} days?",
            "In {a} days {subj} reads {a} * {b} = {answer} pages.",
        ),
    ),
    ("div",): (
        (
            "{name} shares {a} {things} equally among {b} friends. How many {things} does each friend get?",
            "Each friend gets {a} / {b} = {answer} {things}.",
        ),
        (
            "{name} packs {a} {things} into boxes of {b}. How many boxes does {subj} fill?",
            "{Subj} fills {a} / {b} = {answer} boxes.",
        ),
        (
            "A rope {a} metres long is cut into pieces {b} metres long. How many pieces are there?",
            "There are {a} / {b} = {answer} pieces.",
        ),
    ),
    ("mul", "add"): (
        (
            (
                "{name} buys {a} packs of {things} with {b} {things} in each pack. {Subj} already had {c} {things}. "
                "How many {things} does {subj} have now?"
            ),
            "{Subj} buys {a} * {b} = {r1} {things}. Now {subj} has {r1} + {c} = {answer} {things}.",
        ),
        (
            "A cinema has {a} rows of {b} seats and {c} extra seats at the back. How many seats does it have?",
            "The rows hold {a} * {b} = {r1} seats. With the extra seats there are {r1} + {c} = {answer} seats.",
        ),
    ),
    ("mul", "sub"): (
        (
            "A baker makes {a} trays of {b} muffins and sells {c} of them. How many muffins are left?",
            "The baker makes {a} * {b} = {r1} muffins. After selling {c}, {r1} - {c} = {answer} muffins are left.",
        ),
        (
            (
                "{name} works {a} hours and earns {b} dollars an hour. {Subj} then spends {c} dollars on lunch. "
                "How many dollars does {subj} have left?"
            ),
            "{Subj} earns {a} * {b} = {r1} dollars. After lunch {subj} has {r1} - {c} = {answer} dollars left.",
        ),
    ),
    ("add", "sub"): (
        (
            (
                "{name} has {a} {things}. {Subj} finds {b} more and then loses {c}. "
                "How many {things} does {subj} have now?"
            ),
            (
                "After finding more, {subj} has {a} + {b} = {r1} {things}. "
                "After losing {c}, {subj} has {r1} - {c} = {answer} {things}."
            ),
        ),
        (
            (
                "A bus leaves with {a} passengers. At the first stop {b} people get on and {c} get off. "
                "How many passengers are on the bus now?"
            ),
            (
                "After {b} get on there are {a} + {b} = {r1} passengers. "
                "After {c} get off there are {r1} - {c} = {answer} passengers."
            ),
        ),
    ),
    ("add", "mul"): (
        (
            "Each gift bag holds {a} red {things} and {b} blue {things}. How many {things} are in {c} gift bags?",
            "One bag holds {a} + {b} = {r1} {things}. So {c} bags hold {r1} * {c} = {answer} {things}.",
        ),
        (
            (
                "{name} swims {a} laps in the morning and {b} laps in the evening. "
                "How many laps does {subj} swim in {c} days?"
            ),
            "Each day {subj} swims {a} + {b} = {r1} laps. In {c} days {subj} swims {r1} * {c} = {answer} laps.",
        ),
    ),
    ("sub", "mul"): (
        (
            (
                "A concert ticket costs {a} dollars, and students get {b} dollars off. "
                "How many dollars do {c} student tickets cost?"
            ),
            "A student ticket costs {a} - {b} = {r1} dollars. So {c} tickets cost {r1} * {c} = {answer} dollars.",
        ),
        (
            "A box holds {a} {things}, but {b} of them are damaged. How many undamaged {things} are in {c} such boxes?",
            "Each box has {a} - {b} = {r1} undamaged {things}. So {c} boxes have {r1} * {c} = {answer} of them.",
        ),
    ),
    ("add", "div"): (
        (
            (
                "{name} has {a} {things} and {poss} brother has {b}. They put them together and share them equally "
                "among {c} friends. How many {things} does each friend get?"
            ),
            "Together they have {a} + {b} = {r1} {things}. Each friend gets {r1} / {c} = {answer} {things}.",
        ),
        (
            (
                "A class collects {a} cans on Monday and {b} cans on Tuesday, and packs them into boxes of {c}. "
                "How many boxes do they fill?"
            ),
            "They collect {a} + {b} = {r1} cans, which fill {r1} / {c} = {answer} boxes.",
        ),
    ),
    ("sub", "div"): (
        (
            (
                "{name} bakes {a} cookies and eats {b} of them. {Subj} shares the rest equally among {c} friends. "
                "How many cookies does each friend get?"
            ),
            "After eating {b}, {subj} has {a} - {b} = {r1} cookies. Each friend gets {r1} / {c} = {answer} cookies.",
        ),
        (
            (
                "A farmer picks {a} apples and throws away {b} bruised ones. The rest go into bags of {c}. "
                "How many bags does the farmer fill?"
            ),
            "The farmer keeps {a} - {b} = {r1} apples, which fill {r1} / {c} = {answer} bags.",
        ),
    ),
    ("mul", "div"): (
        (
            (
                "A teacher has {a} packs of {b} {things} and hands them out equally to {c} students. "
                "How many {things} does each student get?"
            ),
            "The teacher has {a} * {b} = {r1} {things}. Each student gets {r1} / {c} = {answer} {things}.",
        ),
        (
            (
                "A farm collects {a} eggs a day for {b} days and packs them into cartons of {c}. "
                "How many cartons does it fill?"
            ),
            "The farm collects {a} * {b} = {r1} eggs, which fill {r1} / {c} = {answer} cartons.",
        ),
    ),
    ("div", "mul"): (
        (
            "At a shop, {b} notebooks cost {a} dollars. How many dollars do {c} notebooks cost?",
            "One notebook costs {a} / {b} = {r1} dollars. So {c} notebooks cost {r1} * {c} = {answer} dollars.",
        ),
        (
            "A car travels {a} kilometres on {b} litres of fuel. How many kilometres does it travel on {c} litres?",
            "It travels {a} / {b} = {r1} kilometres per litre, so {r1} * {c} = {answer} kilometres on {c} litres.",
        ),
    ),
}
# Ranges the operands are drawn from: both operands of the first step (division aside), then the
# right operand of each later step; values that leave [SMALLEST, LARGEST] are drawn again.
_FIRST_RANGES = {"add": ((5, 60), (2, 40)), "sub": ((12, 90), (2, 40)), "mul": ((2, 12), (2, 12))}
_LATER_RANGES = {"add": (2, 40), "sub": (2, 40), "mul": (2, 9), "div": (2, 12)}
_DIVISORS, _QUOTIENTS = (2, 12), (2, 15)
_EQUATION = re.compile(r"\d+ [-+*/] \d+ = \d+")


def kind_name(ops: tuple[str, ...]) -> str:
    """How results are broken down: "one-step:add", "two-step:mul,sub"."""
    steps = {1: "one", 2: "two"}[len(ops)]
    return f"{steps}-step:{','.join(ops)}"


# In cycling order: each operation alone, then pairs with every operation in both positions.
KINDS = tuple(kind_name(ops) for ops in _TEMPLATES)


@dataclass(frozen=True)
class Problem:
    """One word problem: its text, a worked solution ending in `#### N`, and the arithmetic behind it."""

    question: str
    solution: str
    ops: tuple[str, ...]  # applied left to right: ((a op1 b) op2 c)
    operands: tuple[int, ...]  # (a, b) or (a, b, c)
    answer: int

    @property
    def kind(self) -> str:
        return kind_name(self.ops)

    def equations(self) -> list[str]:
        """Each step as the solution writes it: "7 * 8 = 56"."""
        results = step_results(self.ops, self.operands)
        lefts = (self.operands[0], *results)
        return [
            f"{left} {OPERATIONS[op][0]} {right} = {result}"
            for left, op, right, result in zip(lefts, self.ops, self.operands[1:], results)
        ]


def step_results(ops: tuple[str, ...], operands: tuple[int, ...]) -> list[int]:
    """The value after each step of ((a op1 b) op2 c); the last is the answer."""
    values = [operands[0]]
    for op, right in zip(ops, operands[1:]):
        values.append(OPERATIONS[op][1](values[-1], right))
    return values[1:]


def generate(seed: int, count: int) -> list[Problem]:
    """`count` distinct problems, the same for the same seed; kinds take turns, so any prefix is balanced."""
    rng = random.Random(seed)  # never the global RNG: a caller's own draws must not change the set
    order = tuple(_TEMPLATES)
    problems: list[Problem] = []
    questions: set[str] = set()
    while len(problems) < count:
        problem = _draw_problem(order[len(problems) % len(order)], rng)
        if problem.question not in questions and not repeats_example(problem):
            problems.append(problem)
            questions.add(problem.question)
    return problems


def repeats_example(problem: Problem) -> bool:
    """Whether the problem does the very arithmetic of a worked example in the prompt, whose answer it shows."""
    return any(set(problem.equations()) == set(_EQUATION.findall(solution)) for _, solution in EXAMPLES)


def _draw_problem(ops: tuple[str, ...], rng: random.Random) -> Problem:
    question, reasoning = rng.choice(_TEMPLATES[ops])
    operands = _draw_operands(ops, rng)
    results = step_results(ops, operands)
    name, subject, possessive = rng.choice(NAMES)
    fields = {
        **dict(zip("abc", operands)), "r1": results[0], "answer": results[-1], "name": name, "subj": subject,
        "Subj": subject.capitalize(), "poss": possessive, "things": rng.choice(THINGS),
    }  # fmt: skip
    solution = f"{reasoning.format(**fields)}\n#### {results[-1]}"
    return Problem(question.format(**fields), solution, ops, operands, results[-1])


def _draw_operands(ops: tuple[str, ...], rng: random.Random) -> tuple[int, ...]:
    """Operands for `ops`, drawn again until every division is exact and every value is in range."""
    while True:
        operands = _first_operands(ops[0], rng) + tuple(rng.randint(*_LATER_RANGES[op]) for op in ops[1:])
        if _is_valid(ops, operands):
            return operands


def _first_operands(op: str, rng: random.Random) -> tuple[int, int]:
    if op == "div":  # built from a product, so the division is exact by construction
        divisor = rng.randint(*_DIVISORS)
        return divisor * rng.randint(*_QUOTIENTS), divisor
    left, right = _FIRST_RANGES[op]
    return rng.randint(*left), rng.randint(*right)


def _is_valid(ops: tuple[str, ...], operands: tuple[int, ...]) -> bool:
    values = (operands[0], *step_results(ops, operands))  # values[i] is the left operand of step i
    exact = all(left % right == 0 for left, op, right in zip(values, ops, operands[1:]) if op == "div")
    return exact and all(SMALLEST <= value <= LARGEST for value in (*operands, *values))


def write_jsonl(problems: Iterable[Problem], path: Path) -> None:
    """GSM8K's format (question, answer ending in `#### N`) plus each problem's kind, one JSON object a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for problem in problems:
            out.write(json.dumps({"question": problem.question, "answer": problem.solution, "kind": problem.kind}))
            out.write("\n")
