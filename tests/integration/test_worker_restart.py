"""A worker killed mid-fusion is dropped with a reason; restarted at the same address, it serves the next request.

Three plain workers (one replica each) run as separate processes behind one orchestrator, which is
never restarted: the orchestrator must notice the worker is back on its own, within seconds.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest

from coolfusion.cli.cluster import (
    LocalProcess,
    launch,
    orchestrator_argv,
    orchestrator_env,
    stop_processes,
    wait_ready,
    worker_argv,
)
from coolfusion.v1 import orchestrator_pb2 as opb
from coolfusion.v1 import orchestrator_pb2_grpc, worker_pb2

from worker_probes import wait_for_no_sessions

PROMPT = "Tom has 3 apples and buys 4 more."
FAMILIES = ("bpe", "metaspace", "char")
VICTIM = "metaspace"
# Enough tokens that the fusion is still running several steps after the kill.
KILL_TOKENS = 48
# Requests keep coming while the worker is down, as in production; gRPC backs off reconnecting meanwhile.
DOWN_S = 5.0


class Cluster:
    """Worker processes by name and an orchestrator; every process ever started is stopped at the end."""

    def __init__(self, model_dirs: dict[str, Path], log_path: Path):
        self._model_dirs = model_dirs
        self._log = open(log_path, "a")  # noqa: SIM115 - closed in stop()
        self.started: list[LocalProcess] = []
        self.workers: dict[str, LocalProcess] = {}
        self.orchestrator: LocalProcess | None = None

    def start_workers(self, families: tuple[str, ...], port: int = 0) -> None:
        """Starts the workers together (they load in parallel) and waits until they all serve."""
        # argparse keeps the last --port: the one given here overrides worker_argv's "0".
        for family in families:
            argv = worker_argv(["--model", str(self._model_dirs[family])], ["--threads", "1", "--port", str(port)])
            self.workers[family] = launch(family, argv, self._log)
            self.started.append(self.workers[family])
        for family in families:
            wait_ready(self.workers[family], 120)

    def start_orchestrator(self) -> None:
        env = orchestrator_env({name: worker.address for name, worker in self.workers.items()})
        process = launch("orchestrator", orchestrator_argv(), self._log, env)
        self.started.append(process)
        self.orchestrator = wait_ready(process, 60)

    def stop(self) -> None:
        stop_processes(self.started)
        self._log.close()


@pytest.fixture
def cluster(tiny_model_dirs, tmp_path):
    cluster = Cluster(tiny_model_dirs, tmp_path / "cluster.log")
    try:
        cluster.start_workers(FAMILIES)
        cluster.start_orchestrator()
        yield cluster
    finally:
        cluster.stop()


def parameters(max_new_tokens: int) -> opb.FusionParameters:
    prompt = worker_pb2.Prompt(text=PROMPT)
    return opb.FusionParameters(
        prompt=prompt, workers=list(FAMILIES), max_new_tokens=max_new_tokens, include_trace=True
    )


def kill_mid_fusion(cluster: Cluster, stub: orchestrator_pb2_grpc.OrchestratorServiceStub) -> opb.FuseResult:
    """Streams a fusion over all workers, SIGKILLs the victim after two steps; the summary."""
    stream = stub.FuseStream(opb.FuseStreamRequest(parameters=parameters(KILL_TOKENS)), timeout=120)
    for _ in range(2):
        assert next(stream).WhichOneof("event") == "step"
    # Stopping a survivor holds the fusion between steps, so the kill lands mid-request for sure.
    survivor = cluster.workers["bpe"].process
    survivor.send_signal(signal.SIGSTOP)
    try:
        victim = cluster.workers[VICTIM].process
        victim.kill()
        victim.wait()
    finally:
        survivor.send_signal(signal.SIGCONT)
    return list(stream)[-1].summary


def test_a_killed_worker_is_dropped_and_serves_the_next_request_once_restarted(cluster):
    with grpc.insecure_channel(cluster.orchestrator.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        summary = kill_mid_fusion(cluster, stub)
        assert [d.worker for d in summary.dropped] == [VICTIM]
        assert summary.dropped[0].reason.startswith("UNAVAILABLE") and summary.dropped[0].step >= 2
        assert summary.text and summary.timings.steps > 2
        survivors = [cluster.workers[f] for f in FAMILIES if f != VICTIM]
        assert wait_for_no_sessions(survivors) == [0, 0]

        fuse_while_down(stub)

        cluster.start_workers((VICTIM,), port=cluster.workers[VICTIM].port)
        result = stub.Fuse(opb.FuseRequest(parameters=parameters(16)), timeout=60).result
        assert not result.dropped, "the restarted worker was not used by the next request"
        proposers = {name for step in result.trace for c in step.candidates for name in c.proposed_by}
        assert proposers == set(FAMILIES)
        assert wait_for_no_sessions(list(cluster.workers.values())) == [0, 0, 0]


def fuse_while_down(stub: orchestrator_pb2_grpc.OrchestratorServiceStub) -> None:
    """Short requests for DOWN_S seconds: each completes without the victim, dropped as unreachable."""
    deadline = time.monotonic() + DOWN_S
    while time.monotonic() < deadline:
        result = stub.Fuse(opb.FuseRequest(parameters=parameters(4)), timeout=30).result
        assert [(d.worker, d.reason.split(":")[0]) for d in result.dropped] == [(VICTIM, "UNAVAILABLE")]
