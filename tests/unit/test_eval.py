"""`coolfusion eval` without servers: items, strategies and modes, asking, resuming and run.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from coolfusion.cli import eval as evaluation
from coolfusion.cli import tasks
from coolfusion.cli.eval import Mode
from coolfusion.cli.prompts import EXAMPLES, STOP_STRINGS, gsm8k_prompt, gsm8k_text
from coolfusion.cli.tasks import TaskItem
from coolfusion.cli.tasks.checks import Rule
from coolfusion.client import FuseOptions
from coolfusion.v1 import orchestrator_pb2

GSM8K = Path(__file__).resolve().parents[2] / "../shared/data/gsm8k/test.jsonl"
ITEMS = [
    TaskItem("gsm8k", "0", "gsm8k", "test", 0, "What is 2 + 2?", ("4",), Rule.GSM8K),
    TaskItem("gsm8k", "1", "gsm8k", "test", 1, "What is 3 + 3?", ("6",), Rule.GSM8K),
]
MODES = evaluation.build_modes({"solo", "cool", "cool_r"}, ["a", "b"])


def _flags(**overrides: Any) -> argparse.Namespace:
    return argparse.Namespace(
        **{"aggregation": "", "repetition_guard": "", "weight": [], "prompt_template": [], **overrides}
    )


def test_build_modes_orders_solos_then_fusions_then_reranks_per_strategy() -> None:
    assert MODES == [
        Mode("solo:a", ("a",)), Mode("solo:b", ("b",)), Mode("cool", ("a", "b")), Mode("cool_r", ("a", "b"), True)
    ]  # fmt: skip
    named = evaluation.build_modes({"solo", "cool", "cool_r"}, ["a", "b"], ["paper", "calibrated"])
    assert [m.name for m in named] == [
        "solo:a", "solo:b", "cool@paper", "cool@calibrated", "cool_r@paper", "cool_r@calibrated"
    ]  # fmt: skip
    assert {m.strategy for m in named[:2]} == {"paper"}  # solo answers come with the first strategy
    with pytest.raises(SystemExit, match="unknown modes"):
        evaluation.parse_kinds("solo,coolr")


def test_parse_strategies_names_each_and_shares_weights_and_templates() -> None:
    strategies = evaluation.parse_strategies(
        "paper,default,nll_mean+stop", _flags(weight=["a=2"], aggregation="robust")
    )
    assert list(strategies) == ["paper", "default", "nll_mean+stop"]
    paper, default, nll = strategies.values()
    assert (paper.aggregation, paper.repetition_guard) == (
        orchestrator_pb2.AGGREGATION_PPL_MEAN, orchestrator_pb2.REPETITION_GUARD_OFF
    )  # fmt: skip
    assert default.aggregation == default.repetition_guard == 0  # unset: the orchestrator's default
    assert nll.aggregation == orchestrator_pb2.AGGREGATION_NLL_MEAN
    assert all(dict(s.worker_weights) == {"a": 2.0} for s in strategies.values())
    single = evaluation.parse_strategies("", _flags(aggregation="robust"))
    assert list(single) == [""] and single[""].aggregation == orchestrator_pb2.AGGREGATION_ROBUST
    with pytest.raises(SystemExit, match="wobbly"):
        evaluation.parse_strategies("wobbly", _flags())


def test_select_items_takes_the_same_window_of_each_family(tmp_path: Path) -> None:
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(5)))
    chosen = evaluation.select_items(["facts", "gsm8k"], tasks.HELD_OUT, 1, 2, data)
    assert [(i.family, i.index) for i in chosen] == [("facts", 1), ("facts", 2), ("gsm8k", 1), ("gsm8k", 2)]
    assert chosen[0] == tasks.items("facts", tasks.HELD_OUT)[1]
    assert chosen[2].prompt == gsm8k_prompt("q1") and chosen[2].answers == ("1",)
    with pytest.raises(SystemExit, match="unknown task family"):
        evaluation.select_items(["trivia"], tasks.TUNING, 0, 1, data)


class FakeClient:
    """Answers every question with "#### 4" and remembers what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, ...], bool]] = []

    def fuse(
        self, prompt: object, options: FuseOptions | None = None, *, timeout_s: float | None = None
    ) -> orchestrator_pb2.FuseResult:
        assert options is not None and options.stop == STOP_STRINGS and options.trace
        self.calls.append((options.workers, options.rerank))
        return orchestrator_pb2.FuseResult(text="2 + 2 = 4\n#### 4", source="fused")


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
    assert {(r["family"], r["id"]) for r in lines} == {("gsm8k", "0"), ("gsm8k", "1")}

    again = FakeClient()
    assert len(evaluation.run(again, ITEMS, MODES, results, evaluation.Request(8, 5))) == 8
    assert again.calls == []


def test_concurrent_items_give_the_same_records(tmp_path: Path) -> None:
    many = [TaskItem("gsm8k", str(i), "gsm8k", "test", i, f"q{i}", ("4",), Rule.GSM8K) for i in range(12)]
    one = evaluation.run(FakeClient(), many, MODES, tmp_path / "one" / "results.jsonl", evaluation.Request(8, 5))
    four = evaluation.run(FakeClient(), many, MODES, tmp_path / "four" / "results.jsonl", evaluation.Request(8, 5), 4)
    assert sorted(map(evaluation.key, one)) == sorted(map(evaluation.key, four))
    assert len(evaluation.read_results(tmp_path / "four" / "results.jsonl")) == len(many) * len(MODES)


def test_resume_asks_only_for_missing_pairs_survives_a_cut_line_and_reads_old_records(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    # A record written before families existed: a GSM8K line known by its index only.
    done = {"mode": "cool", "index": 1, "prediction": "6", "reference": "6", "correct": True, "seconds": 1.0}
    results.write_text(json.dumps(done) + "\n" + '{"mode": "solo:a", "ind')  # a write cut short by a crash
    client = FakeClient()
    records = evaluation.run(client, ITEMS, MODES, results, evaluation.Request(8, 5))
    assert len(client.calls) == 7  # every pair but (cool, 1), including the cut one
    assert len(evaluation.read_results(results)) == 8  # the first new record did not join the cut line
    assert sum(r["mode"] == "cool" for r in records) == 2


def test_run_json_keeps_the_settings_and_each_invocation_and_refuses_other_settings(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    evaluation.run(FakeClient(), ITEMS, MODES, results, evaluation.Request(8, 5), invocation={"command": ["x"]})
    evaluation.run(FakeClient(), ITEMS, MODES, results, evaluation.Request(8, 5), invocation={"command": ["y"]})
    recorded = json.loads((tmp_path / "run.json").read_text())
    assert recorded["settings"]["families"] == {
        "gsm8k": {"rule": "gsm8k", "max_new_tokens": 8, "stop": ["\nQuestion:"]}
    }
    assert [i["command"] for i in recorded["invocations"]] == [["x"], ["y"]]
    with pytest.raises(SystemExit, match="use another --out folder"):
        evaluation.run(FakeClient(), ITEMS, MODES, results, evaluation.Request(16, 5))


class RankingClient(FakeClient):
    """Cool+R answers carry every answer in their ranking; other modes answer "#### 0"."""

    def fuse(self, prompt: object, options: FuseOptions | None = None, **_: object) -> orchestrator_pb2.FuseResult:
        assert options is not None
        self.calls.append((options.workers, options.rerank))
        if not options.rerank:
            return orchestrator_pb2.FuseResult(text="#### 0", source="fused")
        ranking = [
            orchestrator_pb2.RerankEntry(source="b", text="#### 4", fused_score=1.5),
            orchestrator_pb2.RerankEntry(source="fused", text="#### 6", fused_score=2.0),
            orchestrator_pb2.RerankEntry(source="a", text="#### 3", fused_score=3.0),
        ]
        return orchestrator_pb2.FuseResult(text="#### 4", source="b", rerank=ranking)


def test_cool_r_answers_stand_in_for_solo_and_cool_of_the_same_strategy(tmp_path: Path) -> None:
    client = RankingClient()
    modes = evaluation.build_modes({"solo", "cool", "cool_r"}, ["a", "b"], ["paper", "nll_mean"])
    request = evaluation.Request(8, 5, {"paper": None, "nll_mean": None})
    records = evaluation.run(client, ITEMS[:1], modes, tmp_path / "results.jsonl", request)
    assert client.calls == [(("a", "b"), True)] * 2  # one request per item and strategy
    by_mode = {r["mode"]: r for r in records}
    assert {m: r["prediction"] for m, r in by_mode.items()} == {
        "cool_r@paper": "4", "solo:a": "3", "solo:b": "4", "cool@paper": "6", "cool_r@nll_mean": "4",
        "cool@nll_mean": "6",
    }  # fmt: skip
    assert by_mode["cool@nll_mean"]["taken_from"] == "cool_r@nll_mean" and by_mode["solo:a"]["seconds"] is None


def test_decisions_keep_only_steps_whose_candidates_differed() -> None:
    scored = orchestrator_pb2.FuseStep(
        index=1, winner_index=1,
        candidates=[
            orchestrator_pb2.StepCandidate(text=" Rome", proposed_by=["a"],
                                           scores=[orchestrator_pb2.ModelScore(worker="b", perplexity=9.0, scored_tokens=2)]),
            orchestrator_pb2.StepCandidate(text=" Milan", proposed_by=["b"]),
        ],
    )  # fmt: skip
    agreed = orchestrator_pb2.FuseStep(index=0, candidates=[orchestrator_pb2.StepCandidate(text="x")])
    (decision,) = evaluation.decisions([agreed, scored])
    assert decision["step"] == 1 and decision["winner"] == 1
    assert decision["candidates"][0] == {
        "text": " Rome",
        "eos": False,
        "by": ["a"],
        "ppl": {"b": 9.0},
        "tokens": {"b": 2},
    }


def test_prompt_examples_end_in_their_marker_and_question_comes_last() -> None:
    for _, solution in EXAMPLES:
        assert solution.splitlines()[-1].startswith("#### ")
    turns = gsm8k_prompt("  How many pens?  ")
    assert [t["role"] for t in turns] == ["user", "assistant"] * len(EXAMPLES) + ["user"]
    assert turns[-1]["content"] == "Question: How many pens?"  # the examples come first, as earlier turns
    # A base model reads the contents as paragraphs: the plain text is the examples' layout, and it
    # ends (turn + blank line) where each example's solution starts.
    paragraphs = "\n\n".join(t["content"] for t in turns)
    assert paragraphs == gsm8k_text("How many pens?")


@pytest.mark.skipif(not GSM8K.is_file(), reason="the GSM8K test file is not beside the checkout")
def test_prompt_examples_are_not_test_items() -> None:
    questions = {json.loads(line)["question"] for line in GSM8K.read_text(encoding="utf-8").splitlines()}
    assert not questions & {question for question, _ in EXAMPLES}


def test_summaries_read_stored_answers_again_with_todays_rules() -> None:
    item = tasks.items("opposites", tasks.TUNING)[0]
    stored = {"mode": "cool", "family": "opposites", "id": item.id, "text": f" {item.answers[-1]}.\n", "correct": False}
    other = {"mode": "cool", "family": "opposites", "id": "not-in-this-run", "text": "", "correct": True}
    fresh, kept = evaluation.rescored([stored, other], [item])
    assert fresh["correct"] is True and fresh["prediction"] == item.answers[-1]
    assert kept == other and stored["correct"] is False  # records of other items, and the input, untouched
