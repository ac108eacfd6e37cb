"""Constraints on a whole answer (JSON Schema, any JSON object, regular expression, grammar), shared
by the worker, which enforces them while proposing, and the orchestrator, which checks every
candidate against them (docs/design.md chapter 9). The grammar engine is llguidance."""

from coolfusion.constraints.grammar import (
    JSON_STYLE,
    Constraint,
    ConstraintError,
    ConstraintKind,
    compile_grammar,
)
from coolfusion.constraints.text import TextMatcher

__all__ = [
    "JSON_STYLE",
    "Constraint",
    "ConstraintError",
    "ConstraintKind",
    "TextMatcher",
    "compile_grammar",
]
