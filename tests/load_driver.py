"""Load on a local cluster of tiny-model workers, and figures: concurrent Fuse requests for a fixed
time (`measure`), or a soak of many fusions at changing concurrency with some callers cancelling
mid-stream (`measure_soak`).

Shared by tests/integration/test_load.py and test_soak.py, which assert on the figures, and
scripts/load_test.py and scripts/soak.py, which print them.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from coolfusion.cli.cluster import LocalCluster
from coolfusion.v1 import orchestrator_pb2 as opb
from coolfusion.v1 import orchestrator_pb2_grpc, worker_pb2

from tiny_models import CORPUS, FAMILIES
from worker_probes import rss_kib, wait_for_no_sessions

# Prompts of a few hundred to a thousand tokens, so that a session's KV cache is big enough (about
# 0.2-1 MiB on the tiny models) for a leak of them to show in RSS; each starts elsewhere in the corpus,
# so that answers differ.
_LINES = CORPUS.splitlines(keepends=True)
PROMPTS = tuple("".join(_LINES[i:] + _LINES[:i]) for i in range(0, len(_LINES), 5))
# Short answers: the load is about sessions opened and closed concurrently, and latency and the
# warm-up round grow with the answer length.
MAX_NEW_TOKENS = 8
# One request per client leaves the allocators growing for a few seconds more (by up to ~14 MiB per
# worker measured here); after a few seconds of the full load they stay flat.
WARMUP_S = 5.0
# A request queued behind many others on two loaded cores still finishes well within this.
REQUEST_TIMEOUT_S = 60.0


@dataclass
class LoadFigures:
    """What the clients saw: requests completed, failed, or completed with a worker dropped."""

    completed: int = 0
    errors: list[str] = field(default_factory=list)  # "CODE: details" per failed request
    dropped: list[str] = field(default_factory=list)  # "worker: reason" per worker dropped from a request
    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s else 0.0

    def latency_s(self, quantile: float) -> float:
        """Nearest-rank quantile of the completed requests' latencies (NaN when none completed)."""
        if not self.latencies_s:
            return math.nan
        ordered = sorted(self.latencies_s)
        return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]


@dataclass(frozen=True)
class WorkerFigures:
    """One worker process: sessions left open after the load, resident memory before and after."""

    name: str
    sessions_after: int
    rss_before_kib: int
    rss_after_kib: int


@dataclass(frozen=True)
class LoadRun:
    concurrency: int
    load: LoadFigures
    workers: list[WorkerFigures]

    def report(self) -> str:
        load = self.load
        totals = (
            f"concurrency {self.concurrency}, {load.elapsed_s:.1f} s: {load.completed} requests completed, "
            f"{len(load.errors)} errors, {len(load.dropped)} workers dropped, {load.requests_per_s:.2f} requests/s"
        )
        lines = [
            totals,
            f"latency p50 {load.latency_s(0.5):.2f} s, p99 {load.latency_s(0.99):.2f} s",
            *(f"error: {e}" for e in load.errors[:5]),
            *(f"dropped: {d}" for d in load.dropped[:5]),
        ]
        for w in self.workers:
            lines.append(
                f"worker {w.name}: {w.sessions_after} sessions open after; RSS {w.rss_before_kib / 1024:.1f} MiB "
                f"after warm-up, {w.rss_after_kib / 1024:.1f} MiB after load"
            )
        return "\n".join(lines)


def tiny_cluster(model_dirs: dict[str, Path], n_workers: int, log_path: Path | None = None) -> LocalCluster:
    """An unstarted cluster of `n_workers` tiny-model workers, the model families taken in turn."""
    specs = {}
    for i in range(n_workers):
        family = FAMILIES[i % len(FAMILIES)]
        name = family if i < len(FAMILIES) else f"{family}-{i // len(FAMILIES)}"
        specs[name] = ["--model", str(model_dirs[family])]
    return LocalCluster(specs, log_path, ready_timeout_s=120)


def measure(
    cluster: LocalCluster,
    duration_s: float,
    concurrency: int,
    max_new_tokens: int = MAX_NEW_TOKENS,
    warmup_s: float = WARMUP_S,
) -> LoadRun:
    """Warms up with `warmup_s` seconds of the same load, then loads the cluster for `duration_s`."""
    workers = list(cluster.workers.values())
    asyncio.run(drive(cluster.address, warmup_s, concurrency, max_new_tokens))
    wait_for_no_sessions(workers)
    before = [rss_kib(w.process.pid) for w in workers]
    load = asyncio.run(drive(cluster.address, duration_s, concurrency, max_new_tokens))
    sessions = wait_for_no_sessions(workers)
    after = [rss_kib(w.process.pid) for w in workers]
    figures = [WorkerFigures(w.name, *numbers) for w, *numbers in zip(workers, sessions, before, after)]
    return LoadRun(concurrency, load, figures)


async def drive(address: str, duration_s: float, concurrency: int, max_new_tokens: int) -> LoadFigures:
    """`concurrency` clients each send Fuse requests back to back until `duration_s` has passed
    (each sends at least one); requests in flight at the end are awaited and counted."""
    figures = LoadFigures()
    started = time.monotonic()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        clients = (_client(stub, figures, started + duration_s, i, max_new_tokens) for i in range(concurrency))
        await asyncio.gather(*clients)
    figures.elapsed_s = time.monotonic() - started
    return figures


async def _client(stub, figures: LoadFigures, end: float, index: int, max_new_tokens: int) -> None:
    sent = 0
    while sent == 0 or time.monotonic() < end:
        prompt = worker_pb2.Prompt(text=PROMPTS[(index + sent) % len(PROMPTS)])
        request = opb.FuseRequest(parameters=opb.FusionParameters(prompt=prompt, max_new_tokens=max_new_tokens))
        sent += 1
        started = time.monotonic()
        try:
            response = await stub.Fuse(request, timeout=REQUEST_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            figures.errors.append(f"{error.code().name}: {error.details()}")
            continue
        figures.latencies_s.append(time.monotonic() - started)
        figures.completed += 1
        figures.dropped += [f"{d.worker}: {d.reason}" for d in response.result.dropped]


# The soak's concurrency levels, taken in turn, a phase of requests each: 1 to 16 callers at once.
SOAK_LEVELS = (1, 4, 16, 8, 2, 12)


@dataclass
class SoakFigures:
    """What the soak's callers saw."""

    completed: int = 0
    cancelled: int = 0  # streams the caller dropped after the first chosen segment, on purpose
    errors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class SoakRun:
    total: int
    figures: SoakFigures
    workers: list[WorkerFigures]

    @property
    def clean(self) -> bool:
        return not self.figures.errors and not self.figures.dropped and not any(w.sessions_after for w in self.workers)

    def report(self) -> str:
        f = self.figures
        totals = (
            f"{self.total} fusions at concurrency {'/'.join(map(str, SOAK_LEVELS))} in {f.elapsed_s:.1f} s: "
            f"{f.completed} completed, {f.cancelled} cancelled mid-stream on purpose, {len(f.errors)} errors, "
            f"{len(f.dropped)} workers dropped"
        )
        lines = [
            totals,
            *(f"error: {e}" for e in f.errors[:5]),
            *(f"dropped: {d}" for d in f.dropped[:5]),
        ]
        for w in self.workers:
            lines.append(
                f"worker {w.name}: {w.sessions_after} sessions open after; RSS {w.rss_before_kib / 1024:.1f} MiB "
                f"after warm-up, {w.rss_after_kib / 1024:.1f} MiB after the soak"
            )
        return "\n".join(lines)


def measure_soak(cluster: LocalCluster, total: int, cancel_every: int = 10, warmup: int = 48) -> SoakRun:
    """`warmup` fusions, then `total` more through the soak's levels; every `cancel_every`-th is a
    stream its caller drops after the first chosen segment."""
    workers = list(cluster.workers.values())
    asyncio.run(soak(cluster.address, warmup, cancel_every))
    wait_for_no_sessions(workers)
    before = [rss_kib(w.process.pid) for w in workers]
    figures = asyncio.run(soak(cluster.address, total, cancel_every))
    sessions = wait_for_no_sessions(workers)
    after = [rss_kib(w.process.pid) for w in workers]
    return SoakRun(total, figures, [WorkerFigures(w.name, *n) for w, *n in zip(workers, sessions, before, after)])


async def soak(address: str, total: int, cancel_every: int) -> SoakFigures:
    figures = SoakFigures()
    started = time.monotonic()
    phase = max(1, total // len(SOAK_LEVELS))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        sent, levels = 0, itertools.cycle(SOAK_LEVELS)
        while sent < total:
            level, count = next(levels), min(phase, total - sent)
            queue = iter(range(sent, sent + count))
            await asyncio.gather(*(_soak_caller(stub, queue, figures, cancel_every) for _ in range(level)))
            sent += count
    figures.elapsed_s = time.monotonic() - started
    return figures


async def _soak_caller(stub, queue, figures: SoakFigures, cancel_every: int) -> None:
    for index in queue:  # callers share the iterator: each request is sent once
        prompt = worker_pb2.Prompt(text=PROMPTS[index % len(PROMPTS)])
        parameters = opb.FusionParameters(prompt=prompt, max_new_tokens=MAX_NEW_TOKENS)
        try:
            if cancel_every and index % cancel_every == cancel_every - 1:
                call = stub.FuseStream(opb.FuseStreamRequest(parameters=parameters), timeout=REQUEST_TIMEOUT_S)
                await call.read()  # the first chosen segment, then the caller goes away
                call.cancel()
                figures.cancelled += 1
                continue
            response = await stub.Fuse(opb.FuseRequest(parameters=parameters), timeout=REQUEST_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            figures.errors.append(f"{error.code().name}: {error.details()}")
            continue
        figures.completed += 1
        figures.dropped += [f"{d.worker}: {d.reason}" for d in response.result.dropped]
