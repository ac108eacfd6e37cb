"""Structured answers from the client: constraints (JSON Schema, any JSON object, regular
expression, grammar), tools offered to the answer and the choice of calling them, and chat turns
that called tools, in the OpenAI API's shapes that callers already hold."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from coolfusion.v1 import orchestrator_pb2, worker_pb2

# A tool as the OpenAI API writes it: {"type": "function", "function": {"name", "description",
# "parameters"}}, or the inner function object alone.
ToolLike = Mapping[str, Any]
# "auto", "none", "required", or {"type": "function", "function": {"name": ...}}.
ToolChoiceLike = str | Mapping[str, Any]
_MODES = {
    "auto": orchestrator_pb2.TOOL_CHOICE_MODE_AUTO,
    "none": orchestrator_pb2.TOOL_CHOICE_MODE_NONE,
    "required": orchestrator_pb2.TOOL_CHOICE_MODE_REQUIRED,
}


def json_schema(schema: Mapping[str, Any] | str) -> worker_pb2.Constraint:
    """The answer is one JSON value valid against `schema` (a dict, or its JSON text)."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    return worker_pb2.Constraint(kind=worker_pb2.CONSTRAINT_KIND_JSON_SCHEMA, definition=text)


def json_object() -> worker_pb2.Constraint:
    """The answer is any JSON object."""
    return worker_pb2.Constraint(kind=worker_pb2.CONSTRAINT_KIND_JSON_OBJECT)


def regex(pattern: str) -> worker_pb2.Constraint:
    """The whole answer matches `pattern` (Rust `regex` syntax)."""
    return worker_pb2.Constraint(kind=worker_pb2.CONSTRAINT_KIND_REGEX, definition=pattern)


def lark_grammar(grammar: str) -> worker_pb2.Constraint:
    """The answer is a text of `grammar`, in llguidance's Lark dialect."""
    return worker_pb2.Constraint(kind=worker_pb2.CONSTRAINT_KIND_LARK_GRAMMAR, definition=grammar)


def tool_definition(tool: ToolLike) -> worker_pb2.ToolDefinition:
    """A tool in the protocol's form; parameters become JSON text."""
    function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise TypeError(f"a tool is a function with a name, not {dict(tool)!r}")
    parameters = function.get("parameters")
    return worker_pb2.ToolDefinition(
        name=function["name"],
        description=function.get("description") or "",
        parameters="" if parameters is None else json.dumps(parameters),
    )


def tool_choice(choice: ToolChoiceLike) -> orchestrator_pb2.ToolChoice | None:
    """The protocol's ToolChoice; None for "" (the default: auto when tools are offered)."""
    if isinstance(choice, str):
        if not choice:
            return None
        if choice not in _MODES:
            raise ValueError(f"tool_choice {choice!r} must be one of {', '.join(_MODES)} or a named function")
        return orchestrator_pb2.ToolChoice(mode=_MODES[choice])
    name = (choice.get("function") or {}).get("name")
    if choice.get("type") != "function" or not isinstance(name, str):
        raise ValueError(f"a named tool_choice is {{'type': 'function', 'function': {{'name': ...}}}}, not {choice!r}")
    return orchestrator_pb2.ToolChoice(mode=orchestrator_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name=name)


def chat_message(turn: Mapping[str, Any]) -> worker_pb2.ChatMessage:
    """A chat turn: role and content, and an assistant's `tool_calls` or a tool turn's
    `tool_call_id` in the OpenAI API's shapes (arguments as JSON text or as an object)."""
    calls = [_tool_call(call) for call in turn.get("tool_calls") or ()]
    return worker_pb2.ChatMessage(
        role=turn["role"],
        content=turn.get("content") or "",
        tool_calls=calls,
        tool_call_id=turn.get("tool_call_id", ""),
    )


def chat_prompt(turns: Sequence[Mapping[str, Any]], tools: Sequence[ToolLike]) -> worker_pb2.Prompt:
    messages = [chat_message(turn) for turn in turns]
    offered = [tool_definition(tool) for tool in tools]
    return worker_pb2.Prompt(chat=worker_pb2.ChatConversation(messages=messages, tools=offered))


def _tool_call(call: Mapping[str, Any]) -> worker_pb2.ToolCall:
    function = call.get("function", call)
    arguments = function.get("arguments", "{}")
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return worker_pb2.ToolCall(id=call.get("id", ""), name=function.get("name", ""), arguments=text)
