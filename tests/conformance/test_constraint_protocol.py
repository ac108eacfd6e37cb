"""The promises of constraints (worker.proto's Constraint; docs/design.md section 9.2), checked over
gRPC against any worker that lists constraint kinds in GetInfo; skipped for one that lists none.

Answers are checked with Python's own json and re modules, nothing of the worker's: the answer a
session grows by appending its own segments is, once it ends at EOS, a text of the language, and
JSON is written compactly with ", " and ": " as separators."""

from __future__ import annotations

import json
import re

import grpc
import pytest

from coolfusion.v1 import worker_pb2 as pb
from coolfusion.v1 import worker_pb2_grpc

from conformance_support import RPC_TIMEOUT_S, OpenSession

Stub = worker_pb2_grpc.WorkerServiceStub
PROMPT = "Tom has 3 apples and buys 4 more."
# Bounded values, so that even a random model ends the answer within the segments allowed.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
ANSWER = r"(yes|no), because [a-z ]{1,12}\."
MAX_SEGMENTS = 48


def schema_constraint(schema: dict) -> pb.Constraint:
    return pb.Constraint(kind=pb.CONSTRAINT_KIND_JSON_SCHEMA, definition=json.dumps(schema))


@pytest.fixture(scope="module")
def kinds(info: pb.GetInfoResponse) -> set[int]:
    enforced = set(info.constraint_kinds)
    if not enforced:
        pytest.skip("the worker enforces no constraints (GetInfo.constraint_kinds is empty)")
    return enforced


def needs(kinds: set[int], kind: int) -> None:
    if kind not in kinds:
        pytest.skip(f"the worker does not enforce {pb.ConstraintKind.Name(kind)}")


def whole_answer(stub: Stub, opened: pb.OpenSessionResponse, begun: str = "") -> str:
    """The rest of the session's answer after `begun`: each segment appended by the next call, until EOS."""
    answer, context, append = begun, opened.context_tokens, ""
    for _ in range(MAX_SEGMENTS):
        request = pb.GenerateSegmentRequest(
            session_id=opened.session_id, expected_context_tokens=context, append_text=append,
            expected_answer_chars=len(answer),
        )  # fmt: skip
        segment = stub.GenerateSegment(request, timeout=RPC_TIMEOUT_S)
        answer, context, append = answer + append, segment.context_tokens, segment.text
        if segment.finish_reason == pb.FINISH_REASON_EOS:
            return (answer + append)[len(begun) :]
    raise AssertionError(f"no EOS within {MAX_SEGMENTS} segments: {answer + append!r}")


def expect_invalid(call, *args, **kwargs) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details()


def test_advertised_kinds_are_kinds_of_the_protocol(kinds: set[int]) -> None:
    assert kinds <= set(pb.ConstraintKind.values()) - {pb.CONSTRAINT_KIND_UNSPECIFIED}


def test_a_json_schema_answer_is_compact_json_valid_against_it(stub: Stub, kinds, open_session: OpenSession) -> None:
    needs(kinds, pb.CONSTRAINT_KIND_JSON_SCHEMA)
    answer = whole_answer(stub, open_session(PROMPT, constraint=schema_constraint(PERSON)))
    value = json.loads(answer)
    assert set(value) == {"name", "age", "pet"} and list(value) == ["name", "age", "pet"]
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert type(value["age"]) is int and 0 <= value["age"] <= 99 and value["pet"] in ("cat", "dog")
    assert answer == json.dumps(value, separators=(", ", ": "), ensure_ascii=False)


def test_a_regex_answer_matches_it_whole(stub: Stub, kinds, open_session: OpenSession) -> None:
    needs(kinds, pb.CONSTRAINT_KIND_REGEX)
    constraint = pb.Constraint(kind=pb.CONSTRAINT_KIND_REGEX, definition=ANSWER)
    assert re.fullmatch(ANSWER, whole_answer(stub, open_session(PROMPT, constraint=constraint)))


def test_a_json_object_answer_is_an_object(stub: Stub, kinds, open_session: OpenSession) -> None:
    needs(kinds, pb.CONSTRAINT_KIND_JSON_OBJECT)
    constraint = pb.Constraint(kind=pb.CONSTRAINT_KIND_JSON_OBJECT)
    opened = open_session(PROMPT, constraint=constraint)
    first = stub.GenerateSegment(
        pb.GenerateSegmentRequest(session_id=opened.session_id, expected_context_tokens=opened.context_tokens),
        timeout=RPC_TIMEOUT_S,
    )
    assert first.text.startswith("{")


def test_a_session_follows_text_other_models_wrote(stub: Stub, kinds, open_session: OpenSession) -> None:
    """A session re-opened in the middle of an answer goes on within the language."""
    needs(kinds, pb.CONSTRAINT_KIND_JSON_SCHEMA)
    begun = '{"name": "Zoe Q", "age": 4'  # as another model wrote it
    opened = open_session(PROMPT, answer_text=begun, constraint=schema_constraint(PERSON))
    value = json.loads(begun + whole_answer(stub, opened, begun))
    assert value["name"] == "Zoe Q" and (value["age"] == 4 or 40 <= value["age"] <= 49)


def test_text_outside_the_language_is_invalid_argument_and_changes_nothing(
    stub: Stub, kinds, open_session: OpenSession
) -> None:
    needs(kinds, pb.CONSTRAINT_KIND_JSON_SCHEMA)
    constraint = schema_constraint(PERSON)
    expect_invalid(open_session, PROMPT, answer_text="Once upon", constraint=constraint)
    opened = open_session(PROMPT, constraint=constraint)
    request = pb.GenerateSegmentRequest(
        session_id=opened.session_id, expected_context_tokens=opened.context_tokens, append_text='{"nam": '
    )
    expect_invalid(stub.GenerateSegment, request, timeout=RPC_TIMEOUT_S)
    request.append_text = '{"name": '
    assert stub.GenerateSegment(request, timeout=RPC_TIMEOUT_S).text.startswith('"')


@pytest.mark.parametrize(
    "constraint",
    [
        pb.Constraint(kind=pb.CONSTRAINT_KIND_JSON_SCHEMA, definition="{not json"),
        pb.Constraint(kind=pb.CONSTRAINT_KIND_JSON_SCHEMA, definition='{"type": "colour"}'),
        pb.Constraint(kind=pb.CONSTRAINT_KIND_REGEX, definition="(unclosed"),
        pb.Constraint(kind=99, definition="x"),
    ],
    ids=["not-json", "unknown-type", "bad-regex", "unknown-kind"],
)
def test_a_constraint_that_does_not_compile_is_invalid_argument(kinds, open_session: OpenSession, constraint) -> None:
    assert expect_invalid(open_session, PROMPT, constraint=constraint)


def test_reopening_with_another_constraint_is_already_exists(stub: Stub, kinds, open_session: OpenSession) -> None:
    needs(kinds, pb.CONSTRAINT_KIND_JSON_OBJECT)
    opened = open_session(PROMPT, constraint=pb.Constraint(kind=pb.CONSTRAINT_KIND_JSON_OBJECT))
    same = open_session(
        PROMPT, session_id=opened.session_id, constraint=pb.Constraint(kind=pb.CONSTRAINT_KIND_JSON_OBJECT)
    )
    assert same.context_tokens == opened.context_tokens
    with pytest.raises(grpc.RpcError) as caught:
        open_session(PROMPT, session_id=opened.session_id)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
