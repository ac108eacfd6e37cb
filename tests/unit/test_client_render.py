"""The CLI's rendering of a hand-built FuseResult, and the client's gRPC error mapping."""

from __future__ import annotations

import grpc
import pytest

from coolfusion.cli import render
from coolfusion.client import (
    CoolfusionError,
    DeadlineExceededError,
    FuseOptions,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    chat,
    error_from_rpc,
    fusion_parameters,
)
from coolfusion.v1 import orchestrator_pb2, worker_pb2


def _step(index: int, winner: str, text: str, loser: str = "", loser_text: str = "x") -> orchestrator_pb2.FuseStep:
    candidates = [orchestrator_pb2.StepCandidate(text=text, proposed_by=[winner])]
    if loser:
        candidates.append(orchestrator_pb2.StepCandidate(text=loser_text, proposed_by=[loser]))
    return orchestrator_pb2.FuseStep(index=index, candidates=candidates, winner_index=0, winner_worker=winner)


@pytest.fixture
def result() -> orchestrator_pb2.FuseResult:
    """Three steps: smollm2 wins 'The answer' and ' 18.', gemma3 wins ' is'."""
    return orchestrator_pb2.FuseResult(
        text="The answer is 18.",
        finish_reason=worker_pb2.FINISH_REASON_EOS,
        shares=[
            orchestrator_pb2.WorkerShare(worker="smollm2", segments=2, chars=14),
            orchestrator_pb2.WorkerShare(worker="gemma3", segments=1, chars=3),
        ],
        dropped=[orchestrator_pb2.DroppedWorker(worker="qwen", reason="UNAVAILABLE: connection refused", step=1)],
        timings=orchestrator_pb2.Timings(total_ms=1234.4, open_ms=100, generate_ms=800, score_ms=300, steps=3),
        trace=[
            _step(0, "smollm2", "The answer", "gemma3"),
            _step(1, "gemma3", " is", "smollm2"),
            _step(2, "smollm2", " 18."),
        ],
        source="fused",
    )


def test_plain_rendering_labels_every_segment_with_its_winner(result: orchestrator_pb2.FuseResult) -> None:
    text = render.render_result(result, palette=None)
    assert text.splitlines()[0] == "[smollm2]The answer[gemma3] is[smollm2] 18."
    assert "\x1b[" not in text  # no escape codes when output is not a terminal


def test_colour_rendering_gives_each_worker_one_colour_and_a_legend(result: orchestrator_pb2.FuseResult) -> None:
    palette = render.Palette()
    lines = render.render_result(result, palette).splitlines()
    smollm2, gemma3 = palette.colour("smollm2"), palette.colour("gemma3")
    assert smollm2 != gemma3
    assert lines[0].startswith("workers: ") and "smollm2" in lines[0] and "gemma3" in lines[0]
    assert lines[1] == (f"\x1b[{smollm2}mThe answer\x1b[0m\x1b[{gemma3}m is\x1b[0m\x1b[{smollm2}m 18.\x1b[0m")


def test_summary_shows_shares_drops_and_timings(result: orchestrator_pb2.FuseResult) -> None:
    lines = render.summary(result).splitlines()
    assert lines[0].split() == ["worker", "segments", "chars", "%"]
    assert lines[1].split() == ["smollm2", "2", "14", "82.4"]
    assert lines[2].split() == ["gemma3", "1", "3", "17.6"]
    assert "dropped qwen at step 1: UNAVAILABLE: connection refused" in lines
    assert lines[-1].startswith("3 steps, finished by eos; total 1234 ms")


def test_segments_are_clipped_where_a_stop_string_cut_the_answer(result: orchestrator_pb2.FuseResult) -> None:
    result.text = "The answer i"  # the orchestrator cut the answer inside the second segment
    pieces = render.segments(result.trace, result.text)
    assert pieces == [render.Segment("smollm2", "The answer"), render.Segment("gemma3", " i")]


def test_rerank_names_the_chosen_solo_answer_and_keeps_fused_attribution(result: orchestrator_pb2.FuseResult) -> None:
    result.source, result.text = "gemma3", "It is 18."
    result.rerank.extend([
        orchestrator_pb2.RerankEntry(source="gemma3", text="It is 18.", fused_score=3.5),
        orchestrator_pb2.RerankEntry(source="fused", text="The answer is 18.", fused_score=4.0),
    ])  # fmt: skip
    text = render.render_result(result, palette=None)
    assert text.splitlines()[0] == "[smollm2]The answer[gemma3] is[smollm2] 18."
    assert "rerank chose gemma3's solo answer:" in text
    assert "answer returned:\nIt is 18." in text


def test_stream_printer_writes_segments_then_the_summary(result: orchestrator_pb2.FuseResult) -> None:
    class Out:
        def __init__(self) -> None:
            self.parts: list[str] = []

        def write(self, text: str) -> None:
            self.parts.append(text)

        def flush(self) -> None:
            pass

    out = Out()
    printer = render.StreamPrinter(out, palette=None)  # type: ignore[arg-type]
    for step in result.trace:
        assert printer.event(orchestrator_pb2.FuseStreamResponse(step=step)) is None
    assert out.parts == ["[smollm2]The answer", "[gemma3] is", "[smollm2] 18."]  # one write per segment
    assert printer.event(orchestrator_pb2.FuseStreamResponse(summary=result)) == result
    assert out.parts[-1] == "\n\n" + render.summary(result) + "\n"


class _FakeRpcError(grpc.RpcError):
    """What a failed call raises: an RpcError that is also a grpc.Call with code() and details()."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.INTERNAL, CoolfusionError),
    ],
)
def test_rpc_errors_map_to_typed_exceptions(code: grpc.StatusCode, kind: type[CoolfusionError]) -> None:
    error = error_from_rpc(_FakeRpcError(code, "unknown workers: nope"))
    assert type(error) is kind
    assert (error.code, error.details) == (code, "unknown workers: nope")
    assert str(error) == f"{code.name}: unknown workers: nope"


def test_a_bare_rpc_error_maps_to_unknown() -> None:
    error = error_from_rpc(grpc.RpcError("boom"))
    assert type(error) is CoolfusionError and error.code == grpc.StatusCode.UNKNOWN


def test_prompts_become_text_or_chat() -> None:
    assert fusion_parameters("Hello").prompt.text == "Hello"
    parameters = fusion_parameters(chat("Hi", system="Be brief."), FuseOptions(rerank=True, trace=True))
    assert [(m.role, m.content) for m in parameters.prompt.chat.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert parameters.rerank_mode == orchestrator_pb2.RERANK_MODE_FULL_ANSWER and parameters.include_trace
