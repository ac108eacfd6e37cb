"""A constraint and its llguidance grammar: compiled once per distinct constraint in a process."""

from __future__ import annotations

import enum
import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llguidance

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# JSON is written compactly with a space after each separator, and no other whitespace. The spaces
# give the segment rule its word boundaries inside JSON (docs/design.md section 9.2); any other
# whitespace would only let a small model pad or loop.
JSON_STYLE: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
# Grammars compiled at once per process; a service sees few distinct schemas, each reused often.
_GRAMMAR_CACHE = 256


class ConstraintKind(enum.StrEnum):
    """The languages an answer can be held to (proto ConstraintKind)."""

    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    LARK_GRAMMAR = "lark_grammar"


class ConstraintError(ValueError):
    """A constraint that does not compile: the message says what is wrong (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Constraint:
    """A language the whole answer belongs to; `definition` is the schema (JSON text), the regular
    expression or the Lark grammar, and empty for JSON_OBJECT."""

    kind: ConstraintKind
    definition: str = ""

    @property
    def grammar(self) -> str:
        """llguidance's grammar for it (cached); raises ConstraintError when it does not compile."""
        return compile_grammar(self)


def compile_grammar(constraint: Constraint) -> str:
    """The llguidance grammar of `constraint`, checked: an invalid schema, regular expression or
    grammar, or a schema keyword llguidance does not implement, raises ConstraintError."""
    return _compiled(constraint.kind, constraint.definition)


@functools.lru_cache(maxsize=_GRAMMAR_CACHE)
def _compiled(kind: ConstraintKind, definition: str) -> str:
    grammar = _grammar(kind, definition)
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed or messages:  # a warning names a schema keyword that would be silently ignored
        raise ConstraintError(f"{kind} does not compile: {'; '.join(messages)}")
    return grammar


def _grammar(kind: ConstraintKind, definition: str) -> str:
    if kind == ConstraintKind.JSON_OBJECT:
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_STYLE)
    if kind == ConstraintKind.JSON_SCHEMA:
        return llguidance.LLMatcher.grammar_from_json_schema(_schema(definition), overrides=JSON_STYLE)
    if not definition:
        raise ConstraintError(f"a {kind} constraint needs a definition")
    if kind == ConstraintKind.REGEX:
        return llguidance.LLMatcher.grammar_from_regex(definition)
    return llguidance.LLMatcher.grammar_from_lark(definition)


def _schema(definition: str) -> dict:
    try:
        schema = json.loads(definition)
    except json.JSONDecodeError as error:
        raise ConstraintError(f"json_schema is not valid JSON: {error}") from None
    if not isinstance(schema, dict):
        raise ConstraintError("json_schema must be a JSON object")
    return schema
