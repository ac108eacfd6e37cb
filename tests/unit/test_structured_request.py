"""The orchestrator reads a request's constraint, tools and tool turns, and refuses malformed ones
by field before any worker is asked; a finished answer of calls is read back as tool calls."""

from __future__ import annotations

import json

import pytest

from coolfusion.constraints import ConstraintKind
from coolfusion.orchestrator.servicer import parse_request
from coolfusion.orchestrator.settings import RequestLimits
from coolfusion.orchestrator.strategy import DEFAULT
from coolfusion.orchestrator.structured import InvalidStructure, tool_calls
from coolfusion.v1 import orchestrator_pb2 as opb
from coolfusion.v1 import worker_pb2 as wpb

PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
WEATHER = wpb.ToolDefinition(
    name="get_weather", parameters=json.dumps({"type": "object", "properties": {"city": {"type": "string"}}})
)


def chat(*messages: wpb.ChatMessage, tools=()) -> wpb.Prompt:
    return wpb.Prompt(chat=wpb.ChatConversation(messages=list(messages), tools=list(tools)))


USER = wpb.ChatMessage(role="user", content="Weather in Oslo?")


def parse(**fields):
    return parse_request(opb.FusionParameters(**fields), RequestLimits(), "r1", DEFAULT, {"a", "b"})


def test_a_constraint_is_read_and_compiled():
    constraint = wpb.Constraint(kind=wpb.CONSTRAINT_KIND_JSON_SCHEMA, definition=json.dumps(PERSON))
    structure = parse(prompt=wpb.Prompt(text="Name?"), constraint=constraint).structure
    assert structure.constraint.kind == ConstraintKind.JSON_SCHEMA and not structure.calls_tools
    assert parse(prompt=wpb.Prompt(text="Name?")).structure.constraint is None


def test_offered_tools_make_the_answer_text_or_calls_and_none_leaves_it_free():
    auto = parse(prompt=chat(USER, tools=[WEATHER])).structure
    assert auto.calls_tools and auto.constraint.kind == ConstraintKind.LARK_GRAMMAR
    required = parse(prompt=chat(USER, tools=[WEATHER]), tool_choice=opb.ToolChoice(mode=opb.TOOL_CHOICE_MODE_REQUIRED))
    assert required.structure.constraint.kind == ConstraintKind.JSON_SCHEMA
    none = parse(prompt=chat(USER, tools=[WEATHER]), tool_choice=opb.ToolChoice(mode=opb.TOOL_CHOICE_MODE_NONE))
    assert none.structure.constraint is None and not none.structure.calls_tools


BAD_SCHEMA = wpb.Constraint(kind=wpb.CONSTRAINT_KIND_JSON_SCHEMA, definition='{"type": "object", "if": {}}')
CALL = wpb.ToolCall(id="c1", name="get_weather", arguments='{"city": "Oslo"}')


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"prompt": wpb.Prompt(text="x"), "constraint": BAD_SCHEMA}, "constraint: json_schema does not compile"),
        (
            {
                "prompt": wpb.Prompt(text="x"),
                "constraint": wpb.Constraint(kind=wpb.CONSTRAINT_KIND_REGEX, definition="("),
            },
            "constraint: regex does not compile",
        ),
        ({"prompt": chat(USER, tools=[wpb.ToolDefinition(name="get weather")])}, "prompt.chat.tools[0].name"),
        ({"prompt": chat(USER, tools=[WEATHER, WEATHER])}, "offered twice"),
        (
            {"prompt": chat(USER, tools=[wpb.ToolDefinition(name="f", parameters="{nope")])},
            "prompt.chat.tools[0].parameters",
        ),
        (
            {"prompt": chat(USER, tools=[wpb.ToolDefinition(name="f", parameters='{"type": "thing"}')])},
            "prompt.chat.tools[0].parameters",
        ),
        (
            {"prompt": chat(USER), "tool_choice": opb.ToolChoice(mode=opb.TOOL_CHOICE_MODE_REQUIRED)},
            "offers no tools",
        ),
        (
            {
                "prompt": chat(USER, tools=[WEATHER]),
                "tool_choice": opb.ToolChoice(mode=opb.TOOL_CHOICE_MODE_FUNCTION, function_name="get_time"),
            },
            "tool_choice.function_name",
        ),
        (
            {"prompt": chat(USER, tools=[WEATHER]), "constraint": wpb.Constraint(kind=wpb.CONSTRAINT_KIND_JSON_OBJECT)},
            "set tool_choice to none",
        ),
        (
            {"prompt": chat(USER, wpb.ChatMessage(role="tool", content="4 C", tool_call_id="c9"))},
            "prompt.chat.messages[1]: tool_call_id 'c9' answers no earlier tool call",
        ),
        (
            {"prompt": chat(USER, wpb.ChatMessage(role="assistant", tool_calls=[CALL, CALL]))},
            "must be unique",
        ),
        (
            {
                "prompt": chat(
                    USER, wpb.ChatMessage(role="assistant", tool_calls=[wpb.ToolCall(id="c", name="f", arguments="[]")])
                )
            },
            "arguments must be a JSON object",
        ),
        ({"prompt": chat(wpb.ChatMessage(role="user", content="x", tool_calls=[CALL]))}, "only assistant turns"),
    ],
)
def test_malformed_structure_is_refused_naming_the_field(fields, words):
    with pytest.raises(InvalidStructure) as refused:
        parse(**fields)
    assert words in str(refused.value)


def test_a_conversation_with_a_call_and_its_result_is_accepted():
    turns = chat(
        USER,
        wpb.ChatMessage(role="assistant", tool_calls=[CALL]),
        wpb.ChatMessage(role="tool", content="4 C", tool_call_id="c1"),
    )
    prompt = parse(prompt=turns).prompt
    assert prompt.chat[1].tool_calls[0].name == "get_weather" and prompt.chat[2].tool_call_id == "c1"


def test_calls_are_read_from_a_finished_answer_with_ids_unique_to_the_request():
    calls = tool_calls('[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "f", "arguments": {}}]', "r1")
    assert [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("call_r1_0", "get_weather", {"city": "Oslo"}),
        ("call_r1_1", "f", {}),
    ]
    assert tool_calls("It is sunny.", "r1") == ()
