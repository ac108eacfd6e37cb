"""The promises of coolfusion.v1.WorkerService, checked over gRPC against any worker address.

Only the generated stubs, grpc.health.v1 and server reflection are used: nothing here knows how
the worker is implemented. Each test names the promise (from worker.proto or docs/design.md sections 2 and 4)
it checks.
"""

from __future__ import annotations

import math
import random
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coolfusion.v1 import worker_pb2 as pb
from coolfusion.v1 import worker_pb2_grpc

from conformance_support import RPC_TIMEOUT_S, OpenSession, new_session_id

SERVICE = "coolfusion.v1.WorkerService"
PROMPTS = [
    "The weather today is",
    "Tom has 3 apples and",
    "Question: What is 12 plus 30?\nAnswer:",
    "Once upon a time",
    "Write a poem about the sea.",
]
CHAT = [("system", "You are a helpful assistant."), ("user", "What is 2 + 2?")]
# Text no language model would continue a prompt with.
JUNK = "zq#xv@@~~kj%$"
# The design's default token cap for a segment (worker.proto: max_tokens 0 means 16).
DEFAULT_SEGMENT_TOKENS = 16
# Requests with fields this large would be absurd to build; limits above it are not probed.
PROBE_CEILING = 4_000_000
UINT32_MAX = 2**32 - 1
BOUNDARY_INSIDE = re.compile(r"\S\s")

Stub = worker_pb2_grpc.WorkerServiceStub


# ---- helpers ----------------------------------------------------------------------------------


def generate(
    stub: Stub,
    session_id: str,
    expected: int,
    append_text: str = "",
    max_tokens: int = 0,
    stop_strings: tuple[str, ...] = (),
) -> pb.GenerateSegmentResponse:
    request = pb.GenerateSegmentRequest(
        session_id=session_id,
        expected_context_tokens=expected,
        append_text=append_text,
        max_tokens=max_tokens,
        stop_strings=list(stop_strings),
    )
    return stub.GenerateSegment(request, timeout=RPC_TIMEOUT_S)


def score(stub: Stub, session_id: str, expected: int, candidates: list[tuple[str, bool] | str]) -> pb.ScoreTextResponse:
    items = [c if isinstance(c, tuple) else (c, False) for c in candidates]
    request = pb.ScoreTextRequest(
        session_id=session_id,
        expected_context_tokens=expected,
        candidates=[pb.Candidate(text=t, ends_with_eos=e) for t, e in items],
    )
    return stub.ScoreText(request, timeout=RPC_TIMEOUT_S)


def open_count(stub: Stub) -> int:
    return stub.GetInfo(pb.GetInfoRequest(), timeout=RPC_TIMEOUT_S).load.open_sessions


def segment_tuple(r: pb.GenerateSegmentResponse) -> tuple:
    return (r.text, r.finish_reason, r.generated_tokens, r.context_tokens)


def expect_code(code: grpc.StatusCode, call, *args, **kwargs) -> grpc.RpcError:
    """Runs the call and asserts it fails with `code` and a non-empty details string."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    error = caught.value
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    assert error.details(), f"{code.name} without details"
    return error


def assert_valid_segment(r: pb.GenerateSegmentResponse, max_tokens: int) -> None:
    assert r.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert r.finish_reason in pb.FinishReason.values()
    assert 1 <= r.generated_tokens <= max_tokens, "a segment costs at least one token and at most the cap"
    if r.finish_reason == pb.FINISH_REASON_BOUNDARY:
        assert r.text.strip(), f"boundary segment {r.text!r} has no non-whitespace character"
        assert not r.text[-1].isspace(), f"boundary segment {r.text!r} ends with whitespace"
        assert not BOUNDARY_INSIDE.search(r.text), f"boundary segment {r.text!r} runs past a word boundary"


# ---- GetInfo, health, reflection --------------------------------------------------------------


def test_get_info_describes_the_worker(info: pb.GetInfoResponse) -> None:
    assert info.protocol_version == "coolfusion.v1"
    assert info.model_id
    assert info.tokenizer.vocab_size > 0
    assert info.tokenizer.eos_text, "eos_text must name the EOS token"
    limits = info.limits
    for field in pb.WorkerLimits.DESCRIPTOR.fields:
        assert getattr(limits, field.name) > 0, f"limits.{field.name} must be positive"
    assert limits.max_segment_tokens >= DEFAULT_SEGMENT_TOKENS, "max_tokens=0 (default 16) must be allowed"


def test_get_info_placement_shares_the_parameters_out(info: pb.GetInfoResponse) -> None:
    # Optional (empty when the worker cannot tell); when given, one entry per device, summing to 1.
    devices = [p.device for p in info.placement]
    assert all(devices) and len(devices) == len(set(devices)), f"placement devices {devices} must be distinct names"
    assert all(0 < p.parameter_share <= 1 for p in info.placement)
    if info.placement:
        assert sum(p.parameter_share for p in info.placement) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_reports_serving(channel: grpc.Channel, service: str) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_worker_service(channel: grpc.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    responses = list(reflection.ServerReflectionInfo(requests, timeout=RPC_TIMEOUT_S))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert SERVICE in names
    # A client that discovers the API by reflection must be able to fetch its descriptors too.
    requests = iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)])
    responses = list(reflection.ServerReflectionInfo(requests, timeout=RPC_TIMEOUT_S))
    assert responses[0].file_descriptor_response.file_descriptor_proto, "no descriptor for the service"


# ---- OpenSession ------------------------------------------------------------------------------


def test_open_session_with_empty_id_gets_a_worker_chosen_id(stub: Stub, open_session: OpenSession) -> None:
    first = open_session(PROMPTS[0], session_id="")
    second = open_session(PROMPTS[0], session_id="")
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", first.session_id), first.session_id
    assert first.session_id != second.session_id, "two opens with an empty id are two sessions"
    assert_valid_segment(generate(stub, first.session_id, first.context_tokens), DEFAULT_SEGMENT_TOKENS)


def test_open_session_with_caller_id_returns_that_id(open_session: OpenSession) -> None:
    session_id = new_session_id()
    assert open_session(PROMPTS[0], session_id=session_id).session_id == session_id


@pytest.mark.parametrize("answer_text", ["", " the quick brown fox"])
def test_open_session_is_idempotent_for_the_same_context(
    stub: Stub, open_session: OpenSession, answer_text: str
) -> None:
    session_id = new_session_id()
    before = open_count(stub)
    first = open_session(PROMPTS[1], session_id=session_id, answer_text=answer_text)
    after_first = open_count(stub)
    second = open_session(PROMPTS[1], session_id=session_id, answer_text=answer_text)
    after_second = open_count(stub)
    assert (second.session_id, second.prompt_tokens, second.context_tokens) == (
        first.session_id,
        first.prompt_tokens,
        first.context_tokens,
    )
    assert after_first == before + 1
    assert after_second == after_first, "re-opening the same id and context must not add a session"


def test_open_session_chat_is_idempotent(stub: Stub, open_session: OpenSession) -> None:
    session_id = new_session_id()
    first = open_session(chat=CHAT, session_id=session_id)
    second = open_session(chat=CHAT, session_id=session_id)
    assert (second.prompt_tokens, second.context_tokens) == (first.prompt_tokens, first.context_tokens)


@pytest.mark.parametrize(
    "other",
    [
        {"text": PROMPTS[2]},
        {"text": PROMPTS[1], "answer_text": " more"},
        {"chat": [("user", PROMPTS[1])]},
    ],
    ids=["other-prompt", "other-answer", "chat-instead-of-text"],
)
def test_open_session_same_id_other_context_is_already_exists(
    stub: Stub, open_session: OpenSession, other: dict
) -> None:
    session_id = new_session_id()
    opened = open_session(PROMPTS[1], session_id=session_id)
    expect_code(grpc.StatusCode.ALREADY_EXISTS, open_session, session_id=session_id, **other)
    # The existing session is untouched by the refused open.
    r = generate(stub, session_id, opened.context_tokens)
    assert r.context_tokens == opened.context_tokens


def test_open_session_counts_prompt_and_answer_tokens(open_session: OpenSession) -> None:
    bare = open_session(PROMPTS[0])
    assert 1 <= bare.prompt_tokens <= bare.context_tokens
    assert bare.prompt_tokens == bare.context_tokens, "no answer_text: the context is the prompt"
    with_answer = open_session(PROMPTS[0], answer_text=" the quick brown fox jumps")
    assert with_answer.prompt_tokens == bare.prompt_tokens
    assert with_answer.context_tokens > bare.context_tokens, "answer_text must grow the context"


def test_chat_prompt_opens_and_generates(stub: Stub, open_session: OpenSession) -> None:
    opened = open_session(chat=CHAT)
    assert 1 <= opened.prompt_tokens <= opened.context_tokens
    r = generate(stub, opened.session_id, opened.context_tokens)
    assert_valid_segment(r, DEFAULT_SEGMENT_TOKENS)
    assert r.context_tokens == opened.context_tokens
    # The rendered chat is longer than any one of its turns alone.
    alone = open_session(CHAT[-1][1])
    assert opened.prompt_tokens > alone.prompt_tokens


# ---- GenerateSegment --------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_segment_is_well_formed(stub: Stub, open_session: OpenSession, prompt: str) -> None:
    opened = open_session(prompt)
    r = generate(stub, opened.session_id, opened.context_tokens)
    assert_valid_segment(r, DEFAULT_SEGMENT_TOKENS)
    assert r.context_tokens == opened.context_tokens, "nothing appended: the context is the opened one"


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 16])
def test_segment_respects_max_tokens(stub: Stub, open_session: OpenSession, max_tokens: int) -> None:
    for prompt in PROMPTS[:3]:
        opened = open_session(prompt)
        r = generate(stub, opened.session_id, opened.context_tokens, max_tokens=max_tokens)
        assert_valid_segment(r, max_tokens)
        if max_tokens == 1:
            assert r.generated_tokens == 1
        if r.finish_reason == pb.FINISH_REASON_LENGTH:
            assert r.generated_tokens == max_tokens, "LENGTH means the cap was reached"


def test_segment_at_the_largest_allowed_cap(stub: Stub, info: pb.GetInfoResponse, open_session: OpenSession) -> None:
    opened = open_session(PROMPTS[0])
    cap = info.limits.max_segment_tokens
    assert_valid_segment(generate(stub, opened.session_id, opened.context_tokens, max_tokens=cap), cap)


def test_generation_is_deterministic_across_sessions(stub: Stub, open_session: OpenSession) -> None:
    for prompt in PROMPTS[:3]:
        a, b = open_session(prompt), open_session(prompt)
        assert segment_tuple(generate(stub, a.session_id, a.context_tokens)) == segment_tuple(
            generate(stub, b.session_id, b.context_tokens)
        )


def test_segment_is_not_part_of_the_context(stub: Stub, open_session: OpenSession) -> None:
    opened = open_session(PROMPTS[1])
    first = generate(stub, opened.session_id, opened.context_tokens)
    again = generate(stub, opened.session_id, opened.context_tokens)
    assert segment_tuple(again) == segment_tuple(first)
    assert again.context_tokens == opened.context_tokens


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_append_equals_reopening_with_the_answer(stub: Stub, open_session: OpenSession, prompt: str) -> None:
    """Appending each step's own segment matches a session opened with the whole answer so far."""
    live = open_session(prompt)
    expected, answer, append = live.context_tokens, "", ""
    for step in range(4):
        r = generate(stub, live.session_id, expected, append_text=append)
        answer += append
        reopened = open_session(prompt, answer_text=answer)
        fresh = generate(stub, reopened.session_id, reopened.context_tokens)
        assert segment_tuple(r) == segment_tuple(fresh), f"step {step}, answer {answer!r}"
        assert r.context_tokens == reopened.context_tokens
        expected, append = r.context_tokens, r.text


def test_append_is_tokenized_with_the_context(stub: Stub, open_session: OpenSession) -> None:
    """The context is tokenize(prompt + answer) as one text, even when an append splits a word."""
    prompt, pieces = "Tom has 3 app", ["les", " and bu", "ys 4 more"]
    live = open_session(prompt)
    expected, answer = live.context_tokens, ""
    for piece in pieces:
        r = generate(stub, live.session_id, expected, append_text=piece)
        answer += piece
        reopened = open_session(prompt, answer_text=answer)
        assert r.context_tokens == reopened.context_tokens, f"answer {answer!r}"
        assert segment_tuple(r) == segment_tuple(generate(stub, reopened.session_id, reopened.context_tokens))
        expected = r.context_tokens


def _segment_with_a_word(stub: Stub, open_session: OpenSession) -> tuple[str, pb.GenerateSegmentResponse]:
    """A prompt whose first segment is a boundary segment with at least two visible characters."""
    for prompt in PROMPTS:
        opened = open_session(prompt)
        r = generate(stub, opened.session_id, opened.context_tokens)
        if r.finish_reason == pb.FINISH_REASON_BOUNDARY and len(r.text.strip()) >= 2:
            return prompt, r
    pytest.skip("no prompt gave a boundary segment of two or more characters")


def test_stop_string_cuts_right_after_it(stub: Stub, open_session: OpenSession) -> None:
    prompt, plain = _segment_with_a_word(stub, open_session)
    # The first visible character: the cut lands before the boundary, so STOP decides it.
    stop = plain.text.strip()[0]
    cut = plain.text.index(stop) + len(stop)
    opened = open_session(prompt)
    r = generate(stub, opened.session_id, opened.context_tokens, stop_strings=("never-appears-123", stop))
    assert r.finish_reason == pb.FINISH_REASON_STOP
    assert r.text == plain.text[:cut]
    assert r.generated_tokens <= plain.generated_tokens
    assert r.context_tokens == opened.context_tokens


def test_stop_string_that_never_appears_changes_nothing(stub: Stub, open_session: OpenSession) -> None:
    opened = open_session(PROMPTS[0])
    plain = generate(stub, opened.session_id, opened.context_tokens)
    stopped = generate(stub, opened.session_id, opened.context_tokens, stop_strings=("\x01never\x02",))
    assert segment_tuple(stopped) == segment_tuple(plain)


# ---- stale context ----------------------------------------------------------------------------


def test_stale_expected_context_is_failed_precondition_and_changes_nothing(
    stub: Stub, open_session: OpenSession
) -> None:
    opened = open_session(PROMPTS[0])
    n = opened.context_tokens
    winner = generate(stub, opened.session_id, n).text
    for wrong in (n - 1, n + 1, n + 1000):
        if wrong > 0:
            expect_code(grpc.StatusCode.FAILED_PRECONDITION, generate, stub, opened.session_id, wrong, winner)
            expect_code(grpc.StatusCode.FAILED_PRECONDITION, score, stub, opened.session_id, wrong, [winner])
    # The refused calls appended nothing: the correct call behaves as on an untouched session.
    after = generate(stub, opened.session_id, n, append_text=winner)
    reference = open_session(PROMPTS[0])
    assert segment_tuple(after) == segment_tuple(generate(stub, reference.session_id, n, append_text=winner))


def test_retried_append_is_rejected(stub: Stub, open_session: OpenSession) -> None:
    opened = open_session(PROMPTS[1])
    n = opened.context_tokens
    winner = generate(stub, opened.session_id, n).text
    first = generate(stub, opened.session_id, n, append_text=winner)
    assert first.context_tokens > n, "precondition: appending the model's own segment adds tokens"
    # The same call again (a client retry after a lost response) must not append twice.
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, generate, stub, opened.session_id, n, winner)
    assert segment_tuple(generate(stub, opened.session_id, first.context_tokens)) == segment_tuple(first)


# ---- ScoreText --------------------------------------------------------------------------------


def test_score_returns_one_finite_score_per_candidate_in_order(stub: Stub, open_session: OpenSession) -> None:
    opened = open_session(PROMPTS[0])
    texts = [" the", " quick brown fox", "!", " 42 apples and 7 pencils"]
    response = score(stub, opened.session_id, opened.context_tokens, texts)
    assert len(response.scores) == len(texts)
    assert response.context_tokens == opened.context_tokens
    for text, s in zip(texts, response.scores):
        assert math.isfinite(s.log_prob_sum) and s.log_prob_sum <= 0.0, (text, s.log_prob_sum)
        assert s.scored_tokens >= 1, f"{text!r} is not empty"
        assert s.context_tokens_with_text >= opened.context_tokens
    # Longer text of the same kind has more tokens: the scores are not merely shuffled.
    assert response.scores[1].scored_tokens > response.scores[0].scored_tokens
    assert response.scores[3].scored_tokens > response.scores[2].scored_tokens


def test_score_with_eos_scores_one_more_token(stub: Stub, open_session: OpenSession) -> None:
    opened = open_session(PROMPTS[1])
    for text in (" apples", " the quick brown fox"):
        plain, with_eos = score(stub, opened.session_id, opened.context_tokens, [(text, False), (text, True)]).scores
        assert with_eos.scored_tokens == plain.scored_tokens + 1
        assert with_eos.log_prob_sum <= plain.log_prob_sum
        assert with_eos.context_tokens_with_text == plain.context_tokens_with_text, "EOS is excluded"
    only_eos = score(stub, opened.session_id, opened.context_tokens, [("", True)]).scores[0]
    assert only_eos.scored_tokens == 1, "an empty candidate that ends at EOS is scored by EOS alone"
    assert math.isfinite(only_eos.log_prob_sum) and only_eos.log_prob_sum <= 0.0


def test_scoring_does_not_change_the_context(stub: Stub, open_session: OpenSession) -> None:
    opened = open_session(PROMPTS[2])
    before = generate(stub, opened.session_id, opened.context_tokens)
    scored = score(stub, opened.session_id, opened.context_tokens, [before.text, JUNK, (" long text here", True)])
    assert scored.context_tokens == opened.context_tokens
    after = generate(stub, opened.session_id, opened.context_tokens)
    assert segment_tuple(after) == segment_tuple(before)


def _close(a: pb.CandidateScore, b: pb.CandidateScore) -> bool:
    return (a.scored_tokens, a.context_tokens_with_text) == (b.scored_tokens, b.context_tokens_with_text) and (
        math.isclose(a.log_prob_sum, b.log_prob_sum, rel_tol=1e-4, abs_tol=1e-4)
    )


def test_scores_do_not_depend_on_batching_or_order(stub: Stub, open_session: OpenSession) -> None:
    opened = open_session(PROMPTS[3])
    n = opened.context_tokens
    # Different lengths, so a batched pass must pad; one of them merges poorly with the context.
    texts = [" a", " the quick brown fox jumps over", JUNK]
    together = score(stub, opened.session_id, n, texts).scores
    for text, batched in zip(texts, together):
        alone = score(stub, opened.session_id, n, [text]).scores[0]
        assert _close(alone, batched), (text, alone, batched)
    order = [2, 0, 1]
    permuted = score(stub, opened.session_id, n, [texts[i] for i in order]).scores
    for i, s in zip(order, permuted):
        assert _close(s, together[i]), (texts[i], s, together[i])


def test_own_greedy_segment_scores_better_than_junk(stub: Stub, open_session: OpenSession) -> None:
    for prompt in PROMPTS[:3]:
        opened = open_session(prompt)
        segment = generate(stub, opened.session_id, opened.context_tokens).text
        own, junk = score(stub, opened.session_id, opened.context_tokens, [segment, JUNK]).scores
        assert own.log_prob_sum / own.scored_tokens > junk.log_prob_sum / junk.scored_tokens, (prompt, segment)


# ---- CloseSession -----------------------------------------------------------------------------


def test_close_session(stub: Stub, open_session: OpenSession) -> None:
    opened = open_session(PROMPTS[0])
    before = open_count(stub)
    close = pb.CloseSessionRequest(session_id=opened.session_id)
    assert stub.CloseSession(close, timeout=RPC_TIMEOUT_S).closed is True
    assert open_count(stub) == before - 1
    assert stub.CloseSession(close, timeout=RPC_TIMEOUT_S).closed is False
    expect_code(grpc.StatusCode.NOT_FOUND, generate, stub, opened.session_id, opened.context_tokens)
    expect_code(grpc.StatusCode.NOT_FOUND, score, stub, opened.session_id, opened.context_tokens, [" a"])
    # A closed id can be opened afresh.
    reopened = open_session(PROMPTS[0], session_id=opened.session_id)
    assert reopened.context_tokens == opened.context_tokens


def test_unknown_session_is_not_found(stub: Stub) -> None:
    unknown = new_session_id("never-opened")
    expect_code(grpc.StatusCode.NOT_FOUND, generate, stub, unknown, 5)
    expect_code(grpc.StatusCode.NOT_FOUND, score, stub, unknown, 5, [" a"])
    close = pb.CloseSessionRequest(session_id=unknown)
    assert stub.CloseSession(close, timeout=RPC_TIMEOUT_S).closed is False


# ---- bad input --------------------------------------------------------------------------------

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _open_raw(stub: Stub, prompt: pb.Prompt | None, session_id: str = "", answer_text: str = "") -> None:
    request = pb.OpenSessionRequest(session_id=session_id, answer_text=answer_text)
    if prompt is not None:
        request.prompt.CopyFrom(prompt)
    response = stub.OpenSession(request, timeout=RPC_TIMEOUT_S)
    # Reached only when the worker wrongly accepted the request; do not leak the session.
    stub.CloseSession(pb.CloseSessionRequest(session_id=response.session_id), timeout=RPC_TIMEOUT_S)


def _chat(*messages: tuple[str, str]) -> pb.Prompt:
    return pb.Prompt(chat=pb.ChatConversation(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages]))


@pytest.mark.parametrize(
    "prompt",
    [
        pb.Prompt(text=""),
        pb.Prompt(),
        None,
        pb.Prompt(chat=pb.ChatConversation()),
        _chat(("user", "hi"), ("robot", "beep")),
    ],
    ids=["empty-text", "no-kind", "no-prompt", "empty-chat", "robot-role"],
)
def test_bad_prompt_is_invalid_argument(stub: Stub, prompt: pb.Prompt | None) -> None:
    expect_code(INVALID, _open_raw, stub, prompt)


@pytest.mark.parametrize("bad_id", ["bad id!", "x" * 129, "x" * 200, "ünïcode", "a/b"])
def test_bad_session_id_is_invalid_argument(stub: Stub, bad_id: str) -> None:
    expect_code(INVALID, _open_raw, stub, pb.Prompt(text=PROMPTS[0]), session_id=bad_id)
    expect_code(INVALID, generate, stub, bad_id, 5)
    expect_code(INVALID, score, stub, bad_id, 5, [" a"])
    expect_code(INVALID, stub.CloseSession, pb.CloseSessionRequest(session_id=bad_id), timeout=RPC_TIMEOUT_S)


def test_longest_session_id_is_accepted(open_session: OpenSession) -> None:
    session_id = ("conf.A-z_0:9" * 11)[:128]
    assert open_session(PROMPTS[0], session_id=session_id).session_id == session_id


def test_text_over_max_text_chars_is_invalid_argument(
    stub: Stub, info: pb.GetInfoResponse, open_session: OpenSession
) -> None:
    limit = info.limits.max_text_chars
    if limit > PROBE_CEILING:
        pytest.skip(f"max_text_chars {limit} is too large to probe")
    too_long = "a" * (limit + 1)
    for error in (
        expect_code(INVALID, _open_raw, stub, pb.Prompt(text=too_long)),
        expect_code(INVALID, _open_raw, stub, pb.Prompt(text=PROMPTS[0]), answer_text=too_long),
    ):
        assert str(limit) in error.details(), f"details should name the limit: {error.details()}"
    opened = open_session(PROMPTS[0])
    for error in (
        expect_code(INVALID, generate, stub, opened.session_id, opened.context_tokens, too_long),
        expect_code(INVALID, score, stub, opened.session_id, opened.context_tokens, [" a", too_long]),
    ):
        assert str(limit) in error.details(), f"details should name the limit: {error.details()}"
    # Neither refused call touched the session.
    assert generate(stub, opened.session_id, opened.context_tokens).context_tokens == opened.context_tokens


def test_candidate_count_outside_limits_is_invalid_argument(
    stub: Stub, info: pb.GetInfoResponse, open_session: OpenSession
) -> None:
    opened = open_session(PROMPTS[0])
    expect_code(INVALID, score, stub, opened.session_id, opened.context_tokens, [])
    limit = info.limits.max_candidates
    if limit > 10_000:
        pytest.skip(f"max_candidates {limit} is too large to probe")
    assert len(score(stub, opened.session_id, opened.context_tokens, [" a"] * limit).scores) == limit
    error = expect_code(INVALID, score, stub, opened.session_id, opened.context_tokens, [" a"] * (limit + 1))
    assert str(limit) in error.details(), f"details should name the limit: {error.details()}"


@pytest.mark.parametrize("over", ["limit+1", "uint32-max"])
def test_max_tokens_over_the_limit_is_invalid_argument(
    stub: Stub, info: pb.GetInfoResponse, open_session: OpenSession, over: str
) -> None:
    limit = info.limits.max_segment_tokens
    # 2**32-1 is what -1 becomes when a caller in another language casts it to uint32.
    max_tokens = limit + 1 if over == "limit+1" else UINT32_MAX
    if max_tokens > UINT32_MAX:
        pytest.skip("max_segment_tokens is the largest uint32")
    opened = open_session(PROMPTS[0])
    error = expect_code(INVALID, generate, stub, opened.session_id, opened.context_tokens, max_tokens=max_tokens)
    assert str(limit) in error.details(), f"details should name the limit: {error.details()}"


def test_zero_expected_context_tokens_is_invalid_argument(stub: Stub, open_session: OpenSession) -> None:
    opened = open_session(PROMPTS[0])
    expect_code(INVALID, generate, stub, opened.session_id, 0)
    expect_code(INVALID, score, stub, opened.session_id, 0, [" a"])


def test_empty_stop_string_is_invalid_argument(stub: Stub, open_session: OpenSession) -> None:
    opened = open_session(PROMPTS[0])
    expect_code(INVALID, generate, stub, opened.session_id, opened.context_tokens, stop_strings=("",))
    expect_code(INVALID, generate, stub, opened.session_id, opened.context_tokens, stop_strings=("ok", ""))
    # Each stop string is 1-64 characters (worker.proto).
    expect_code(INVALID, generate, stub, opened.session_id, opened.context_tokens, stop_strings=("s" * 65,))
    assert_valid_segment(
        generate(stub, opened.session_id, opened.context_tokens, stop_strings=("s" * 64,)), DEFAULT_SEGMENT_TOKENS
    )


def _over_context_text(info: pb.GetInfoResponse) -> str:
    """Text of more than max_context_tokens tokens in any common tokenizer, within max_text_chars.

    Single digits between spaces cost at least one token per two characters (GPT-2, Llama,
    Gemma and SentencePiece tokenizers never merge " 7 3" into one token).
    """
    limit, chars = info.limits.max_context_tokens, info.limits.max_text_chars
    length = 3 * limit  # about 1.5x the limit in tokens
    if length > min(chars, PROBE_CEILING):
        pytest.skip(f"max_context_tokens {limit} cannot be exceeded within max_text_chars {chars}")
    rng = random.Random(7)
    return " ".join(str(rng.randrange(10)) for _ in range(length // 2))


def _assert_names_count_and_limit(error: grpc.RpcError, limit: int) -> None:
    numbers = [int(n) for n in re.findall(r"\d+", error.details())]
    assert limit in numbers, f"details should name the limit {limit}: {error.details()}"
    assert any(n > limit for n in numbers), f"details should name the token count: {error.details()}"


@pytest.mark.parametrize("form", ["text", "chat"])
def test_prompt_over_max_context_tokens_is_invalid_argument(stub: Stub, info: pb.GetInfoResponse, form: str) -> None:
    text = _over_context_text(info)
    prompt = pb.Prompt(text=text) if form == "text" else _chat(("user", text))
    error = expect_code(INVALID, _open_raw, stub, prompt)
    _assert_names_count_and_limit(error, info.limits.max_context_tokens)


def test_answer_over_max_context_tokens_is_invalid_argument(
    stub: Stub, info: pb.GetInfoResponse, open_session: OpenSession
) -> None:
    text = _over_context_text(info)
    error = expect_code(INVALID, _open_raw, stub, pb.Prompt(text=PROMPTS[0]), answer_text=text)
    _assert_names_count_and_limit(error, info.limits.max_context_tokens)
    opened = open_session(PROMPTS[0])
    for error in (
        expect_code(INVALID, generate, stub, opened.session_id, opened.context_tokens, text),
        expect_code(INVALID, score, stub, opened.session_id, opened.context_tokens, [" a", text]),
    ):
        _assert_names_count_and_limit(error, info.limits.max_context_tokens)
    # The refused append left the session as it was.
    assert generate(stub, opened.session_id, opened.context_tokens).context_tokens == opened.context_tokens
