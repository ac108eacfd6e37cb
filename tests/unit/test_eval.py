"""`coolfusion eval` without servers: scoring, Wilson intervals, resuming and the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coolfusion.cli import eval as evaluation
from coolfusion.cli.eval import Mode, Score
from coolfusion.cli.gsm8k import Item
from coolfusion.cli.prompts import EXAMPLES, STOP_STRINGS, gsm8k_prompt
from coolfusion.client import FuseOptions
from coolfusion.v1 import orchestrator_pb2

GSM8K = Path(__file__).resolve().parents[2] / "../shared/data/gsm8k/test.jsonl"


@pytest.mark.parametrize(
    ("prediction", "reference", "correct"),
    [
        ("18.00", "18", True),
        ("18", "18.0000001", True),
        ("18.01", "18", False),
        (None, "18", False),
        ("-3", "3", False),
    ],
)
def test_is_correct_compares_numbers(prediction: str | None, reference: str, correct: bool) -> None:
    assert evaluation.is_correct(prediction, reference) is correct


@pytest.mark.parametrize(
    ("correct", "total", "low", "high"),
    # Published values (e.g. Newcombe 1998, Table I; statsmodels proportion_confint(method="wilson")).
    [(5, 10, 0.2366, 0.7634), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (81, 263, 0.2553, 0.3662)],
)
def test_wilson_interval_matches_published_values(correct: int, total: int, low: float, high: float) -> None:
    assert evaluation.wilson_interval(correct, total) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_without_data_is_uninformative() -> None:
    assert evaluation.wilson_interval(0, 0) == (0.0, 1.0)


def test_summary_table_format() -> None:
    table = evaluation.summary_table([Score("solo:a", 5, 10, 2.25), Score("cool_r", 10, 10, 8.0)])
    assert table.splitlines() == [
        "| mode | accuracy | correct / total | 95% CI (Wilson) | mean s |",
        "|:-----|---------:|----------------:|:---------------:|-------:|",
        "| solo:a | 50.0% | 5 / 10 | 23.7–76.3% | 2.2 |",
        "| cool_r | 100.0% | 10 / 10 | 72.2–100.0% | 8.0 |",
    ]


def test_build_modes_orders_solos_then_fusions() -> None:
    modes = evaluation.build_modes({"cool_r", "solo", "cool"}, ["a", "b"])
    assert modes == [
        Mode("solo:a", ("a",)), Mode("solo:b", ("b",)), Mode("cool", ("a", "b")), Mode("cool_r", ("a", "b"), True)
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="unknown modes"):
        evaluation.parse_kinds("solo,coolr")


class FakeClient:
    """Answers every question with "#### 4" and remembers what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, ...], bool]] = []

    def fuse(
        self, prompt: object, options: FuseOptions | None = None, *, timeout_s: float | None = None
    ) -> orchestrator_pb2.FuseResult:
        assert options is not None and options.stop == STOP_STRINGS
        self.calls.append((options.workers, options.rerank))
        return orchestrator_pb2.FuseResult(text="2 + 2 = 4\n#### 4", source="fused")


ITEMS = [Item(0, "What is 2 + 2?", "4"), Item(1, "What is 3 + 3?", "6")]
MODES = evaluation.build_modes({"solo", "cool", "cool_r"}, ["a", "b"])


def test_run_records_every_pair_and_resume_skips_them(tmp_path: Path) -> None:
    results = tmp_path / "out" / "results.jsonl"
    client = FakeClient()
    records = evaluation.run(client, ITEMS, MODES, results, evaluation.Request(8, 5))
    assert len(client.calls) == len(records) == 8
    assert (("a", "b"), True) in client.calls and (("b",), False) in client.calls
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["mode"], r["index"], r["correct"]) for r in lines[:4]] == [
        ("cool_r", 0, True), ("solo:a", 0, True), ("solo:b", 0, True), ("cool", 0, True)
    ]  # fmt: skip
    assert lines[4]["prediction"] == "4" and lines[4]["reference"] == "6" and lines[4]["correct"] is False

    again = FakeClient()
    assert len(evaluation.run(again, ITEMS, MODES, results, evaluation.Request(8, 5))) == 8
    assert again.calls == []


def test_resume_asks_only_for_missing_pairs_and_survives_a_cut_line(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    done = {"mode": "cool", "index": 1, "prediction": "6", "reference": "6", "correct": True, "seconds": 1.0}
    results.write_text(json.dumps(done) + "\n" + '{"mode": "solo:a", "ind')  # a write cut short by a crash
    client = FakeClient()
    records = evaluation.run(client, ITEMS, MODES, results, evaluation.Request(8, 5))
    assert len(client.calls) == 7  # every pair but (cool, 1), including the cut one
    assert len(evaluation.read_results(results)) == 8  # the first new record did not join the cut line
    scores = {s.mode: s for s in evaluation.score(records, ITEMS, MODES)}
    assert (scores["cool"].correct, scores["cool"].total) == (2, 2)
    assert (scores["solo:a"].correct, scores["solo:a"].total) == (1, 2)


def test_score_counts_only_this_runs_items(tmp_path: Path) -> None:
    records = [
        {"mode": "cool", "index": 0, "correct": True, "seconds": 2.0},
        {"mode": "cool", "index": 9, "correct": True, "seconds": 4.0},  # from a run over another range
    ]
    (cool,) = evaluation.score(records, ITEMS[:1], [Mode("cool", ("a", "b"))])
    assert (cool.correct, cool.total, cool.mean_seconds) == (1, 1, 2.0)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    # 0/3 and 3/3 put the accuracy on an interval bound, where rounding once made an error bar negative.
    scores = [Score("solo:a", 0, 3, 1.0), Score("cool", 2, 3, 2.0), Score("cool_r", 3, 3, 3.0)]
    evaluation.plot_accuracy(scores, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prompt_examples_end_in_their_marker_and_question_comes_last() -> None:
    for _, solution in EXAMPLES:
        assert solution.splitlines()[-1].startswith("#### ")
    (turn,) = gsm8k_prompt("  How many pens?  ")
    assert turn["role"] == "user"
    # Ends with the question, so a base model (turn + blank line) continues where each example's solution starts.
    assert turn["content"].endswith("\n\nQuestion: How many pens?")
    assert turn["content"].count("Question:") == len(EXAMPLES) + 1


@pytest.mark.skipif(not GSM8K.is_file(), reason="the GSM8K test file is not beside the checkout")
def test_prompt_examples_are_not_test_items() -> None:
    questions = {json.loads(line)["question"] for line in GSM8K.read_text(encoding="utf-8").splitlines()}
    assert not questions & {question for question, _ in EXAMPLES}


class RankingClient(FakeClient):
    """Cool+R answers carry every answer in their ranking; other modes answer "#### 0"."""

    def fuse(self, prompt: object, options: FuseOptions, **_: object) -> orchestrator_pb2.FuseResult:
        self.calls.append((options.workers, options.rerank))
        if not options.rerank:
            return orchestrator_pb2.FuseResult(text="#### 0", source="fused")
        ranking = [
            orchestrator_pb2.RerankEntry(source="b", text="#### 4", fused_score=1.5),
            orchestrator_pb2.RerankEntry(source="fused", text="#### 6", fused_score=2.0),
            orchestrator_pb2.RerankEntry(source="a", text="#### 3", fused_score=3.0),
        ]
        return orchestrator_pb2.FuseResult(text="#### 4", source="b", rerank=ranking)


def test_cool_r_answers_stand_in_for_solo_and_cool(tmp_path: Path) -> None:
    client = RankingClient()
    records = evaluation.run(client, ITEMS[:1], MODES, tmp_path / "results.jsonl", evaluation.Request(8, 5))
    assert client.calls == [(("a", "b"), True)]  # one request per item, not four
    by_mode = {r["mode"]: r for r in records}
    assert {m: by_mode[m]["prediction"] for m in by_mode} == {"cool_r": "4", "solo:a": "3", "solo:b": "4", "cool": "6"}
    assert by_mode["cool"]["taken_from"] == "cool_r" and by_mode["cool"]["seconds"] is None
    table = evaluation.summary_table(evaluation.score(records, ITEMS[:1], MODES))
    assert "| cool | 0.0% | 0 / 1 |" in table and "in cool_r" in table
