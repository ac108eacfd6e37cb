"""The client library and the `coolfusion` command line against a real local cluster of tiny models."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import pytest

from coolfusion.cli.cluster import LocalCluster
from coolfusion.cli.common import cluster_spec
from coolfusion.client import AsyncFusionClient, FuseOptions, FusionClient, InvalidArgumentError
from coolfusion.v1 import orchestrator_pb2

WORKERS = ["bpe", "char"]
PROMPT = "Tom has 3 apples and buys 4 more."
# Short answers and segments keep the module near a minute on a busy CPU; a few steps still
# give both workers candidates to win.
MAX_NEW_TOKENS, SEGMENT_TOKENS = 6, 4
_LIMIT_FLAGS = ("--max-new-tokens", str(MAX_NEW_TOKENS), "--segment-max-tokens", str(SEGMENT_TOKENS))
_LIMITS = FuseOptions(max_new_tokens=MAX_NEW_TOKENS, segment_max_tokens=SEGMENT_TOKENS)
_LABEL = re.compile(r"\[(bpe|char)\]")
# Loopback only: an opener that ignores any proxy configured in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def address(tiny_model_dirs: dict[str, Path]) -> Iterator[str]:
    spec = {name: ["--model", str(tiny_model_dirs[name])] for name in WORKERS}
    with LocalCluster(spec, ready_timeout_s=120) as cluster:
        yield cluster.address


def cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NO_COLOR="")  # output is piped anyway: labels, not colours
    argv = [sys.executable, "-m", "coolfusion.cli.main", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)


def fuse_cli(address: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return cli("fuse", "--plain", PROMPT, "--orchestrator", address, *_LIMIT_FLAGS, *flags)


def answer_part(stdout: str) -> str:
    """The labelled answer: everything before the share table's header."""
    return re.split(r"\n\nworker +segments", stdout)[0]


def assert_share_table(stdout: str) -> None:
    rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line.split()[:1] in (["bpe"], ["char"])}
    assert set(rows) == set(WORKERS)
    assert sum(float(row[3]) for row in rows.values()) == pytest.approx(100, abs=0.2)
    assert re.search(r"\d+ steps, finished by \w+; total \d+ ms", stdout)


def test_fuse_labels_each_segment_and_prints_shares(address: str) -> None:
    done = fuse_cli(address)
    assert done.returncode == 0, done.stderr
    assert _LABEL.match(done.stdout)  # the answer starts with its first segment's worker
    assert_share_table(done.stdout)


def test_fuse_json_text_equals_the_labelled_segments(address: str) -> None:
    labelled, as_json = fuse_cli(address), fuse_cli(address, "--json")
    assert as_json.returncode == 0, as_json.stderr
    result = json.loads(as_json.stdout)
    # Greedy decoding is deterministic, so both runs fused the same answer.
    assert _LABEL.sub("", answer_part(labelled.stdout)) == result["text"]
    assert "".join(step["candidates"][step["winner_index"]]["text"] for step in result["trace"]) == result["text"]
    assert [share["worker"] for share in result["shares"]] == WORKERS


def test_fuse_stream_prints_segments_then_the_summary(address: str) -> None:
    done = fuse_cli(address, "--stream")
    assert done.returncode == 0, done.stderr
    assert _LABEL.match(done.stdout)
    assert_share_table(done.stdout)


def test_fuse_holds_the_answer_to_a_json_schema_file(address: str, tmp_path: Path) -> None:
    n = {"type": "integer", "minimum": 0, "maximum": 99}
    schema = {"type": "object", "properties": {"n": n}, "required": ["n"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    longer = ("--max-new-tokens", "48", "--segment-max-tokens", "16")  # after the module's short limits
    done = fuse_cli(address, "--json", "--json-schema", str(tmp_path / "schema.json"), *longer)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(json.loads(done.stdout)["text"])) == {"n"}


def test_fuse_samples_with_a_seed_and_prints_n_answers(address: str) -> None:
    once = fuse_cli(address, "--json", "--temperature", "0.9", "--seed", "5")
    again = fuse_cli(address, "--json", "--temperature", "0.9", "--seed", "5", "-n", "2")
    assert once.returncode == again.returncode == 0, again.stderr
    first = json.loads(once.stdout)
    assert first["seed"] == "5" and json.loads(again.stdout.split("\n}\n")[0] + "\n}")["text"] == first["text"]


def test_unknown_worker_is_an_invalid_argument(address: str) -> None:
    done = fuse_cli(address, "--workers", "bpe,nope")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line, no traceback
    assert done.stderr.startswith("coolfusion: INVALID_ARGUMENT:") and "nope" in done.stderr


def test_workers_lists_both_workers(address: str) -> None:
    done = cli("workers", "--orchestrator", address, "--json")
    assert done.returncode == 0, done.stderr
    assert [(w["name"], w["serving"]) for w in json.loads(done.stdout)] == [("bpe", True), ("char", True)]


def test_every_part_reports_the_package_version(address: str) -> None:
    version = metadata.version("coolfusion")
    assert cli("--version").stdout == f"coolfusion {version}\n"
    with FusionClient(address, timeout_s=60) as client:
        listing = client.describe()
    assert listing.orchestrator_version == version
    assert [w.info.server_version for w in listing.workers] == [version, version]
    table = cli("workers", "--orchestrator", address).stdout.splitlines()
    assert table[0] == f"orchestrator {address}, coolfusion {version}"
    assert table[1].split()[:4] == ["name", "serving", "model", "version"] and version in table[2].split()


def test_a_service_written_against_the_keyword_form_keeps_working(address: str) -> None:
    """The form the README showed before FuseOptions: each FuseOptions field as a keyword."""

    async def asynchronous() -> tuple[str, list[str]]:
        async with AsyncFusionClient(address, timeout_s=60) as client:
            with pytest.warns(DeprecationWarning, match="fuse_stream"):
                events = [
                    e
                    async for e in client.fuse_stream(
                        PROMPT, max_new_tokens=MAX_NEW_TOKENS, segment_max_tokens=SEGMENT_TOKENS
                    )
                ]
            with pytest.warns(DeprecationWarning, match="FuseOptions"):
                result = await client.fuse(PROMPT, max_new_tokens=MAX_NEW_TOKENS, segment_max_tokens=SEGMENT_TOKENS)
            return result.text, [e.summary.text for e in events if e.HasField("summary")]

    with FusionClient(address, timeout_s=60) as client:
        expected = client.fuse(PROMPT, _LIMITS)
        with pytest.warns(
            DeprecationWarning,
            match=r"fuse\(prompt, max_new_tokens=\.\.\., segment_max_tokens=\.\.\., trace=\.\.\.\) is deprecated",
        ):
            old = client.fuse(PROMPT, max_new_tokens=MAX_NEW_TOKENS, segment_max_tokens=SEGMENT_TOKENS, trace=True)
        with pytest.warns(DeprecationWarning):
            streamed = list(
                client.fuse_stream(PROMPT, max_new_tokens=MAX_NEW_TOKENS, segment_max_tokens=SEGMENT_TOKENS)
            )
    assert old.text == expected.text and len(old.trace) > 0  # every keyword reached the request
    assert streamed[-1].summary.text == expected.text
    assert asyncio.run(asynchronous()) == (expected.text, [expected.text])


def test_sync_client_fuse_stream_and_list_workers(address: str) -> None:
    with FusionClient(address, timeout_s=60) as client:
        result = client.fuse(PROMPT, replace(_LIMITS, trace=True))
        assert result.text and result.text == "".join(s.candidates[s.winner_index].text for s in result.trace)
        events = list(client.fuse_stream(PROMPT, _LIMITS))
        assert_stream_consistent(events)
        assert events[-1].summary.text == result.text
        assert [(w.name, w.serving) for w in client.list_workers()] == [("bpe", True), ("char", True)]
        with pytest.raises(InvalidArgumentError, match="nope"):
            client.fuse(PROMPT, FuseOptions(workers=("nope",)))


def test_async_client_fuse_stream_and_list_workers(address: str) -> None:
    async def run() -> None:
        async with AsyncFusionClient(address, timeout_s=60) as client:
            result = await client.fuse(PROMPT, replace(_LIMITS, workers=("char", "bpe")))
            assert [share.worker for share in result.shares] == ["char", "bpe"]
            events = [event async for event in client.fuse_stream(PROMPT, _LIMITS)]
            assert_stream_consistent(events)
            assert [w.name for w in await client.list_workers()] == WORKERS
            with pytest.raises(InvalidArgumentError):
                await client.fuse(PROMPT, FuseOptions(max_new_tokens=10**6))

    asyncio.run(run())


def assert_stream_consistent(events: list[orchestrator_pb2.FuseStreamResponse]) -> None:
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds == ["step"] * (len(events) - 1) + ["summary"]
    winners = "".join(e.step.candidates[e.step.winner_index].text for e in events[:-1])
    assert events[-1].summary.text == winners
    assert events[-1].summary.timings.steps == len(events) - 1


def test_up_serves_until_sigterm_and_leaves_nothing_running(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    models = [f"--model={name}={tiny_model_dirs[name]}" for name in WORKERS]
    argv = [sys.executable, "-m", "coolfusion.cli.main", "up", "--presets=", *models, "--log", str(tmp_path / "log")]
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        lines = _read_lines(up)
        address = _wait_for(lines, r"^orchestrator: (\S+)", timeout_s=120)
        gateway = _wait_for(lines, r"^OpenAI-compatible API: (\S+)", timeout_s=10)
        _wait_for(lines, r"^ready: ", timeout_s=10)
        servers = _children(up.pid)
        assert len(servers) == 4  # two workers, the orchestrator and the gateway
        with FusionClient(address, timeout_s=30) as client:
            assert client.fuse(PROMPT, _LIMITS).text
        with _DIRECT.open(f"{gateway}/models", timeout=30) as models:
            assert [m["id"] for m in json.load(models)["data"]] == ["coolfusion", *WORKERS]
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
        assert not _alive(servers)
    finally:
        if up.poll() is None:
            up.kill()


def _read_lines(process: subprocess.Popen[str]) -> queue.Queue[str]:
    # A thread, so that waiting for a line can time out instead of blocking on readline.
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    return lines


def _wait_for(lines: queue.Queue[str], pattern: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if match := re.search(pattern, line):
            return match.group(1) if match.groups() else line
    raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s")


def _children(pid: int) -> list[int]:
    listed = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in listed.stdout.split()]


def _alive(pids: list[int]) -> list[int]:
    argv = ["ps", "-o", "pid=,stat=", "-p", ",".join(map(str, pids))]
    listed = subprocess.run(argv, capture_output=True, text=True, check=False)
    return [int(pid) for pid, stat in (line.split() for line in listed.stdout.splitlines()) if not stat.startswith("Z")]


def test_cluster_spec_maps_presets_to_short_names_and_models_override() -> None:
    spec = cluster_spec("smollm2-135m-instruct,gemma3-270m", ["gemma3=/m/g.gguf", "extra=/m/x"])
    assert spec == {
        "smollm2": ["--preset", "smollm2-135m-instruct"],
        "gemma3": ["--model", "/m/g.gguf"],
        "extra": ["--model", "/m/x"],
    }
    assert cluster_spec("", ["a=/m/a"]) == {"a": ["--model", "/m/a"]}
