"""The `arithmetic` family: one operation on small whole numbers, "23 + 9 =" -> "32", seeded."""

from __future__ import annotations

import random
from collections.abc import Callable

# Addition of two numbers in [2, 40]; subtraction with a first number in [5, 60] and a result of at
# least 1; multiplication of two numbers in [2, 12]; exact division whose divisor and quotient are
# in [2, 12]. Items are distinct, and none repeats a shot.

SENTENCE = "{subject} = {answer}"
SHOTS: tuple[tuple[str, str], ...] = (("3 + 4", "7"), ("9 * 6", "54"), ("20 - 8", "12"), ("24 / 4", "6"))
SEED = 2026
PER_OPERATION = 100


def _add(rng: random.Random) -> tuple[int, int, int]:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    return a, b, a + b


def _sub(rng: random.Random) -> tuple[int, int, int]:
    a = rng.randint(5, 60)
    b = rng.randint(2, a - 1)
    return a, b, a - b


def _mul(rng: random.Random) -> tuple[int, int, int]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return a, b, a * b


def _div(rng: random.Random) -> tuple[int, int, int]:
    divisor, quotient = rng.randint(2, 12), rng.randint(2, 12)
    return divisor * quotient, divisor, quotient


# Operation name -> (symbol, draw of (left, right, result)); the name is the item's kind.
OPERATIONS: dict[str, tuple[str, Callable[[random.Random], tuple[int, int, int]]]] = {
    "add": ("+", _add),
    "sub": ("-", _sub),
    "mul": ("*", _mul),
    "div": ("/", _div),
}


def items(seed: int = SEED, per_operation: int = PER_OPERATION) -> list[tuple[str, str, tuple[str, ...]]]:
    """(kind, expression, (result,)): `per_operation` distinct draws of each operation, in draw order."""
    rng = random.Random(seed)
    shots = {expression for expression, _ in SHOTS}
    drawn: list[tuple[str, str, tuple[str, ...]]] = []
    for kind, (symbol, draw) in OPERATIONS.items():
        seen: set[str] = set()
        while len(seen) < per_operation:
            left, right, result = draw(rng)
            expression = f"{left} {symbol} {right}"
            if expression not in seen and expression not in shots:
                seen.add(expression)
                drawn.append((kind, expression, (str(result),)))
    return drawn
