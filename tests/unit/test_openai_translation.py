"""The gateway's translation of OpenAI requests, its errors, and what it dares to stream early."""

from __future__ import annotations

import json

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coolfusion.client import CoolfusionError, FuseOptions, fusion_strategy
from coolfusion.gateway.errors import ApiError, from_orchestrator
from coolfusion.gateway.parsing import bind_model, parse_chat, parse_completion
from coolfusion.gateway.streaming import REPEAT_HOLD_CHARS, held_back_text, hold_chars
from coolfusion.orchestrator.strategy import MIN_REPEAT_CHARS, repeated_tail
from coolfusion.v1 import orchestrator_pb2, worker_pb2

CHAT = {"model": "coolfusion", "messages": [{"role": "user", "content": "Hi"}]}


def refusal(parse, body) -> ApiError:
    with pytest.raises(ApiError) as raised:
        parse(body)
    return raised.value


# ---- requests -----------------------------------------------------------------------------------


def test_a_chat_request_becomes_fusion_options():
    body = {
        **CHAT,
        "max_completion_tokens": 30,
        "stop": "\n\n",
        "workers": ["a", "b"],
        "aggregation": "robust",
        "repetition_guard": "steer",
        "rerank": True,
        "worker_weights": {"a": 2},
        "prompt_templates": {"b": "Q: {prompt}\nA:"},
        "segment_max_tokens": 8,
        "calibration": "pooled-a-b",
        "seed": 3,
        "user": "someone",
    }
    call = parse_chat(body)
    strategy = fusion_strategy("robust", "steer", {"a": 2.0}, {"b": "Q: {prompt}\nA:"}, "pooled-a-b")
    expected = FuseOptions(("a", "b"), 30, ("\n\n",), 8, rerank=True, strategy=strategy, seed=3)
    assert call.options == expected and call.prompt == [{"role": "user", "content": "Hi"}]
    assert (call.stream, call.include_usage, call.prompt_param) == (False, False, "messages")


def test_messages_are_text_in_the_roles_the_workers_know():
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}], "name": "x"},
        {"role": "assistant", "content": None},
    ]
    assert parse_chat({**CHAT, "messages": messages}).prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one\ntwo"},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "tool", "content": "42"}, "messages[0].tool_call_id"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, "messages[0].tool_calls"),
        ({"role": "function", "content": "42", "name": "f"}, "messages[0].role"),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            "messages[0].content[0].type",
        ),
        ({"role": "wizard", "content": "hi"}, "messages[0].role"),
        ({"role": "user", "content": 7}, "messages[0].content"),
    ],
)
def test_messages_fusion_cannot_read_are_refused(message, param):
    assert refusal(parse_chat, {**CHAT, "messages": [message]}).param == param


def test_a_completion_takes_one_text_prompt_and_openais_default_length():
    call = parse_completion({"model": "m", "prompt": ["only one"]})
    assert (call.prompt, call.options.max_new_tokens, call.prompt_param) == ("only one", 16, "prompt")
    assert refusal(parse_completion, {"model": "m", "prompt": ["a", "b"]}).code == "unsupported_parameter"
    assert refusal(parse_completion, {"model": "m", "prompt": [1, 2, 3]}).param == "prompt"
    assert refusal(parse_completion, {"model": "m", "prompt": "x", "echo": True}).param == "echo"
    assert refusal(parse_completion, {"model": "m", "prompt": "x", "best_of": 2}).param == "best_of"
    assert refusal(parse_completion, {"model": "m", "prompt": "x", "suffix": "end"}).param == "suffix"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"min_p": 0.05}, "min_p"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 0}, "top_logprobs"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_what_fusion_cannot_honour_is_refused_by_name(extra, param):
    error = refusal(parse_chat, {**CHAT, **extra})
    assert (error.status, error.param, error.code) == (400, param, "unsupported_parameter")
    assert error.message.startswith(f"{param} is not supported: ")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 1.5}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": "seven"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": -3}, "seed"),
        ({"selection": "vote"}, "selection"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 10, "max_completion_tokens": 20}, "max_tokens"),
        ({"stop": [1]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"aggregation": "median"}, "aggregation"),
        ({"repetition_guard": "loop"}, "repetition_guard"),
        ({"rerank": 1}, "rerank"),
        ({"workers": "a,b"}, "workers"),
        ({"worker_weights": {"a": 0}}, "worker_weights"),
        ({"worker_weights": {"a": float("nan")}}, "worker_weights"),
        ({"prompt_templates": {"a": 1}}, "prompt_templates"),
        ({"segment_max_tokens": 0}, "segment_max_tokens"),
        ({"calibration": 3}, "calibration"),
        ({"model": ""}, "model"),
        ({"messages": []}, "messages"),
    ],
)
def test_malformed_fields_are_named(extra, param):
    error = refusal(parse_chat, {**CHAT, **extra})
    assert (error.status, error.param) == (400, param)


def test_greedy_settings_and_unknown_fields_pass():
    body = {**CHAT, "n": 1, "temperature": 0.0, "top_p": 1, "logprobs": False, "tool_choice": "none", "anything": 1}
    assert parse_chat({**body, "response_format": {"type": "text"}, "stream": True}).stream


def test_stream_options_ask_for_usage():
    assert parse_chat({**CHAT, "stream": True, "stream_options": {"include_usage": True}}).include_usage


def test_the_model_picks_the_workers():
    call = parse_chat({**CHAT, "model": "bpe"})
    assert bind_model(call, "coolfusion", is_worker=True).workers == ("bpe",)
    assert bind_model(parse_chat({**CHAT, "workers": ["a"]}), "coolfusion", is_worker=False).workers == ("a",)
    with pytest.raises(ApiError) as missing:
        bind_model(parse_chat({**CHAT, "model": "gpt-4"}), "coolfusion", is_worker=False)
    assert (missing.value.status, missing.value.code, missing.value.param) == (404, "model_not_found", "model")
    with pytest.raises(ApiError) as both:
        bind_model(parse_chat({**CHAT, "model": "bpe", "workers": ["bpe", "char"]}), "coolfusion", is_worker=True)
    assert both.value.param == "workers"


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_orchestrator_statuses_map_to_http(code, status):
    error = from_orchestrator(CoolfusionError(code, "details"), "messages")
    assert error.status == status and "details" in error.message
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("details", "param"),
    [
        ("max_new_tokens is 5000; it must be in [1, 4096] (0 for the default 256)", "max_tokens"),
        ("each stop string must be 1-64 characters", "stop"),
        ("unknown workers: x; registered: a, b", "workers"),
        ("worker_weights['a'] is 0.0; it must be in (0, 1e+06]", "worker_weights"),
        ("prompt is 70000 characters; the limit is 65536", "prompt"),
        ("every worker refused the request: a: INVALID_ARGUMENT: context too long", None),
    ],
)
def test_the_orchestrators_field_names_become_openais(details, param):
    assert from_orchestrator(CoolfusionError(grpc.StatusCode.INVALID_ARGUMENT, details), "prompt").param == param


# ---- streaming ----------------------------------------------------------------------------------


def test_the_hold_covers_the_repetition_guard_and_the_longest_stop_string():
    assert REPEAT_HOLD_CHARS == MIN_REPEAT_CHARS - 1
    off = fusion_strategy(repetition_guard="off")
    assert hold_chars(FuseOptions()) == REPEAT_HOLD_CHARS  # the orchestrator's default may guard
    assert hold_chars(FuseOptions(strategy=off)) == 0
    assert hold_chars(FuseOptions(stop=("ab", "x" * 40), strategy=off)) == 39
    assert hold_chars(FuseOptions(stop=("x" * 64,))) == 63
    assert hold_chars(FuseOptions(rerank=True, strategy=off)) is None


def loop_rules(segments: list[str], stops: tuple[str, ...], guard: bool) -> tuple[str, list[str]]:
    """The answer the fusion loop's stop rules leave (docs/design.md 2.6 and 3.3), and the segments
    announced before it ended (a step event comes before its segment's append)."""
    text, announced = "", []
    longest = max((len(s) for s in stops), default=0)
    for segment in segments:
        announced.append(segment)
        previous, text = len(text), text + segment
        hits = [at for s in stops if (at := text.find(s, max(0, previous - longest + 1))) >= 0]
        if hits:
            return text[: min(hits)], announced
        if guard and (start := repeated_tail(text)) is not None:
            return text[:start], announced
    return text, announced


@given(
    segments=st.lists(st.text("ab ", min_size=1, max_size=7), max_size=80),
    stops=st.lists(st.text("ab ", min_size=1, max_size=6), max_size=3),
    guard=st.booleans(),
)
def test_streamed_text_is_always_the_start_of_the_final_text(segments, stops, guard):
    final, announced = loop_rules(segments, tuple(stops), guard)
    strategy = fusion_strategy(repetition_guard="stop" if guard else "off")
    text = held_back_text(FuseOptions(stop=tuple(stops), strategy=strategy))
    released = "".join(text.add(segment) for segment in announced)
    assert final.startswith(released)
    assert released + text.finish(final) == final


def test_a_one_character_stop_string_holds_back_the_newest_segment_only():
    text = held_back_text(FuseOptions(stop=("!",), strategy=fusion_strategy(repetition_guard="off")))
    assert [text.add(s) for s in ("a", " b", " c")] == ["", "a", " b"]
    assert text.finish("a b c") == " c"


def test_without_stop_rules_every_segment_streams_at_once():
    text = held_back_text(FuseOptions(strategy=fusion_strategy(repetition_guard="off")))
    assert [text.add(s) for s in ("a", " b", " c")] == ["a", " b", " c"]
    assert text.finish("a b c") == ""


def test_cool_r_streams_only_the_final_answer():
    text = held_back_text(FuseOptions(rerank=True, strategy=fusion_strategy(repetition_guard="off")))
    assert text.add("fused ") == text.add("text") == ""
    assert text.finish("a solo answer") == "a solo answer"


def test_strategy_field_is_the_proto():
    assert isinstance(parse_chat(CHAT).options.strategy, orchestrator_pb2.FusionStrategy)


# ---- structured output and tools ------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_response_formats_become_constraints():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    described = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    constraint = parse_chat({**CHAT, "response_format": described}).options.constraint
    assert constraint.kind == worker_pb2.CONSTRAINT_KIND_JSON_SCHEMA and json.loads(constraint.definition) == schema
    loose = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert parse_chat({**CHAT, "response_format": loose}).options.constraint == constraint  # strict or not
    json_mode = parse_chat({**CHAT, "response_format": {"type": "json_object"}}).options.constraint
    assert json_mode.kind == worker_pb2.CONSTRAINT_KIND_JSON_OBJECT
    assert parse_chat({**CHAT, "response_format": {"type": "text"}}).options.constraint is None
    assert parse_completion({"model": "m", "prompt": "x", "response_format": described}).options.constraint is not None


@pytest.mark.parametrize(
    "response_format",
    [{"type": "yaml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": [1]}}, "json"],
)
def test_malformed_response_formats_are_refused(response_format):
    assert refusal(parse_chat, {**CHAT, "response_format": response_format}).param == "response_format"


def test_tools_tool_choice_and_tool_turns_pass_to_the_fusion():
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "4 C"},
    ]
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = {**CHAT, "messages": messages, "tools": [WEATHER], "tool_choice": named, "parallel_tool_calls": False}
    call = parse_chat(body)
    assert call.options.tools == (WEATHER,) and call.options.tool_choice == named
    assert call.options.parallel_tool_calls is False
    assert call.prompt[1]["tool_calls"] == messages[1]["tool_calls"] and call.prompt[2]["tool_call_id"] == "c1"
    assert parse_chat({**CHAT, "tools": [WEATHER]}).options.parallel_tool_calls is None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": {"type": "function"}}, "tools"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools[0].function"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": {"type": "function"}}, "tool_choice"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_malformed_tools_are_refused_by_name(extra, param):
    assert refusal(parse_chat, {**CHAT, **extra}).param == param


def test_tools_belong_to_chat_completions():
    body = {"model": "m", "prompt": "x", "tools": [WEATHER]}
    assert refusal(parse_completion, body).param == "tools"


def test_an_answer_that_may_call_tools_is_held_until_its_end():
    assert hold_chars(FuseOptions(tools=(WEATHER,))) is None
    assert hold_chars(FuseOptions(tools=(WEATHER,), tool_choice="none")) == REPEAT_HOLD_CHARS


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ("constraint: json_schema does not compile: Unknown format: colour", "response_format"),
        ("prompt.chat.tools[0].parameters: ...", "tools"),
        ("tool_choice.function_name 'f' is not among the offered tools", "tool_choice"),
        ("prompt.chat.messages[2]: tool_call_id 'x' answers no earlier tool call", "messages"),
    ],
)
def test_the_orchestrators_structured_refusals_name_the_openai_field(message, param):
    error = from_orchestrator(CoolfusionError(grpc.StatusCode.INVALID_ARGUMENT, message), "messages")
    assert (error.status, error.param) == (400, param)


def test_sampling_fields_become_fusion_options():
    body = {**CHAT, "temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 123, "n": 3, "selection": "sample"}
    options = parse_chat(body).options
    assert (options.temperature, options.top_p, options.top_k, options.seed, options.n) == (0.8, 0.9, 40, 123, 3)
    assert options.selection == "sample"
    greedy = parse_completion({"model": "m", "prompt": "x"}).options
    assert (greedy.temperature, greedy.top_p, greedy.top_k, greedy.seed, greedy.n) == (0.0, 0.0, 0, None, 0)


def test_each_choice_streams_its_own_text_held_back_alike():
    """The hold of 8.3 applies to every choice: choices interleave, each with its own text."""
    options = FuseOptions(n=2, stop=("!",), strategy=fusion_strategy(repetition_guard="off"))
    texts = [held_back_text(options), held_back_text(options)]
    assert texts[0].add("Hello") == "" and texts[1].add("Bye") == ""
    assert texts[0].add(" there") == "Hello" and texts[1].finish("Bye now") == "Bye now"
