"""Test helpers shared by the integration tests: the models, tiny reference models, session counts, process memory."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from transformers import AutoModelForCausalLM, AutoTokenizer

from coolfusion.cli.cluster import (
    LocalCluster,
    LocalProcess,
    launch,
    orchestrator_argv,
    orchestrator_env,
    stop_processes,
    wait_ready,
)
from coolfusion.v1 import worker_pb2, worker_pb2_grpc

from reference import ReferenceModel

# The default pair of real models (the real_model tests), by the short names the tests use.
REAL_PAIR = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}


def tiny_references(dirs: dict[str, Path], families: Iterable[str]) -> dict[str, ReferenceModel]:
    """Reference models (tests/reference.py) for the tiny models of `families`."""
    return {
        f: ReferenceModel(
            f, AutoModelForCausalLM.from_pretrained(dirs[f]).eval(), AutoTokenizer.from_pretrained(dirs[f])
        )
        for f in families
    }


@contextmanager
def calibrated_orchestrator(
    cluster: LocalCluster, calibrations: Path, flags: list[str], log: Path
) -> Iterator[LocalProcess]:
    """A second orchestrator over `cluster`'s workers with every calibration file in `calibrations`
    loaded, and `flags`; stopped on leaving."""
    loaded = [arg for path in sorted(calibrations.glob("*.json")) for arg in ("--calibration", str(path))]
    env = orchestrator_env({name: worker.address for name, worker in cluster.workers.items()})
    with open(log, "a") as written:
        process = wait_ready(launch("calibrated", orchestrator_argv([*loaded, *flags]), written, env), 60)
        try:
            yield process
        finally:
            stop_processes([process])


def open_sessions(workers: Iterable[LocalProcess]) -> list[int]:
    """Sessions open on each worker process, from the worker's own GetInfo."""
    counts = []
    for worker in workers:
        with grpc.insecure_channel(worker.address) as channel:
            info = worker_pb2_grpc.WorkerServiceStub(channel).GetInfo(worker_pb2.GetInfoRequest(), timeout=5)
            counts.append(info.load.open_sessions)
    return counts


def wait_for_no_sessions(workers: list[LocalProcess], timeout_s: float = 10.0) -> list[int]:
    """Polls until every worker has closed its sessions (closing is asynchronous); the last counts."""
    deadline = time.monotonic() + timeout_s
    while any(counts := open_sessions(workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return counts


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS from Linux's /proc), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"process {pid} reports no VmRSS (a kernel thread, or not Linux)")
