"""Structured answers of a request (docs/design.md chapter 9): its constraint and tools, read and
checked from the protocol, and the tool calls read back out of a finished answer."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from coolfusion.constraints import Constraint, ConstraintError, ConstraintKind
from coolfusion.constraints.protocol import constraint_of
from coolfusion.constraints.tools import ToolCall, ToolChoice, ToolDefinition, calls_constraint, parse_calls
from coolfusion.orchestrator.domain import ChatTurn
from coolfusion.v1 import orchestrator_pb2, worker_pb2

# OpenAI's rule for function names, which every client already follows.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CHOICES = {
    orchestrator_pb2.TOOL_CHOICE_MODE_AUTO: ToolChoice.AUTO,
    orchestrator_pb2.TOOL_CHOICE_MODE_NONE: ToolChoice.NONE,
    orchestrator_pb2.TOOL_CHOICE_MODE_REQUIRED: ToolChoice.REQUIRED,
    orchestrator_pb2.TOOL_CHOICE_MODE_FUNCTION: ToolChoice.FUNCTION,
}


class InvalidStructure(ValueError):
    """A constraint, tool, tool turn or tool choice is malformed (INVALID_ARGUMENT); the message
    names the field."""


@dataclass(frozen=True)
class Structure:
    """What a request's answer is held to: `constraint` (the request's own, or the one its tool
    choice implies), and whether the finished answer is read as tool calls."""

    constraint: Constraint | None = None
    calls_tools: bool = False


FREE_TEXT = Structure()


def parse_structure(parameters: orchestrator_pb2.FusionParameters, tools: tuple[ToolDefinition, ...]) -> Structure:
    """The request's structure, every part checked: the constraint compiles, the tool choice names
    an offered tool, and a constraint comes with no tool calls."""
    constraint = _constraint(parameters.constraint) if parameters.HasField("constraint") else None
    mode = parameters.tool_choice.mode  # 0 when unset: auto
    if mode and mode not in _CHOICES:
        raise InvalidStructure(f"tool_choice.mode {mode} is not a known mode")
    choice = _CHOICES.get(mode, ToolChoice.AUTO)
    if choice in (ToolChoice.REQUIRED, ToolChoice.FUNCTION) and not tools:
        raise InvalidStructure(f"tool_choice is {choice} but the prompt offers no tools (prompt.chat.tools)")
    function = parameters.tool_choice.function_name
    if choice == ToolChoice.FUNCTION and function not in {t.name for t in tools}:
        raise InvalidStructure(f"tool_choice.function_name {function!r} is not among the offered tools")
    parallel = not parameters.HasField("parallel_tool_calls") or parameters.parallel_tool_calls
    calls = calls_constraint(tools, choice, function, parallel)
    if calls is not None and constraint is not None:
        raise InvalidStructure("constraint cannot be combined with tool calls; set tool_choice to none")
    if calls is not None:
        _compiled(calls, "prompt.chat.tools")
    return Structure(constraint or calls, calls_tools=calls is not None)


def parse_tools(chat: worker_pb2.ChatConversation) -> tuple[ToolDefinition, ...]:
    """The offered tools: names unique and well formed, parameters a JSON Schema that compiles."""
    tools = tuple(ToolDefinition(t.name, t.description, t.parameters) for t in chat.tools)
    for i, tool in enumerate(tools):
        field = f"prompt.chat.tools[{i}]"
        if not _TOOL_NAME.fullmatch(tool.name):
            raise InvalidStructure(f"{field}.name {tool.name!r} must be 1-64 characters of [A-Za-z0-9_-]")
        if tool.name in (t.name for t in tools[:i]):
            raise InvalidStructure(f"{field}.name {tool.name!r} is offered twice")
        try:
            schema = tool.parameters_schema()
        except ConstraintError as error:
            raise InvalidStructure(f"{field}.parameters: {error}") from None
        _compiled(Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema)), f"{field}.parameters")
    return tools


def check_tool_turns(turns: tuple[ChatTurn, ...]) -> None:
    """Every call has a unique id and JSON object arguments; every tool turn answers an earlier call."""
    called: set[str] = set()
    for i, turn in enumerate(turns):
        field = f"prompt.chat.messages[{i}]"
        if turn.tool_calls and turn.role != "assistant":
            raise InvalidStructure(f"{field}: only assistant turns call tools")
        for j, call in enumerate(turn.tool_calls):
            if not call.id or call.id in called:
                raise InvalidStructure(f"{field}.tool_calls[{j}].id {call.id!r} must be unique and non-empty")
            called.add(call.id)
            if not isinstance(_json(call.arguments or "{}", f"{field}.tool_calls[{j}].arguments"), dict):
                raise InvalidStructure(f"{field}.tool_calls[{j}].arguments must be a JSON object")
        if turn.role == "tool" and turn.tool_call_id not in called:
            raise InvalidStructure(f"{field}: tool_call_id {turn.tool_call_id!r} answers no earlier tool call")


def tool_calls(text: str, request_id: str, choice: int = 0) -> tuple[ToolCall, ...]:
    """The calls a finished answer made (empty when it is text); ids are unique per request."""
    parsed = parse_calls(text) or []
    prefix = f"call_{request_id[:20]}" + (f"c{choice}" if choice else "")
    return tuple(ToolCall(f"{prefix}_{i}", name, arguments) for i, (name, arguments) in enumerate(parsed))


def _constraint(proto: worker_pb2.Constraint) -> Constraint | None:
    try:
        constraint = constraint_of(proto)
    except ValueError as error:
        raise InvalidStructure(str(error)) from None
    return None if constraint is None else _compiled(constraint, "constraint")


def _compiled(constraint: Constraint, field: str) -> Constraint:
    try:
        constraint.grammar  # noqa: B018 - compiles (once per process) and checks it
    except ConstraintError as error:
        raise InvalidStructure(f"{field}: {error}") from None
    return constraint


def _json(text: str, field: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidStructure(f"{field} is not valid JSON: {error}") from None
