"""OpenAI request bodies -> fusion requests; a parameter that fusion cannot honour is refused, never ignored."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from coolfusion.client import AGGREGATIONS, REPETITION_GUARDS, SELECTIONS, FuseOptions, PromptLike, fusion_strategy
from coolfusion.gateway import structured
from coolfusion.gateway.errors import ApiError, invalid, unsupported

Kind = Literal["chat", "text"]  # /v1/chat/completions or /v1/completions
# OpenAI's documented default for the legacy completions endpoint (chat has none: the
# orchestrator's default length applies there).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_FUNCTIONS = "the legacy function-calling fields are not served; send tools and tool_choice"
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


@dataclass(frozen=True)
class FusionCall:
    """One OpenAI request as a fusion: what to ask the orchestrator and how to answer."""

    kind: Kind
    model: str
    prompt: PromptLike
    options: FuseOptions  # workers are the caller's `workers` until the model is resolved
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries the usage

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"


def parse_chat(body: dict[str, Any]) -> FusionCall:
    """A /v1/chat/completions body."""
    _refuse_what_fusion_cannot_do(body, _CHAT_REFUSALS)
    call = _call("chat", body, _messages(_required(body, "messages")), default_max_tokens=0)
    options = replace(
        call.options,
        tools=structured.tools(body.get("tools")),
        tool_choice=structured.tool_choice(body.get("tool_choice")),
        parallel_tool_calls=_optional_bool(body, "parallel_tool_calls"),
    )
    return replace(call, options=options)


def parse_completion(body: dict[str, Any]) -> FusionCall:
    """A /v1/completions body."""
    _refuse_what_fusion_cannot_do(body, _COMPLETION_REFUSALS)
    return _call("text", body, _text_prompt(_required(body, "prompt")), COMPLETIONS_DEFAULT_MAX_TOKENS)


def _call(kind: Kind, body: dict[str, Any], prompt: PromptLike, default_max_tokens: int) -> FusionCall:
    model = _required(body, "model")
    if not isinstance(model, str) or not model:
        raise invalid("model must be a non-empty string", "model", "invalid_type")
    stream = _bool(body, "stream")
    return FusionCall(
        kind=kind,
        model=model,
        prompt=prompt,
        options=_options(body, default_max_tokens),
        stream=stream,
        include_usage=_include_usage(body, stream),
    )


def _options(body: dict[str, Any], default_max_tokens: int) -> FuseOptions:
    """The fusion options: OpenAI's length and stop fields, and coolfusion's own extra fields."""
    weights = _mapping(body, "worker_weights", _positive_number)
    templates = _mapping(body, "prompt_templates", _text)
    strategy = fusion_strategy(
        _choice(body, "aggregation", AGGREGATIONS), _choice(body, "repetition_guard", REPETITION_GUARDS),
        weights, templates, _calibration(body),
    )  # fmt: skip
    return FuseOptions(
        workers=_names(body, "workers"),
        max_new_tokens=_max_tokens(body) or default_max_tokens,
        stop=_stop(body.get("stop")),
        segment_max_tokens=_int(body, "segment_max_tokens", minimum=1) or 0,
        rerank=_bool(body, "rerank"),
        strategy=strategy,
        constraint=structured.constraint(body.get("response_format")),
        temperature=_number(body, "temperature", 0.0, 2.0) or 0.0,
        top_p=_top_p(body),
        top_k=_int(body, "top_k", minimum=0) or 0,
        seed=_seed(body),
        selection=_choice(body, "selection", SELECTIONS),
        n=_int(body, "n", minimum=1) or 0,
    )


# ---- refusals -----------------------------------------------------------------------------------

Refusal = tuple[str, Callable[[Any], bool], str]  # (field, whether its value is harmless, why not)


def _number_is(value: Any, allowed: float) -> bool:
    return value is None or (_is_number(value) and value == allowed)


def _empty(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def _text_only(value: Any) -> bool:
    return value is None or value == ["text"]


_SAMPLING: list[Refusal] = [
    ("presence_penalty", lambda v: _number_is(v, 0), "the workers propose text without penalties"),
    ("frequency_penalty", lambda v: _number_is(v, 0), "the workers propose text without penalties"),
    ("repetition_penalty", lambda v: _number_is(v, 1), "the workers propose text without penalties"),
    ("min_p", lambda v: _number_is(v, 0), "the workers draw with temperature, top_k and top_p only"),
    ("logit_bias", _empty, "the workers share text only, never token ids"),
    ("functions", _empty, _FUNCTIONS),
    ("function_call", lambda v: v is None, _FUNCTIONS),
]
_CHAT_REFUSALS: list[Refusal] = [
    *_SAMPLING,
    ("logprobs", lambda v: v is None or v is False, "fused text has no single model's log-probabilities"),
    ("top_logprobs", lambda v: v is None, "fused text has no single model's log-probabilities"),
    ("modalities", _text_only, "fusion generates text only"),
    ("audio", lambda v: v is None, "fusion generates text only"),
]
_COMPLETION_REFUSALS: list[Refusal] = [
    *_SAMPLING,
    ("logprobs", lambda v: v is None, "fused text has no single model's log-probabilities"),
    ("best_of", lambda v: v is None or v == 1, "each answer is fused on its own: send n for several"),
    ("echo", lambda v: v is None or v is False, "the answer is returned without the prompt"),
    ("suffix", _empty, "fusion continues text, it does not fill in"),
    ("tools", _empty, "tools are offered to chat turns: send them to /v1/chat/completions"),
    ("tool_choice", lambda v: v is None, "tools are offered to chat turns: send them to /v1/chat/completions"),
]


def _refuse_what_fusion_cannot_do(body: dict[str, Any], refusals: list[Refusal]) -> None:
    for name, harmless, why in refusals:
        if not harmless(body.get(name)):
            raise unsupported(name, f"{why} (got {body[name]!r})")


# ---- prompts ------------------------------------------------------------------------------------


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty list of messages", "messages", "invalid_type")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(value)]


def _message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise invalid(f"{where} must be an object with role and content", where, "invalid_type")
    role = message.get("role")
    if role == "function" or message.get("function_call"):
        raise unsupported(f"{where}.role", f"{_FUNCTIONS} (got a {role!r} message)")
    if role not in _ROLES:
        raise invalid(f"{where}.role is {role!r}; it must be one of {', '.join(_ROLES)}", f"{where}.role")
    turn = {"role": _ROLES[role], "content": _content(message.get("content"), role, f"{where}.content")}
    return {**turn, **structured.tool_turn_fields(message, where)}


def _content(content: Any, role: str, where: str) -> str:
    """A message's text: a string, or text parts (joined by newlines, as vLLM does)."""
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of text parts", where, "invalid_type")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise unsupported(f"{where}[{j}].type", f"fusion reads text only (got a {kind!r} part)")
        texts.append(part["text"])
    return "\n".join(texts)


def _text_prompt(value: Any) -> str:
    """A completions prompt: a string, or a list holding exactly one string."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        raise unsupported("prompt", f"one prompt per request (got {len(value)}); send them as separate requests")
    raise unsupported("prompt", "the prompt must be text: the workers share text only, never token ids")


# ---- fields -------------------------------------------------------------------------------------


def _required(body: dict[str, Any], name: str) -> Any:
    if body.get(name) is None:
        raise invalid(f"{name} is required", name, "missing_required_parameter")
    return body[name]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is not None and (not _is_int(value) or value < minimum):
        raise invalid(f"{name} is {value!r}; it must be an integer >= {minimum}", name)
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is not None and (not _is_number(value) or not low <= value <= high):
        raise invalid(f"{name} is {value!r}; it must be a number in [{low:g}, {high:g}]", name)
    return value


def _top_p(body: dict[str, Any]) -> float:
    value = body.get("top_p")
    if value is not None and (not _is_number(value) or not 0 < value <= 1):
        raise invalid(f"top_p is {value!r}; it must be a number in (0, 1]", "top_p")
    return value or 0.0


def _seed(body: dict[str, Any]) -> int | None:
    value = body.get("seed")
    if value is not None and (not _is_int(value) or not 0 <= value < 2**64):
        raise invalid(f"seed is {value!r}; it must be an integer in [0, 2**64)", "seed")
    return value


def _optional_bool(body: dict[str, Any], name: str) -> bool | None:
    return _bool(body, name) if body.get(name) is not None else None


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(f"{name} is {value!r}; it must be true or false", name, "invalid_type")
    return bool(value)


def _max_tokens(body: dict[str, Any]) -> int | None:
    """max_completion_tokens (the current name) or max_tokens (the older one); both must agree."""
    current, older = _int(body, "max_completion_tokens", 1), _int(body, "max_tokens", 1)
    if current is not None and older is not None and current != older:
        raise invalid(f"max_completion_tokens ({current}) and max_tokens ({older}) differ; send one", "max_tokens")
    return current if current is not None else older


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise invalid("stop must be a string or a list of strings", "stop", "invalid_type")


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise invalid("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options", "invalid_type")
    return _bool(options, "include_usage")


def _choice(body: dict[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    value = body.get(name)
    if value is not None and value not in allowed:
        raise invalid(f"{name} is {value!r}; it must be one of {', '.join(allowed)}", name)
    return value or ""


def _calibration(body: dict[str, Any]) -> str:
    """A calibration the orchestrator loaded, by name; it checks that the name exists and fits."""
    value = body.get("calibration")
    if value is not None and (not isinstance(value, str) or not value):
        raise invalid(f"calibration is {value!r}; it must be the name of a loaded calibration", "calibration")
    return value or ""


def _names(body: dict[str, Any], name: str) -> tuple[str, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise invalid(f"{name} must be a list of worker names", name, "invalid_type")
    return tuple(value)


def _positive_number(value: Any) -> bool:
    return _is_number(value) and value > 0


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _mapping(body: dict[str, Any], name: str, valid: Callable[[Any], bool]) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(valid(v) for v in value.values()):
        kind = "positive numbers" if valid is _positive_number else "strings"
        raise invalid(f"{name} must map worker names to {kind}", name, "invalid_type")
    return value


def bind_model(call: FusionCall, fusion_model: str, is_worker: bool) -> FuseOptions:
    """The options with the model's workers: the fusion model fuses the caller's `workers` (all
    when empty); a worker's own model is that worker alone."""
    if call.model == fusion_model:
        return call.options
    if not is_worker:
        raise ApiError(404, f"The model {call.model!r} does not exist", param="model", code="model_not_found")
    if call.options.workers not in ((), (call.model,)):
        raise invalid(
            f"model {call.model!r} is one worker; name several workers only with model {fusion_model!r}", "workers"
        )
    return replace(call.options, workers=(call.model,))
