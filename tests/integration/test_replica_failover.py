"""Replicas of one worker: sessions spread over them, and a request survives the death of its pod.

Three worker processes on the same tiny model stand in for three pods of worker "bpe". The tests
run in file order on one cluster: each kills more of the bpe replicas than the one before.
"""

from __future__ import annotations

import signal

import grpc
import pytest
import yaml

from coolfusion.cli.cluster import launch, orchestrator_argv, stop_processes, wait_ready, worker_argv
from coolfusion.v1 import orchestrator_pb2 as opb
from coolfusion.v1 import orchestrator_pb2_grpc, worker_pb2

from reference import PAPER_STRATEGY, ReferenceModel, reference_fuse
from worker_probes import open_sessions, tiny_references, wait_for_no_sessions

PROMPT = "Tom has 3 apples and buys 4 more."
# Several steps after the kill; the cache-free reference costs seconds per dozen tokens.
KILL_TOKENS = 24


@pytest.fixture(scope="module")
def cluster(tiny_model_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("replicas")
    log = open(folder / "cluster.log", "a")  # noqa: SIM115 - closed below
    bpe_argv = worker_argv(["--model", str(tiny_model_dirs["bpe"])], ["--threads", "1"])
    char_argv = worker_argv(["--model", str(tiny_model_dirs["char"])], ["--threads", "1"])
    workers = {f"bpe-{i}": launch(f"bpe-{i}", bpe_argv, log) for i in range(3)}  # three pods of one model
    workers["char"] = launch("char", char_argv, log)
    processes = list(workers.values())
    try:
        for worker in processes:
            wait_ready(worker, 120)
        bpe = ",".join(workers[f"bpe-{i}"].address for i in range(3))
        registry = folder / "workers.yaml"
        registry.write_text(
            yaml.safe_dump(
                {
                    "workers": [
                        {"name": "bpe", "address": bpe, "replicas": "static"},
                        {"name": "char", "address": workers["char"].address},
                    ]
                }
            )
        )
        orchestrator = wait_ready(launch("orchestrator", orchestrator_argv(["--workers", str(registry)]), log), 60)
        processes.append(orchestrator)
        with grpc.insecure_channel(orchestrator.address) as channel:
            yield {
                "stub": orchestrator_pb2_grpc.OrchestratorServiceStub(channel),
                "replicas": [workers[f"bpe-{i}"] for i in range(3)],
                "char": workers["char"],
                "log": folder / "cluster.log",
            }
    finally:
        stop_processes(processes)
        log.close()


@pytest.fixture(scope="module")
def references(tiny_model_dirs) -> dict[str, ReferenceModel]:
    return tiny_references(tiny_model_dirs, ("bpe", "char"))


def parameters(max_new_tokens: int) -> opb.FusionParameters:
    prompt = worker_pb2.Prompt(text=PROMPT)
    return opb.FusionParameters(
        prompt=prompt, workers=["bpe", "char"], max_new_tokens=max_new_tokens, strategy=PAPER_STRATEGY
    )


def test_concurrent_requests_are_spread_over_the_replicas(cluster):
    streams = [
        cluster["stub"].FuseStream(opb.FuseStreamRequest(parameters=parameters(400)), timeout=60) for _ in range(3)
    ]
    try:
        for stream in streams:
            assert next(stream).WhichOneof("event") == "step"
        assert open_sessions(cluster["replicas"]) == [1, 1, 1]
    finally:
        for stream in streams:
            stream.cancel()
    assert wait_for_no_sessions(cluster["replicas"]) == [0, 0, 0]


def test_a_request_whose_replica_is_killed_completes_on_another_with_the_same_text(cluster, references):
    stream = cluster["stub"].FuseStream(opb.FuseStreamRequest(parameters=parameters(KILL_TOKENS)), timeout=120)
    char = cluster["char"].process
    for _ in range(2):
        assert next(stream).WhichOneof("event") == "step"
    # Every step waits for char: stopping it holds the request between steps while its pod dies.
    char.send_signal(signal.SIGSTOP)
    try:
        replicas = cluster["replicas"]
        counts = open_sessions(replicas)
        assert sorted(counts) == [0, 0, 1], "the request must still hold its bpe session on one replica"
        victim = replicas[counts.index(1)]
        victim.process.kill()  # SIGKILL: the pod is gone, with the session's cache
        victim.process.wait()
    finally:
        char.send_signal(signal.SIGCONT)
    summary = list(stream)[-1].summary
    assert not summary.dropped
    assert summary.text == reference_fuse([references["bpe"], references["char"]], PROMPT, KILL_TOKENS)[0]
    assert f"moving bpe's session off replica {victim.address}" in cluster["log"].read_text()


def test_with_every_replica_dead_the_worker_is_dropped_as_unavailable(cluster, references):
    for replica in cluster["replicas"]:
        replica.process.kill()
        replica.process.wait()
    result = cluster["stub"].Fuse(opb.FuseRequest(parameters=parameters(16)), timeout=60).result
    assert [d.worker for d in result.dropped] == ["bpe"]
    assert result.dropped[0].reason.startswith("UNAVAILABLE") and "all 3 replicas tried" in result.dropped[0].reason
    assert result.text == reference_fuse([references["char"]], PROMPT, 16)[0]
