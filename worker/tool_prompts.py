"""How tools and tool turns read in a prompt (docs/design.md section 9.4): through the model's chat
template where it renders tools, else in plain text, which a base model reads as paragraphs too.

Either way an earlier assistant turn that called tools reads as the calls themselves, in the format
every model of a fusion answers in (constraints/tools.py)."""

from __future__ import annotations

import json
from collections.abc import Callable

from coolfusion.constraints.tools import ToolDefinition, calls_text
from coolfusion.worker.backend import ChatTurn, PromptSpec

# The plain-text rendering's instructions, around one line per tool.
_TOOLS_INTRO = (
    "You can call the following tools. Each line describes one: its name, what it does and a JSON "
    "Schema of its arguments."
)
_TOOLS_HOW = (
    'To call tools, answer with only a JSON array of calls, such as [{"name": "<tool name>", '
    '"arguments": {<the arguments>}}]. Otherwise, answer in plain text.'
)


def renders_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders tools: the Jinja templates that do read a `tools` variable."""
    return bool(chat_template) and "tools" in str(chat_template)


# transformers' chat templates take tools as JSON Schema dicts or as Python functions.
TemplateTools = list[dict | Callable[..., object]]


def template_messages(prompt: PromptSpec) -> tuple[list[dict], TemplateTools | None]:
    """The messages and tools as transformers' chat templates take them (OpenAI's shapes, with the
    arguments as objects)."""
    messages = [_template_message(turn) for turn in prompt.chat]
    tools: TemplateTools = [_template_tool(tool) for tool in prompt.tools]
    return messages, tools or None


def plain_turns(prompt: PromptSpec) -> list[tuple[str, str]]:
    """(role, content) turns for a template that renders no tools, or a base model: the tools as a
    system turn's text, calls as their answer text, and each result as a user turn."""
    turns = [_plain_turn(turn, prompt.chat) for turn in prompt.chat]
    if not prompt.tools:
        return turns
    described = "\n".join([_TOOLS_INTRO, *(_tool_line(t) for t in prompt.tools), _TOOLS_HOW])
    if turns and turns[0][0] == "system":
        return [("system", f"{turns[0][1]}\n\n{described}"), *turns[1:]]
    return [("system", described), *turns]


def _template_message(turn: ChatTurn) -> dict:
    message: dict = {"role": turn.role, "content": turn.content}
    if turn.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments or "{}")}}
            for c in turn.tool_calls
        ]
    if turn.tool_call_id:
        message["tool_call_id"] = turn.tool_call_id
    return message


def _template_tool(tool: ToolDefinition) -> dict:
    function = {"name": tool.name, "description": tool.description, "parameters": tool.parameters_schema()}
    return {"type": "function", "function": function}


def _plain_turn(turn: ChatTurn, chat: tuple[ChatTurn, ...]) -> tuple[str, str]:
    if turn.tool_calls:
        content = f"{turn.content}\n{calls_text(turn.tool_calls)}" if turn.content else calls_text(turn.tool_calls)
        return turn.role, content
    if turn.role == "tool":
        names = {c.id: c.name for t in chat for c in t.tool_calls}
        called = names.get(turn.tool_call_id, "a tool")
        return "user", f"Result of {called} (call {turn.tool_call_id}):\n{turn.content}"
    return turn.role, turn.content


def _tool_line(tool: ToolDefinition) -> str:
    line = {"name": tool.name, "description": tool.description, "parameters": tool.parameters_schema()}
    return json.dumps(line, ensure_ascii=False)
