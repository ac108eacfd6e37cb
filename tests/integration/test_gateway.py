"""The OpenAI-compatible gateway, called with the official openai SDK: real processes on loopback."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request

import jsonschema
import openai
import pytest

from coolfusion.cli.cluster import gateway_argv, launch, stop_processes, wait_ready
from coolfusion.client import FuseOptions, FusionClient, fusion_strategy, json_schema
from coolfusion.constraints import Constraint, ConstraintKind, TextMatcher
from coolfusion.v1 import worker_pb2

from worker_probes import open_sessions, wait_for_no_sessions

FAMILIES = ("bpe", "metaspace", "char")
TOKENS = ("rotated-out-token", "current-token")  # two lines: both accepted during a rotation
MESSAGES = [{"role": "user", "content": "What is 100 minus 37?"}]
TEXT = "Tom has 3 apples and buys 4 more."
LOOPING = "a b a b a b a b a b a b"  # the metaspace model loops after it (see test_fusion_service.py)
FINISH = {
    worker_pb2.FINISH_REASON_EOS: "stop",
    worker_pb2.FINISH_REASON_STOP: "stop",
    worker_pb2.FINISH_REASON_REPETITION: "stop",
    worker_pb2.FINISH_REASON_LENGTH: "length",
}
NO_GUARD = fusion_strategy(repetition_guard="off")
# Loopback only: clients that ignore any proxy configured in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def gateway(tiny_trio, tmp_path_factory):
    """The gateway's base URL (…/v1), its metrics port and its token file."""
    token_file = tmp_path_factory.mktemp("secrets") / "tokens"
    token_file.write_text("\n".join(TOKENS) + "\n")
    argv = gateway_argv(tiny_trio.address, extra=["--auth-token-file", str(token_file), "--metrics-port", "0"])
    process = wait_ready(launch("gateway", argv), 60)
    try:
        metrics_port = next(int(m[1]) for line in process.log_lines if (m := re.search(r"metrics on \S+:(\d+)", line)))
        yield f"http://{process.address}/v1", metrics_port, token_file
    finally:
        stop_processes([process])


def sdk(base_url: str, api_key: str = TOKENS[1]) -> openai.OpenAI:
    """The official client, without retries (a refusal must surface at once) and without proxies."""
    http = openai.DefaultHttpxClient(trust_env=False)
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120, http_client=http)


@pytest.fixture(scope="module")
def client(gateway):
    with sdk(gateway[0]) as running:
        yield running


@pytest.fixture(scope="module")
def fusion(tiny_trio):
    with FusionClient(tiny_trio.address, timeout_s=120) as running:
        yield running


def content(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def usage_of(result) -> tuple[int, int]:
    return result.usage.prompt_tokens, result.usage.completion_tokens


# ---- models -------------------------------------------------------------------------------------


def test_models_are_the_fusion_then_each_worker(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["coolfusion", *FAMILIES]
    assert all(m.object == "model" and m.owned_by == "coolfusion" and m.created > 0 for m in models)
    assert models[0].model_extra["workers"] == list(FAMILIES)
    assert client.models.retrieve("char").id == "char"


# ---- answers equal Fuse's -----------------------------------------------------------------------


def test_chat_completion_equals_fuse(client, fusion):
    completion = client.chat.completions.create(model="coolfusion", messages=MESSAGES, max_tokens=24)
    expected = fusion.fuse(MESSAGES, FuseOptions(max_new_tokens=24))
    [choice] = completion.choices
    assert (choice.message.role, choice.message.content) == ("assistant", expected.text)
    assert choice.finish_reason == FINISH[expected.finish_reason]
    assert usage_of(completion) == usage_of(expected) and completion.usage.total_tokens == sum(usage_of(expected))
    assert completion.id.startswith("chatcmpl-") and completion.model == "coolfusion"
    assert completion.model_extra["coolfusion"]["usage_counted_by"] == FAMILIES[0]


def test_completion_equals_fuse_of_plain_text_with_openais_default_length(client, fusion):
    completion = client.completions.create(model="coolfusion", prompt=TEXT)
    expected = fusion.fuse(TEXT, FuseOptions(max_new_tokens=16))
    assert completion.choices[0].text == expected.text and completion.object == "text_completion"
    assert usage_of(completion) == usage_of(expected)


def test_max_completion_tokens_is_max_tokens(client, fusion):
    completion = client.chat.completions.create(model="coolfusion", messages=MESSAGES, max_completion_tokens=12)
    assert completion.choices[0].message.content == fusion.fuse(MESSAGES, FuseOptions(max_new_tokens=12)).text


def test_a_worker_model_is_that_workers_own_answer(client, fusion):
    completion = client.completions.create(model="metaspace", prompt=TEXT, max_tokens=20)
    expected = fusion.fuse(TEXT, FuseOptions(workers=("metaspace",), max_new_tokens=20))
    assert completion.choices[0].text == expected.text and completion.model == "metaspace"
    assert usage_of(completion) == usage_of(expected)


def test_fusion_options_through_extra_body(client, fusion):
    extra = {
        "workers": ["char", "bpe"],
        "aggregation": "ppl_mean",
        "repetition_guard": "off",
        "worker_weights": {"bpe": 2.0},
    }
    completion = client.chat.completions.create(model="coolfusion", messages=MESSAGES, max_tokens=24, extra_body=extra)
    strategy = fusion_strategy("ppl_mean", "off", {"bpe": 2.0})
    expected = fusion.fuse(MESSAGES, FuseOptions(workers=("char", "bpe"), max_new_tokens=24, strategy=strategy))
    assert completion.choices[0].message.content == expected.text
    assert [s["worker"] for s in completion.model_extra["coolfusion"]["shares"]] == ["char", "bpe"]


def test_cool_r_through_extra_body(client, fusion):
    completion = client.completions.create(model="coolfusion", prompt=TEXT, max_tokens=12, extra_body={"rerank": True})
    expected = fusion.fuse(TEXT, FuseOptions(max_new_tokens=12, rerank=True))
    assert completion.choices[0].text == expected.text
    assert completion.model_extra["coolfusion"]["source"] == expected.source
    stream = client.completions.create(
        model="coolfusion", prompt=TEXT, max_tokens=12, stream=True, extra_body={"rerank": True}
    )
    assert "".join(c.choices[0].text for c in stream) == expected.text


# ---- streaming ----------------------------------------------------------------------------------


def test_streamed_chat_equals_the_whole_answer_with_usage_last(client):
    whole = client.chat.completions.create(model="coolfusion", messages=MESSAGES, max_tokens=40)
    chunks = list(
        client.chat.completions.create(
            model="coolfusion", messages=MESSAGES, max_tokens=40, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert content(chunks) == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "one chunk per segment"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and usage_of(chunks[-1]) == usage_of(whole)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_streamed_completion_without_usage(client):
    whole = client.completions.create(model="coolfusion", prompt=TEXT, max_tokens=30)
    chunks = list(client.completions.create(model="coolfusion", prompt=TEXT, max_tokens=30, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


def test_the_stream_is_server_sent_events_ending_with_done(gateway):
    body = {"model": "coolfusion", "prompt": TEXT, "max_tokens": 8, "stream": True}
    status, headers, text = post(gateway[0] + "/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


@pytest.mark.parametrize("where", ["inside", "across"])
def test_stop_strings_streamed_and_not_give_fuses_text(client, fusion, where):
    free = fusion.fuse(TEXT, FuseOptions(max_new_tokens=40, trace=True, strategy=NO_GUARD))
    text, trace = free.text, free.trace
    joins = {sum(len(s.candidates[s.winner_index].text) for s in trace[: k + 1]) for k in range(len(trace))}
    starts = [i for i in range(len(text) // 3, len(text) - 2) if text.find(text[i : i + 3]) == i]
    at = next(i for i in starts if ((i + 1 in joins or i + 2 in joins) == (where == "across")))
    stop = [text[at : at + 3], "never appears"]
    expected = fusion.fuse(TEXT, FuseOptions(max_new_tokens=40, stop=tuple(stop), strategy=NO_GUARD))
    assert expected.text == text[:at] and expected.finish_reason == worker_pb2.FINISH_REASON_STOP
    # Without the repetition guard, streaming holds back only what a stop string could still cut.
    request = {
        "model": "coolfusion",
        "prompt": TEXT,
        "max_tokens": 40,
        "stop": stop,
        "extra_body": {"repetition_guard": "off"},
    }
    whole = client.completions.create(**request)
    chunks = list(client.completions.create(**request, stream=True))
    assert whole.choices[0].text == "".join(c.choices[0].text for c in chunks) == expected.text
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "stop"
    assert usage_of(whole) == usage_of(expected)


def test_a_repetition_cut_streams_only_what_the_answer_keeps(client, fusion):
    extra = {"repetition_guard": "stop"}
    expected = fusion.fuse(LOOPING, FuseOptions(workers=("metaspace",), max_new_tokens=100))
    assert expected.finish_reason == worker_pb2.FINISH_REASON_REPETITION
    stream = client.completions.create(model="metaspace", prompt=LOOPING, max_tokens=100, stream=True, extra_body=extra)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len([c for c in chunks if c.choices[0].text]) > 1


def test_a_client_that_drops_a_stream_cancels_the_fusion(client, tiny_trio, gateway):
    # Without the repetition guard and with the longest length allowed, the fusion would run on for
    # far longer than the test waits.
    stream = client.chat.completions.create(
        model="coolfusion", messages=MESSAGES, max_tokens=4096, stream=True, extra_body={"repetition_guard": "off"}
    )
    role, text = next(stream), next(stream)
    assert role.choices[0].delta.role == "assistant" and text.choices[0].delta.content
    workers = list(tiny_trio.workers.values())
    assert all(open_sessions(workers)), "the fusion is running"
    stream.close()
    assert wait_for_no_sessions(workers, timeout_s=5) == [0] * len(FAMILIES)
    assert scrape(gateway[1]).get("coolfusion_gateway_client_disconnects_total", 0) >= 1


def test_a_client_that_leaves_before_a_whole_answer_cancels_the_fusion(tiny_trio, gateway):
    body = json.dumps({"model": "coolfusion", "prompt": TEXT, "max_tokens": 4096, "repetition_guard": "off"}).encode()
    host, port = gateway[0].removeprefix("http://").removesuffix("/v1").split(":")
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKENS[1]}\r\n"
    workers = list(tiny_trio.workers.values())
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while not all(open_sessions(workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(open_sessions(workers)), "the fusion is running"
    assert wait_for_no_sessions(workers, timeout_s=5) == [0] * len(FAMILIES)


# ---- refusals and errors ------------------------------------------------------------------------


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert raised.value.code == "model_not_found" and raised.value.param == "model" and "gpt-4o" in raised.value.message


REFUSED = [
    ("chat", {"presence_penalty": 0.5}, "presence_penalty"),
    ("chat", {"logit_bias": {"1": -100}}, "logit_bias"),
    ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"top_logprobs": 2, "logprobs": False}, "top_logprobs"),
    ("chat", {"functions": [{"name": "add", "parameters": {}}]}, "functions"),
    ("text", {"frequency_penalty": 1.0}, "frequency_penalty"),
    ("text", {"best_of": 2}, "best_of"),
    ("text", {"logprobs": 1}, "logprobs"),
]


@pytest.mark.parametrize(("kind", "params", "field"), REFUSED, ids=[f"{k}-{f}" for k, _, f in REFUSED])
def test_what_fusion_cannot_honour_is_refused(client, kind, params, field):
    with pytest.raises(openai.BadRequestError) as raised:
        if kind == "chat":
            client.chat.completions.create(model="coolfusion", messages=MESSAGES, max_tokens=4, **params)
        else:
            client.completions.create(model="coolfusion", prompt=TEXT, max_tokens=4, **params)
    error = raised.value
    assert (error.param, error.code) == (field, "unsupported_parameter") and field in error.message


def test_greedy_values_of_sampling_parameters_are_accepted(client, fusion):
    greedy = {"n": 1, "temperature": 0, "top_p": 1, "logprobs": False, "seed": 7, "tools": [], "tool_choice": "none"}
    completion = client.chat.completions.create(model="coolfusion", messages=MESSAGES, max_tokens=8, **greedy)
    assert completion.choices[0].message.content == fusion.fuse(MESSAGES, FuseOptions(max_new_tokens=8)).text


BAD = [
    ({"extra_body": {"aggregation": "median"}}, "aggregation"),
    ({"extra_body": {"workers": ["bpe", "nobody"]}}, "workers"),
    ({"extra_body": {"worker_weights": {"bpe": -1}}}, "worker_weights"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"stop": ["x" * 65]}, "stop"),
    ({"max_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize(("params", "field"), BAD, ids=[f for _, f in BAD])
def test_bad_values_name_their_field(client, params, field):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="coolfusion", messages=MESSAGES, **params)
    assert raised.value.param == field


def test_a_worker_model_with_other_workers_is_refused(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="bpe", prompt=TEXT, extra_body={"workers": ["char"]})
    assert raised.value.param == "workers"


def test_a_missing_token_is_refused(client):
    with pytest.raises(openai.AuthenticationError) as raised:
        client.models.list(extra_headers={"Authorization": openai.omit})
    assert raised.value.code == "missing_api_key" and "Authorization: Bearer" in raised.value.message


def test_a_wrong_token_is_refused(gateway):
    with sdk(gateway[0], "wrong-token") as unauthorised, pytest.raises(openai.AuthenticationError) as raised:
        unauthorised.chat.completions.create(model="coolfusion", messages=MESSAGES)
    assert raised.value.code == "invalid_api_key" and "token" in raised.value.message


def test_every_token_of_the_file_is_accepted(gateway):
    with sdk(gateway[0], TOKENS[0]) as old:
        assert old.models.list().data


def test_a_body_over_the_limit_is_refused_before_it_is_parsed(client):
    with pytest.raises(openai.APIStatusError) as raised:
        client.completions.create(model="coolfusion", prompt="x" * (1 << 20))
    assert raised.value.status_code == 413 and type(raised.value) is openai.APIStatusError
    assert raised.value.code == "request_too_large" and "--max-body-bytes" in raised.value.message


def test_errors_have_openais_shape_and_a_request_id(gateway):
    status, headers, text = post(gateway[0] + "/chat/completions", {"model": "coolfusion"})
    assert status == 400 and headers["x-request-id"]
    assert json.loads(text) == {
        "error": {
            "message": "messages is required",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "missing_required_parameter",
        }
    }
    status, _, text = post(gateway[0] + "/chat/completions", b"{not json")
    assert status == 400 and json.loads(text)["error"]["code"] == "invalid_json"
    status, _, text = post(gateway[0] + "/embeddings", {"model": "coolfusion", "input": "x"})
    assert status == 404 and json.loads(text)["error"]["code"] == "not_found"


# ---- operations ---------------------------------------------------------------------------------


def test_health_needs_no_token_and_readiness_follows_the_orchestrator(gateway):
    root = gateway[0].removesuffix("/v1")
    assert get(root + "/health") == (200, {"status": "ok"})
    assert get(root + "/health/ready") == (200, {"status": "ready"})
    assert get(gateway[0] + "/models")[0] == 401


def test_a_callers_request_id_is_kept(client):
    response = client.chat.completions.with_raw_response.create(
        model="coolfusion", messages=MESSAGES, max_tokens=4, extra_headers={"X-Request-Id": "trace-42"}
    )
    assert response.headers["x-request-id"] == "trace-42" and response.parse().id == "chatcmpl-trace-42"


def test_metrics_count_requests_and_tokens(client, gateway):
    completion = client.completions.create(model="coolfusion", prompt=TEXT, max_tokens=6)
    samples = scrape(gateway[1])
    route = ("coolfusion_gateway_requests_total", (("method", "POST"), ("route", "/v1/completions"), ("status", "200")))
    assert samples.get(route, 0) >= 1
    assert samples[("coolfusion_gateway_tokens_total", (("kind", "completion"),))] >= completion.usage.completion_tokens


def test_readiness_fails_without_an_orchestrator(tmp_path):
    process = wait_ready(launch("lonely-gateway", gateway_argv("127.0.0.1:1")), 60)
    try:
        assert get(f"http://{process.address}/health")[0] == 200
        assert get(f"http://{process.address}/health/ready")[0] == 503
        with sdk(f"http://{process.address}/v1") as unreachable, pytest.raises(openai.InternalServerError) as raised:
            unreachable.completions.create(model="coolfusion", prompt=TEXT)
        assert raised.value.status_code == 503 and raised.value.code == "unavailable"
    finally:
        stop_processes([process])


# ---- helpers ------------------------------------------------------------------------------------


def post(url: str, body: dict | bytes) -> tuple[int, dict[str, str], str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Authorization": f"Bearer {TOKENS[1]}"}, method="POST")
    return _open(request)


def get(url: str) -> tuple[int, dict]:
    status, _, text = _open(urllib.request.Request(url))
    return status, json.loads(text)


def _open(request: urllib.request.Request) -> tuple[int, dict[str, str], str]:
    try:
        with _DIRECT.open(request, timeout=60) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read().decode()


def scrape(port: int) -> dict:
    """Every sample of a Prometheus endpoint, by name, or by (name, sorted label pairs) when labelled."""
    with _DIRECT.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict = {}
    for line in text.splitlines():
        if match := re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line):
            name, labels, value = match.groups()
            pairs = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', labels or "")))
            samples[(name, pairs) if pairs else name] = float(value)
    return samples


def test_the_gateway_stops_cleanly_on_sigterm(tiny_trio):
    process = wait_ready(launch("short-lived-gateway", gateway_argv(tiny_trio.address)), 60)
    started = time.monotonic()
    stop_processes([process])
    assert process.process.returncode == 0 and time.monotonic() - started < 10


# ---- other clients people point at an OpenAI-compatible server ---------------------------------


def chat_model(base_url: str, max_tokens: int):
    """LangChain's ChatOpenAI as its users configure it for a self-hosted server: greedy, no retries."""
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model="coolfusion", base_url=base_url, api_key=TOKENS[1], temperature=0, max_tokens=max_tokens,
        max_retries=0, timeout=120,
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )  # fmt: skip


def test_langchain_chat_openai_invoke_stream_and_batch_equal_fuse(gateway, fusion):
    llm = chat_model(gateway[0], max_tokens=24)
    expected = fusion.fuse(MESSAGES, FuseOptions(max_new_tokens=24))
    question = MESSAGES[0]["content"]
    answer = llm.invoke(question)
    assert answer.content == expected.text
    assert (answer.usage_metadata["input_tokens"], answer.usage_metadata["output_tokens"]) == usage_of(expected)
    assert "".join(chunk.content for chunk in llm.stream(question)) == expected.text
    other = [{"role": "user", "content": "Name a colour."}]
    answers = llm.batch([question, other[0]["content"]])
    assert [a.content for a in answers] == [expected.text, fusion.fuse(other, FuseOptions(max_new_tokens=24)).text]


def litellm_module():
    # LiteLLM fetches its model price list from the network when imported, unless told not to.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    return litellm


def test_litellm_completion_and_stream_equal_fuse(gateway, fusion):
    litellm = litellm_module()
    expected = fusion.fuse(MESSAGES, FuseOptions(max_new_tokens=24))
    call = {"model": "openai/coolfusion", "api_base": gateway[0], "api_key": TOKENS[1], "messages": MESSAGES}
    answer = litellm.completion(**call, max_tokens=24, temperature=0, num_retries=0)
    assert answer.choices[0].message.content == expected.text
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == usage_of(expected)
    chunks = litellm.completion(**call, max_tokens=24, temperature=0, num_retries=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected.text


def test_the_responses_api_is_a_404_naming_chat_completions(client):
    with pytest.raises(openai.NotFoundError) as refused:
        client.responses.create(model="coolfusion", input="What is 100 minus 37?")
    assert "POST /v1/chat/completions" in refused.value.message
    assert refused.value.code == "unsupported_endpoint"
    with pytest.raises(openai.NotFoundError, match="/v1/chat/completions"):
        client.responses.retrieve("resp_123")


def test_a_rotated_token_file_is_read_again_without_a_restart(gateway):
    url, _, token_file = gateway
    original = token_file.read_text()
    fresh = token_file.with_name("tokens.new")
    try:
        fresh.write_text("rotated-in-token\n")
        os.replace(fresh, token_file)  # as a Kubernetes Secret volume updates
        with sdk(url, "rotated-in-token") as rotated:
            assert rotated.models.list().data
        with sdk(url, TOKENS[1]) as old, pytest.raises(openai.AuthenticationError):
            old.models.list()
    finally:
        fresh.write_text(original)
        os.replace(fresh, token_file)
    with sdk(url, TOKENS[1]) as restored:
        assert restored.models.list().data


# ---- structured output and tools (docs/http-api.md) ---------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
NAMED = {"type": "function", "function": {"name": "get_time"}}


def test_a_json_schema_response_format_gives_json_valid_against_it(client, fusion):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    answer = client.chat.completions.create(
        model="coolfusion", messages=MESSAGES, max_tokens=64, response_format=response_format
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)
    assert answer.choices[0].finish_reason == "stop"
    assert (
        answer.choices[0].message.content
        == fusion.fuse(MESSAGES, FuseOptions(max_new_tokens=64, constraint=json_schema(PERSON))).text
    )


def test_json_mode_gives_a_json_object_or_its_beginning_when_cut(client):
    answer = client.chat.completions.create(
        model="coolfusion", messages=MESSAGES, max_tokens=64, response_format={"type": "json_object"}
    )
    text = answer.choices[0].message.content
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # the tiny models write one long key: cut by the cap, still a valid beginning
        assert answer.choices[0].finish_reason == "length" and text.startswith('{"')
        assert TextMatcher.of(Constraint(ConstraintKind.JSON_OBJECT)).allows(text) is None


@pytest.mark.parametrize(
    ("choice", "names"), [("required", {"get_weather", "get_time"}), (NAMED, {"get_time"})], ids=["required", "named"]
)
def test_tool_choice_that_must_call_returns_tool_calls(client, choice, names):
    answer = client.chat.completions.create(
        model="coolfusion", messages=ASK, max_tokens=64, tools=[WEATHER, CLOCK], tool_choice=choice,
        parallel_tool_calls=False,
    )  # fmt: skip
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls" and message.content is None
    [call] = message.tool_calls  # parallel_tool_calls=False: one call
    assert call.type == "function" and call.function.name in names and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments), dict)


def test_tool_choice_none_answers_in_text_and_auto_in_either(client, fusion):
    none = client.chat.completions.create(
        model="coolfusion", messages=ASK, max_tokens=16, tools=[WEATHER], tool_choice="none"
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    auto = client.chat.completions.create(model="coolfusion", messages=ASK, max_tokens=64, tools=[WEATHER])
    options = FuseOptions(max_new_tokens=64, tools=(WEATHER,))
    expected = fusion.fuse(ASK, options)
    if expected.tool_calls:
        assert [c.function.name for c in auto.choices[0].message.tool_calls] == [c.name for c in expected.tool_calls]
    else:
        assert auto.choices[0].message.content == expected.text


def test_streamed_tool_calls_read_like_openais(client):
    """The SDK's stream helper accumulates the tool_calls deltas into the final message."""
    with client.chat.completions.stream(
        model="coolfusion", messages=ASK, max_tokens=64, tools=[WEATHER, CLOCK], tool_choice=NAMED
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    [call] = final.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}


def test_a_conversation_with_a_tool_result_continues_in_text(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    turns = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 C, rain"},
    ]
    answer = client.chat.completions.create(
        model="coolfusion", messages=turns, max_tokens=16, tools=[WEATHER], tool_choice="none"
    )
    assert answer.choices[0].message.content


STRUCTURED_REFUSALS = [
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}},
            }
        },
        "response_format",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "("}},
            }
        },
        "response_format",
    ),
    ({"tools": [{"type": "function", "function": {"name": "bad name", "parameters": {}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nothing"}}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_moon"}}}, "tool_choice"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "4 C"}]}, "messages"),
]


@pytest.mark.parametrize(
    ("params", "field"), STRUCTURED_REFUSALS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(STRUCTURED_REFUSALS)]
)
def test_malformed_schemas_and_tools_are_refused_at_once_naming_the_field(client, tiny_trio, params, field):
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="coolfusion", **{"messages": ASK, "max_tokens": 8, **params})
    # Refused before any worker is asked: far less than one model step. 5 s is a bound for a busy
    # CI machine, not a measurement (it takes milliseconds).
    assert time.monotonic() - started < 5
    assert raised.value.param == field
    assert open_sessions(tiny_trio.workers.values()) == [0, 0, 0]


def test_langchain_structured_output_by_json_schema_and_by_function_calling(gateway):
    llm = chat_model(gateway[0], max_tokens=64)
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output({"title": "Person", **PERSON}, method=method, include_raw=True)
        out = person.invoke("Describe a person.")
        assert out["parsing_error"] is None
        jsonschema.validate(out["parsed"], PERSON)


def test_langchain_bind_tools(gateway):
    llm = chat_model(gateway[0], max_tokens=64).bind_tools([WEATHER, CLOCK], tool_choice="get_time")
    message = llm.invoke("What time is it?")
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert [(call["name"], call["args"]) for call in message.tool_calls] == [("get_time", {})]


def test_litellm_response_format_and_tools(gateway):
    litellm = litellm_module()
    call = {
        "model": "openai/coolfusion",
        "api_base": gateway[0],
        "api_key": TOKENS[1],
        "num_retries": 0,
        "max_tokens": 64,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    answer = litellm.completion(**call, messages=MESSAGES, response_format=response_format)
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)
    called = litellm.completion(**call, messages=ASK, tools=[WEATHER, CLOCK], tool_choice=NAMED)
    assert called.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in called.choices[0].message.tool_calls] == ["get_time"]
