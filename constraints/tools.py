"""Tool calls as answer text (docs/design.md section 9.4): the one format every model writes them
in, the constraint that holds an answer to it, and reading calls back out of an answer.

An answer that calls tools is a JSON array of calls, each `{"name": ..., "arguments": {...}}`,
written compactly like every constrained JSON answer. Every model of a fusion writes the same
format, whatever its own chat template would use, because the answer text is shared.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from coolfusion.constraints.grammar import JSON_STYLE, Constraint, ConstraintError, ConstraintKind


class ToolChoice(enum.StrEnum):
    """Whether the answer calls tools (proto ToolChoiceMode)."""

    AUTO = "auto"  # text or calls, as the models choose
    NONE = "none"  # text only
    REQUIRED = "required"  # one or more calls
    FUNCTION = "function"  # exactly one call of a named tool


@dataclass(frozen=True)
class ToolDefinition:
    """A function the answer may call; `parameters` is a JSON Schema of its arguments (JSON text)."""

    name: str
    description: str = ""
    parameters: str = ""

    def parameters_schema(self) -> dict:
        """The arguments' schema; an empty one means any object. ConstraintError when it is not a
        JSON object."""
        if not self.parameters:
            return {"type": "object"}
        try:
            schema = json.loads(self.parameters)
        except json.JSONDecodeError as error:
            raise ConstraintError(f"tool {self.name!r}: parameters is not valid JSON: {error}") from None
        if not isinstance(schema, dict):
            raise ConstraintError(f"tool {self.name!r}: parameters must be a JSON Schema object")
        return schema


@dataclass(frozen=True)
class ToolCall:
    """One call: its id (unique in a conversation), the tool's name and its arguments (JSON text)."""

    id: str
    name: str
    arguments: str


def calls_constraint(
    tools: tuple[ToolDefinition, ...], choice: ToolChoice, function: str = "", parallel: bool = True
) -> Constraint | None:
    """The language of answers that follow `choice`; None when the answer is free text."""
    if choice == ToolChoice.NONE or not tools:
        return None
    offered = [t for t in tools if t.name == function] if choice == ToolChoice.FUNCTION else list(tools)
    calls: dict = {"type": "array", "minItems": 1, "items": {"anyOf": [_call_schema(t) for t in offered]}}
    if choice == ToolChoice.FUNCTION or not parallel:
        calls["maxItems"] = 1
    if choice != ToolChoice.AUTO:
        return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(calls))
    # Text, or calls: an answer that opens with "[" is calls, any other answer is text.
    calls["x-guidance"] = JSON_STYLE
    lark = f"start: calls | text\ncalls: %json {json.dumps(calls)}\ntext: /[^\\[][\\s\\S]*/\n"
    return Constraint(ConstraintKind.LARK_GRAMMAR, lark)


def parse_calls(text: str) -> list[tuple[str, str]] | None:
    """The (name, arguments JSON) of each call when `text` is a whole answer of calls; else None."""
    if not text.startswith("["):
        return None
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(calls, list) or not calls:
        return None
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c for c in calls):
        return None
    return [(c["name"], json.dumps(c["arguments"], separators=(", ", ": "))) for c in calls]


def calls_text(calls: tuple[ToolCall, ...]) -> str:
    """Calls written as an answer writes them: how an earlier turn's calls read in a prompt."""
    written = [{"name": c.name, "arguments": json.loads(c.arguments or "{}")} for c in calls]
    return json.dumps(written, separators=(", ", ": "), ensure_ascii=False)


def _call_schema(tool: ToolDefinition) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": tool.parameters_schema()},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
