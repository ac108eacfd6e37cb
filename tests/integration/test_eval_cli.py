"""`coolfusion eval` end to end against a local cluster of two tiny models, including the resume."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coolfusion.cli.cluster import LocalCluster

WORKERS = ["bpe", "char"]
MODES = ["solo:bpe", "solo:char", "cool", "cool_r"]
# The project's own items (not GSM8K's), in its format: the reference is the answer's last line.
ITEMS = [
    {"question": "Ann has 3 pears and buys 4 more. How many pears does she have?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?", "answer": "6 * 5 = 30\n#### 30"},
    {"question": "Tom had $1,200 and spent $50. How much is left?", "answer": "1200 - 50 = 1150\n#### 1,150"},
]
_PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def address(tiny_model_dirs: dict[str, Path]) -> Iterator[str]:
    spec = {name: ["--model", str(tiny_model_dirs[name])] for name in WORKERS}
    with LocalCluster(spec, ready_timeout_s=120) as cluster:
        yield cluster.address


def eval_cli(data: Path, out: Path, address: str, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "coolfusion.cli.main", "eval", "--gsm8k", str(data), "--out", str(out),
        "--limit", "3", "--max-new-tokens", "8", "--orchestrator", address, "--workers", ",".join(WORKERS), *flags,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_eval_answers_every_item_in_every_mode_then_resumes_without_requests(address: str, tmp_path: Path) -> None:
    data, out = tmp_path / "items.jsonl", tmp_path / "out"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))

    done = eval_cli(data, out, address)
    assert done.returncode == 0, done.stderr
    results = (out / "results.jsonl").read_text()
    records = [json.loads(line) for line in results.splitlines()]
    assert sorted((r["mode"], r["index"]) for r in records) == sorted((m, i) for m in MODES for i in range(3))
    assert [r["reference"] for r in records if r["mode"] == "cool"] == ["7", "30", "1150"]
    assert all(isinstance(r["text"], str) and r["error"] is None for r in records)
    # One Cool+R request per item; its ranking holds the other modes' answers.
    assert all((r["seconds"] is not None and r["seconds"] > 0) == (r["mode"] == "cool_r") for r in records)
    assert {r["taken_from"] for r in records if r["mode"] != "cool_r"} == {"cool_r"}
    summary = (out / "summary.md").read_text()
    assert summary.strip() in done.stdout
    assert summary.startswith("### gsm8k (GSM8K lines 0-2)")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in summary.splitlines()[4:] if line.startswith("| ")}
    assert list(rows) == [*MODES, "oracle (either source right)"] and all(" / 3 | " in row for row in rows.values())
    assert (out / "accuracy.png").read_bytes()[:8] == _PNG

    # Nothing listens on port 1: any request would fail, so a clean exit proves the resume asked nothing.
    started = time.monotonic()
    again = eval_cli(data, out, "127.0.0.1:1")
    assert again.returncode == 0, again.stderr
    assert (out / "results.jsonl").read_text() == results
    assert (out / "summary.md").read_text() == summary
    assert time.monotonic() - started < 20


def test_answers_taken_from_cool_r_equal_the_modes_asked_on_their_own(address: str, tmp_path: Path) -> None:
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    assert eval_cli(data, tmp_path / "derived", address).returncode == 0
    assert eval_cli(data, tmp_path / "asked", address, "--modes", "solo,cool").returncode == 0

    def texts(out: Path) -> dict[tuple[str, int], str]:
        records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        return {(r["mode"], r["index"]): r["text"] for r in records if r["mode"] != "cool_r"}

    asked = texts(tmp_path / "asked")
    assert len(asked) == 9 and texts(tmp_path / "derived") == asked


def test_task_families_under_several_strategies_share_their_solo_answers(address: str, tmp_path: Path) -> None:
    out = tmp_path / "tasks"
    argv = [
        sys.executable, "-m", "coolfusion.cli.main", "eval", "--tasks", "arithmetic,opposites", "--limit", "2",
        "--strategies", "paper,nll_mean+stop", "--concurrency", "2", "--out", str(out), "--orchestrator", address,
        "--workers", ",".join(WORKERS),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    modes = {"solo:bpe", "solo:char", "cool@paper", "cool@nll_mean+stop", "cool_r@paper", "cool_r@nll_mean+stop"}
    assert {(r["family"], r["mode"]) for r in records} == {(f, m) for f in ("arithmetic", "opposites") for m in modes}
    assert len(records) == 2 * 2 * len(modes)
    assert {r["taken_from"] for r in records if r["mode"].startswith("solo")} == {"cool_r@paper"}
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["families"]["arithmetic"] == {"rule": "number", "max_new_tokens": 8, "stop": ["\n", ". "]}
    assert run["invocations"][0]["items"] == {"arithmetic": 2, "opposites": 2}
    summary = (out / "summary.md").read_text()
    assert "### arithmetic (tuning, items 0-1)" in summary and "### opposites (tuning, items 0-1)" in summary
