"""Constraints compile or say why not, text is checked byte by byte, and tool calls round-trip."""

from __future__ import annotations

import json

import jsonschema
import pytest

from coolfusion.constraints import Constraint, ConstraintError, ConstraintKind, TextMatcher, compile_grammar
from coolfusion.constraints.tools import (
    ToolCall,
    ToolChoice,
    ToolDefinition,
    calls_constraint,
    calls_text,
    parse_calls,
)

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = ToolDefinition(
    "get_weather", "Weather now", json.dumps({"type": "object", "properties": {"city": {"type": "string"}}})
)
CLOCK = ToolDefinition("get_time")


def schema(value: dict) -> Constraint:
    return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(value))


@pytest.mark.parametrize(
    ("constraint", "why"),
    [
        (Constraint(ConstraintKind.JSON_SCHEMA, "{"), "not valid JSON"),
        (Constraint(ConstraintKind.JSON_SCHEMA, "[1]"), "must be a JSON object"),
        (schema({"type": "objectish"}), "objectish"),
        (schema({"type": "object", "if": {"type": "object"}}), "Unimplemented keys"),
        (schema({"type": "string", "format": "colour"}), "Unknown format"),
        (Constraint(ConstraintKind.REGEX, "a(b"), "unclosed group"),
        (Constraint(ConstraintKind.REGEX, ""), "needs a definition"),
        (Constraint(ConstraintKind.LARK_GRAMMAR, "start: missing"), "unknown name"),
    ],
)
def test_a_constraint_that_does_not_compile_says_why(constraint, why):
    with pytest.raises(ConstraintError, match=why):
        compile_grammar(constraint)


def test_json_is_written_compactly_with_spaces_after_separators():
    matcher = TextMatcher.of(schema(PERSON))
    assert matcher.allows('{"name": "Ann", "age": 7}', ends=True) is None
    assert matcher.allows('{"name":"Ann"') is not None  # no space after the colon
    assert matcher.allows('{ "name"') is not None  # no other whitespace


def test_a_text_matcher_checks_prefixes_and_ends_and_knows_when_nothing_can_follow():
    matcher = TextMatcher.of(schema(PERSON))
    assert matcher.allows('{"name": "A') is None
    assert "cannot end" in matcher.allows('{"name": "A"', ends=True)
    assert "leaves" in matcher.allows('{"nom"')
    before = matcher.after('{"name": "A", "age": 1')
    assert not before.complete
    done = before.after("}")
    assert done.complete
    assert not matcher.complete  # `after` left the original where it was


def test_a_regex_answer_may_end_early_only_where_the_expression_does():
    matcher = TextMatcher.of(Constraint(ConstraintKind.REGEX, r"[0-9]+( apples)?"))
    assert matcher.allows("12", ends=True) is None
    assert matcher.allows("12 app", ends=True) is not None
    assert not matcher.after("12").complete  # " apples" may still follow
    assert matcher.after("12 apples").complete


def test_any_json_object_is_an_object():
    matcher = TextMatcher.of(Constraint(ConstraintKind.JSON_OBJECT))
    assert matcher.allows('{"a": [1, {"b": null}], "c": "d"}', ends=True) is None
    assert matcher.allows("[1]") is not None


@pytest.mark.parametrize("choice", [ToolChoice.REQUIRED, ToolChoice.AUTO])
def test_tool_calls_follow_the_offered_tools_schemas(choice):
    matcher = TextMatcher.of(calls_constraint((WEATHER, CLOCK), choice))
    call = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]'
    assert matcher.allows(call, ends=True) is None
    assert matcher.allows('[{"name": "get_moon"') is not None
    assert matcher.allows('[{"arguments": {}') is not None  # the name comes first


def test_auto_also_allows_text_but_required_does_not():
    assert TextMatcher.of(calls_constraint((WEATHER,), ToolChoice.AUTO)).allows("It is sunny.", ends=True) is None
    assert TextMatcher.of(calls_constraint((WEATHER,), ToolChoice.REQUIRED)).allows("It") is not None


def test_a_named_function_or_no_parallel_calls_allows_one_call():
    one = '[{"name": "get_time", "arguments": {}}'
    named = TextMatcher.of(calls_constraint((WEATHER, CLOCK), ToolChoice.FUNCTION, "get_time"))
    assert named.allows(one + "]", ends=True) is None
    assert named.allows(one + ", ") is not None
    assert named.allows('[{"name": "get_weather"') is not None
    single = TextMatcher.of(calls_constraint((WEATHER, CLOCK), ToolChoice.REQUIRED, parallel=False))
    assert single.allows(one + ", ") is not None


def test_no_tools_or_tool_choice_none_leave_the_answer_free():
    assert calls_constraint((), ToolChoice.AUTO) is None
    assert calls_constraint((WEATHER,), ToolChoice.NONE) is None


def test_calls_read_back_from_an_answer_and_written_for_a_prompt_round_trip():
    calls = (ToolCall("c1", "get_weather", '{"city": "Oslo"}'), ToolCall("c2", "get_time", "{}"))
    text = calls_text(calls)
    assert text == '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]'
    assert TextMatcher.of(calls_constraint((WEATHER, CLOCK), ToolChoice.REQUIRED)).allows(text, ends=True) is None
    assert parse_calls(text) == [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")]
    assert parse_calls("It is sunny.") is None
    assert parse_calls("[1, 2]") is None


def test_json_schema_answers_validate_against_their_schema():
    """The grammar's language is the schema's: what the matcher accepts, jsonschema validates."""
    value = {"tags": ["a", "b"], "size": 2.5, "code": "AB-12"}
    shape = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
            "size": {"type": "number"},
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"},
        },
        "required": ["tags", "size", "code"],
    }
    text = json.dumps(value, separators=(", ", ": "))
    assert TextMatcher.of(schema(shape)).allows(text, ends=True) is None
    jsonschema.validate(json.loads(text), shape)
    assert TextMatcher.of(schema(shape)).allows(text.replace("AB-12", "ab-12")) is not None
