"""`coolfusion demo` without servers: the fixed choice of items and what is printed per item."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from coolfusion.cli import demo, render, tasks
from coolfusion.v1 import orchestrator_pb2


def test_the_items_are_the_first_two_held_out_of_each_family_then_gsm8k(tmp_path: Path) -> None:
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(3)))
    chosen = demo.demo_items(data, 0, 160, io.StringIO())
    expected = [item.id for name in tasks.FAMILIES for item in tasks.items(name, tasks.HELD_OUT)[:2]]
    assert [d.item.id for d in chosen] == [*expected, "0"]
    assert chosen[0].shown == "The capital of Cambodia is ..." and chosen[0].stop == ("\n", ". ")
    assert (chosen[-1].shown, chosen[-1].max_new_tokens, chosen[-1].item.reference) == ("q0", 160, "0")

    out = io.StringIO()
    assert len(demo.demo_items(tmp_path / "missing.jsonl", 0, 160, out)) == len(expected)
    assert "leaves its GSM8K question out" in out.getvalue()


def _step(winner: str, text: str, loser: str, loser_text: str) -> orchestrator_pb2.FuseStep:
    candidates = [
        orchestrator_pb2.StepCandidate(text=text, proposed_by=[winner]),
        orchestrator_pb2.StepCandidate(text=loser_text, proposed_by=[loser]),
    ]
    return orchestrator_pb2.FuseStep(candidates=candidates, winner_index=0, winner_worker=winner)


def test_show_prints_each_models_answer_the_fused_segments_and_who_was_right() -> None:
    item = demo.DemoItem(tasks.items("facts", tasks.HELD_OUT)[0], "The capital of Cambodia is ...", 16, ("\n",))
    result = orchestrator_pb2.FuseResult(
        text=" Phnom Penh.", source="fused", strategy=orchestrator_pb2.FusionStrategy(calibration="pooled-x"),
        trace=[_step("gemma3", " Phnom", "smollm2", " Siem"), _step("smollm2", " Penh.", "gemma3", " Penh")],
        rerank=[
            orchestrator_pb2.RerankEntry(source="fused", text=" Phnom Penh."),
            orchestrator_pb2.RerankEntry(source="smollm2", text=" Siem Reap.\nThe"),
            orchestrator_pb2.RerankEntry(source="gemma3", text=" Phnom Penh"),
        ],
    )  # fmt: skip
    out = io.StringIO()
    right = demo.show(item, result, ["smollm2", "gemma3"], None, out)
    assert right == {"smollm2": False, "gemma3": True, "fused": True, "Cool+R": True}
    lines = out.getvalue().splitlines()
    assert lines[1:3] == ["== facts, held-out item 0 (capital:Cambodia), pooled-x", "The capital of Cambodia is ..."]
    assert lines[3].split() == ["smollm2", "alone", "Siem", "Reap.", "wrong"]  # workers in their order
    assert lines[5].split() == ["fused", "[gemma3]", "Phnom[smollm2]", "Penh.", "right"]
    assert lines[6].split() == ["Cool+R", "(fused)", "Phnom", "Penh.", "right"]
    assert len({line.rindex(" ") for line in lines[3:7]}) == 1  # the verdicts line up
    coloured = io.StringIO()
    demo.show(item, result, ["smollm2", "gemma3"], render.Palette(), coloured)
    visible = re.sub(r"\x1b\[[0-9;]*m", "", coloured.getvalue())  # what the terminal shows
    assert "\x1b[" in coloured.getvalue() and len({line.rindex(" ") for line in visible.splitlines()[3:7]}) == 1
    runs = demo._runs([render.Segment("a", "x"), render.Segment("a", " y"), render.Segment("b", " z")])
    assert runs == [render.Segment("a", "x y"), render.Segment("b", " z")]
    assert demo.tally_line([right, right]) == "right: smollm2 0/2, gemma3 2/2, fused 2/2, Cool+R 2/2"
