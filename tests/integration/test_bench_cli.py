"""`coolfusion bench` end to end: a caching and a `--no-cache` cluster of two tiny models, every section."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from coolfusion.cli.cluster import LocalCluster

WORKERS = ["bpe", "char"]
LENGTHS, LEVELS, REQUESTS = [8, 16], [1, 2], 2
SEGMENT_CAP = 16  # the orchestrator's default per-step cap: how far an answer may run past its own cap
SECTIONS = ["fused_vs_solo", "cache_vs_no_cache", "orchestrator_overhead", "step_split", "concurrency", "decode"]
DECODE_LEVELS = [1, 3]


@pytest.fixture(scope="module")
def addresses(tiny_model_dirs: dict[str, Path]) -> Iterator[tuple[str, str]]:
    spec = {name: ["--model", str(tiny_model_dirs[name])] for name in WORKERS}
    # Started from this thread, one after the other: a server launched from a worker thread gets
    # SIGTERM when that thread ends (exit_with_parent's PR_SET_PDEATHSIG follows the thread).
    with (
        LocalCluster(spec, ready_timeout_s=120) as cached,
        LocalCluster(spec, ready_timeout_s=120, worker_flags=("--no-cache",)) as uncached,
    ):
        yield cached.address, uncached.address


def bench_cli(*flags: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "coolfusion.cli.main", "bench", *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_bench_writes_every_section_with_consistent_figures(addresses: tuple[str, str], tmp_path: Path) -> None:
    cached, uncached = addresses
    out = tmp_path / "bench.json"
    done = bench_cli(
        "--orchestrator", cached, "--no-cache-orchestrator", uncached, "--workers", ",".join(WORKERS),
        "--lengths", ",".join(map(str, LENGTHS)), "--concurrency", ",".join(map(str, LEVELS)),
        "--requests", str(REQUESTS), "--decode-sessions", ",".join(map(str, DECODE_LEVELS)), "--decode-tokens", "12",
        "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert all(report[key] for key in SECTIONS)
    for number in range(1, 7):
        assert f"\n{number}. " in f"\n{done.stdout}"  # each section printed as a table

    runs = report["runs"]
    assert [r["max_new_tokens"] for r in runs["fused"]] == LENGTHS
    # Re-prefilling every call must not change a single character.
    assert [r["text"] for r in runs["fused_no_cache"]] == [r["text"] for r in runs["fused"]]
    assert all(
        row["same_text"] and row["cached_ms"] > 0 and row["no_cache_ms"] > 0 for row in report["cache_vs_no_cache"]
    )
    for run in runs["fused"]:
        if run["finish_reason"] == "LENGTH":  # the stop rule counts the first worker's tokens
            assert run["max_new_tokens"] <= run["tokens"][WORKERS[0]] < run["max_new_tokens"] + SEGMENT_CAP

    solo_rows = {row["worker"]: row for row in report["fused_vs_solo"]}
    assert list(solo_rows) == WORKERS
    for name, row in solo_rows.items():
        assert row["max_new_tokens"] == max(LENGTHS) and row["fused_ms"] > 0 and row["solo_ms"] > 0
        assert row["wall_ratio"] == pytest.approx(row["fused_ms"] / row["solo_ms"])
        assert row["fused_tokens"] == runs["fused"][-1]["tokens"][name] > 0 and row["solo_tokens"] > 0

    for run, row in zip(runs["fused"], report["orchestrator_overhead"]):
        timings = run["timings"]
        assert row["loop_ms"] == pytest.approx(timings["total_ms"] - timings["open_ms"])
        assert 0 < row["worker_compute_ms"] < row["loop_ms"]
        assert row["overhead_ms"] == pytest.approx(row["loop_ms"] - row["worker_compute_ms"])
        assert row["overhead_ms_per_step"] == pytest.approx(row["overhead_ms"] / timings["steps"])
    for row in report["step_split"]:
        assert row["generate_ms"] > 0 and row["score_ms"] >= 0 and row["other_ms"] >= 0
        assert row["generate_ms"] + row["score_ms"] + row["other_ms"] == pytest.approx(row["step_ms"])

    assert [row["concurrency"] for row in report["concurrency"]] == LEVELS
    for row in report["concurrency"]:
        assert row["requests"] == REQUESTS and row["requests_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["seconds"] * 1000
        assert row["sessions_left"] == 0  # every request's sessions closed, and the bench can tell

    decode = report["decode"]
    assert [(row["worker"], row["sessions"]) for row in decode] == [(w, n) for w in WORKERS for n in DECODE_LEVELS]
    for row in decode:
        assert 0 < row["tokens"] <= (12 + SEGMENT_CAP) * row["sessions"]  # EOS may end a session early
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"])
        assert row["sessions_left"] == 0
    assert [row["vs_one_session"] for row in decode if row["sessions"] == 1] == [1.0, 1.0]


def test_bench_without_a_no_cache_service_says_what_to_add() -> None:
    done = bench_cli("--orchestrator", "127.0.0.1:1")  # refused before any request: nothing listens there
    assert done.returncode != 0
    assert "--no-cache-orchestrator" in done.stderr and "--skip-no-cache" in done.stderr
