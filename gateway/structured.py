"""OpenAI's structured output and tool calling, both ways: `response_format`, `tools`,
`tool_choice`, `parallel_tool_calls` and tool turns into fusion options and chat turns, and the
answer's tool calls back into a message (docs/http-api.md, "Structured output and tools")."""

from __future__ import annotations

from typing import Any

from coolfusion.client import json_object, json_schema
from coolfusion.gateway.errors import invalid, unsupported
from coolfusion.v1 import orchestrator_pb2, worker_pb2


def constraint(value: Any) -> worker_pb2.Constraint | None:
    """`response_format`: text (or absent), json_object, or json_schema with its schema. The
    schema is enforced whether `strict` is set or not; the orchestrator checks that it compiles."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind == "json_schema":
        described = value.get("json_schema")
        schema = described.get("schema") if isinstance(described, dict) else None
        if not isinstance(schema, dict):
            raise invalid("response_format.json_schema.schema must be a JSON Schema object", "response_format")
        return json_schema(schema)
    raise invalid(f"response_format.type is {kind!r}; it must be text, json_object or json_schema", "response_format")


def tools(value: Any) -> tuple[dict[str, Any], ...]:
    """`tools`: functions only (the only kind the API defines for chat completions)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise invalid("tools must be a list of tools", "tools", "invalid_type")
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise unsupported(f"tools[{i}].type", "only function tools can be called")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid(f"tools[{i}].function must be an object with a name", f"tools[{i}].function")
        if not isinstance(function.get("parameters", {}), dict):
            raise invalid(f"tools[{i}].function.parameters must be a JSON Schema object", f"tools[{i}].function")
    return tuple(value)


def tool_choice(value: Any) -> str | dict[str, Any]:
    """`tool_choice`: "auto", "none", "required", or a named function."""
    if value is None:
        return ""
    if value in ("auto", "none", "required"):
        return value
    name = value.get("function", {}).get("name") if isinstance(value, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
        raise invalid("tool_choice must be auto, none, required or {type: function, function: {name}}", "tool_choice")
    return {"type": "function", "function": {"name": name}}


def tool_turn_fields(message: dict[str, Any], where: str) -> dict[str, Any]:
    """An assistant turn's `tool_calls`, or a tool turn's `tool_call_id`, checked."""
    if message.get("role") == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise invalid(f"{where}.tool_call_id is required for a tool message", f"{where}.tool_call_id")
        return {"tool_call_id": call_id}
    calls = message.get("tool_calls")
    if calls is None:
        return {}
    if not isinstance(calls, list):
        raise invalid(f"{where}.tool_calls must be a list", f"{where}.tool_calls", "invalid_type")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
            raise invalid(
                f"{where}.tool_calls[{j}] must have a function with a name and arguments (JSON text)",
                f"{where}.tool_calls",
            )
    return {"tool_calls": calls}


def message_fields(result: orchestrator_pb2.FuseResult) -> dict[str, Any]:
    """The assistant message of a finished answer: its text, or its tool calls."""
    if not result.tool_calls:
        return {"content": result.text}
    return {"content": None, "tool_calls": [tool_call(call) for call in result.tool_calls]}


def tool_call(call: worker_pb2.ToolCall, index: int | None = None) -> dict[str, Any]:
    """One call as OpenAI writes it; with `index`, as a stream's delta writes it."""
    written: dict[str, Any] = {"id": call.id, "type": "function"}
    written["function"] = {"name": call.name, "arguments": call.arguments}
    return written if index is None else {"index": index, **written}
