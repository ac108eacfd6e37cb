"""`coolfusion bench`: fused against solo, caches against re-prefilling, per-step costs, load, and
each worker's decode throughput under concurrent sessions, in one run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from coolfusion.cli.cluster import DEFAULT_PRESETS, LocalCluster
from coolfusion.cli.common import DEFAULT_LOG, add_target_flags, cluster_spec, signals_interrupt
from coolfusion.cli.prompts import gsm8k_text
from coolfusion.client import FuseOptions, FusionClient, PromptLike, chat, fusion_parameters
from coolfusion.v1 import worker_pb2, worker_pb2_grpc

# Written for this project in GSM8K's style (not a test item), sent in `coolfusion eval`'s prompt.
DEFAULT_QUESTION = (
    "A baker makes 12 trays of muffins with 9 muffins on each tray. She sells 75 muffins and gives "
    "8 to her neighbours. How many muffins does she have left?"
)
TIMING_FIELDS = ("total_ms", "open_ms", "generate_ms", "score_ms", "worker_compute_ms", "steps")
_COUNT_TIMEOUT_S = 120.0  # counting tokens prefills the whole answer once on a worker
_SESSIONS_SETTLE_S = 5.0  # how long closes may take to reach the workers after the last answer


@dataclass(frozen=True)
class Plan:
    """What to measure: one prompt, answer length caps, concurrency levels, and limits."""

    prompt: PromptLike
    workers: tuple[str, ...]
    lengths: tuple[int, ...]
    concurrency: tuple[int, ...]
    requests: int
    timeout_s: float
    decode_sessions: tuple[int, ...] = (1, 4, 8, 16)  # concurrent sessions per worker, section 6
    decode_tokens: int = 48  # tokens each session generates, section 6


@dataclass(frozen=True)
class Run:
    """One timed request: what came back and where the time went."""

    workers: tuple[str, ...]
    max_new_tokens: int
    wall_ms: float  # client side: request sent to answer received
    text: str
    finish_reason: str
    timings: dict[str, float]  # the service's own FuseResult.timings
    tokens: dict[str, int | None]  # answer length in each counted worker's tokenizer; None: not countable


# requests -----------------------------------------------------------------------------------------


def timed_fuse(client: FusionClient, plan: Plan, workers: tuple[str, ...], max_new_tokens: int) -> Run:
    """One Fuse call. No stop strings: the answer runs to its cap unless a model ends it (EOS)."""
    started = time.perf_counter()
    options = FuseOptions(workers=workers, max_new_tokens=max_new_tokens)
    result = client.fuse(plan.prompt, options, timeout_s=plan.timeout_s)
    wall_ms = (time.perf_counter() - started) * 1000
    if result.dropped:
        dropped = ", ".join(f"{d.worker} ({d.reason})" for d in result.dropped)
        raise SystemExit(f"coolfusion: workers were dropped during the benchmark: {dropped}")
    finish = worker_pb2.FinishReason.Name(result.finish_reason).removeprefix("FINISH_REASON_")
    timings = {name: getattr(result.timings, name) for name in TIMING_FIELDS}
    return Run(workers, max_new_tokens, wall_ms, result.text, finish, timings, {})


class TokenCounter:
    """Counts an answer's tokens as a worker reads it after the prompt, by opening (and closing) a session.

    FuseResult carries no token count; asking the worker itself gives the count the stop rule uses.
    """

    def __init__(self, addresses: dict[str, str], prompt: PromptLike):
        self._addresses = addresses
        self._prompt = fusion_parameters(prompt).prompt

    def count(self, worker: str, answer: str) -> int | None:
        """None when the worker cannot be reached from here (an address inside a cluster, TLS)."""
        session_id = f"bench-count-{uuid.uuid4().hex}"
        request = worker_pb2.OpenSessionRequest(session_id=session_id, prompt=self._prompt, answer_text=answer)
        try:
            with grpc.insecure_channel(self._addresses[worker]) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                opened = stub.OpenSession(request, timeout=_COUNT_TIMEOUT_S)
                stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=session_id), timeout=_COUNT_TIMEOUT_S)
        except grpc.RpcError as error:
            print(f"bench: cannot count tokens on {worker}: {error.code().name}", file=sys.stderr)
            return None
        return opened.context_tokens - opened.prompt_tokens

    def counted(self, run: Run, workers: tuple[str, ...]) -> Run:
        return replace(run, tokens={name: self.count(name, run.text) for name in workers})


def fused_runs(client: FusionClient, plan: Plan, counter: TokenCounter | None) -> list[Run]:
    """The fused answer at every length cap; with a counter, its length in every worker's tokens."""
    runs = []
    for length in plan.lengths:
        run = timed_fuse(client, plan, plan.workers, length)
        runs.append(counter.counted(run, plan.workers) if counter else run)
        _progress(f"fused, cap {length}: {run.wall_ms / 1000:.1f} s, {run.timings['steps']} steps, {run.finish_reason}")
    return runs


def solo_runs(client: FusionClient, plan: Plan, counter: TokenCounter) -> list[Run]:
    """Each worker alone through the same service, at the longest cap, counted in its own tokens."""
    runs = []
    for name in plan.workers:
        run = counter.counted(timed_fuse(client, plan, (name,), max(plan.lengths)), (name,))
        runs.append(run)
        _progress(f"solo {name}, cap {max(plan.lengths)}: {run.wall_ms / 1000:.1f} s, {run.finish_reason}")
    return runs


def load_levels(client: FusionClient, plan: Plan) -> list[dict[str, Any]]:
    """`plan.requests` fused requests at each concurrency level, at the shortest cap; then the
    sessions the workers still hold."""
    length, rows = min(plan.lengths), []
    for level in plan.concurrency:
        with ThreadPoolExecutor(level) as pool:
            started = time.perf_counter()
            runs = list(pool.map(lambda _: timed_fuse(client, plan, plan.workers, length), range(plan.requests)))
            seconds = time.perf_counter() - started
        latencies = sorted(run.wall_ms for run in runs)
        rows.append({
            "concurrency": level, "requests": plan.requests, "max_new_tokens": length, "seconds": seconds,
            "requests_per_s": plan.requests / seconds,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "sessions_left": sessions_left(client, plan.workers),
        })  # fmt: skip
        _progress(f"{level} concurrent: {plan.requests / seconds:.2f} requests/s")
    return rows


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted values (with fewer than 100 values, p99 is the maximum)."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def sessions_left(client: FusionClient, workers: tuple[str, ...]) -> int | None:
    """Sessions still open over `workers` once closes had a few seconds to arrive, as the
    orchestrator's ListWorkers reports them; None when one is not serving. A leak shows as a
    count above zero."""
    deadline = time.monotonic() + _SESSIONS_SETTLE_S
    while True:
        statuses = {status.name: status for status in client.list_workers()}
        if not all(statuses[name].serving for name in workers):
            return None
        count = sum(statuses[name].info.load.open_sessions for name in workers)
        if count == 0 or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


def decode_throughput(client: FusionClient, addresses: dict[str, str], plan: Plan) -> list[dict[str, Any]]:
    """Per worker and level, that many sessions generating chained segments at once, straight on
    the worker (each appends its own last segment, as a fusion step appends the winner)."""
    prompt = fusion_parameters(plan.prompt).prompt
    rows = []
    for name in plan.workers:
        if name not in addresses:
            continue
        alone = None
        for level in plan.decode_sessions:
            tokens, seconds = asyncio.run(_decode_level(addresses[name], prompt, level, plan))
            alone = alone or tokens / seconds
            rows.append({
                "worker": name, "sessions": level, "tokens": tokens, "seconds": seconds,
                "tokens_per_s": tokens / seconds, "vs_one_session": tokens / seconds / alone,
                "sessions_left": sessions_left(client, (name,)),
            })  # fmt: skip
            _progress(f"{name}, {level} sessions decoding: {tokens / seconds:.1f} tokens/s")
    return rows


async def _decode_level(address: str, prompt: worker_pb2.Prompt, sessions: int, plan: Plan) -> tuple[int, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        ids = [f"bench-decode-{uuid.uuid4().hex}" for _ in range(sessions)]
        opened = await asyncio.gather(*(_open(stub, i, prompt, plan.timeout_s) for i in ids))
        try:
            started = time.perf_counter()
            counts = await asyncio.gather(*(_decode(stub, i, o, plan) for i, o in zip(ids, opened)))
            return sum(counts), time.perf_counter() - started
        finally:
            await asyncio.gather(*(_close(stub, i) for i in ids))


async def _open(stub, session_id: str, prompt: worker_pb2.Prompt, timeout_s: float) -> worker_pb2.OpenSessionResponse:
    request = worker_pb2.OpenSessionRequest(session_id=session_id, prompt=prompt)
    return await stub.OpenSession(request, timeout=timeout_s)


async def _decode(stub, session_id: str, opened: worker_pb2.OpenSessionResponse, plan: Plan) -> int:
    """Chained segments until `plan.decode_tokens` are generated (or EOS); returns the tokens."""
    context, answer, append, generated = opened.context_tokens, 0, "", 0
    while generated < plan.decode_tokens:
        request = worker_pb2.GenerateSegmentRequest(
            session_id=session_id, expected_context_tokens=context, expected_answer_chars=answer,
            append_text=append, max_tokens=16,
        )  # fmt: skip
        segment = await stub.GenerateSegment(request, timeout=plan.timeout_s)
        generated += segment.generated_tokens
        answer, context, append = answer + len(append), segment.context_tokens, segment.text
        if segment.finish_reason == worker_pb2.FINISH_REASON_EOS or not segment.text:
            break
    return generated


async def _close(stub, session_id: str) -> None:
    await stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=session_id), timeout=_COUNT_TIMEOUT_S)


def measure_cached(address: str, plan: Plan) -> dict[str, Any]:
    """Everything measured on the caching service: fused runs, solo runs, load levels, decoding."""
    with FusionClient(address) as client:
        addresses = {s.name: s.address for s in client.list_workers()}
        counter = TokenCounter(addresses, plan.prompt)
        _warm_up(client, plan)
        return {
            "fused": fused_runs(client, plan, counter),
            "solo": solo_runs(client, plan, counter),
            "concurrency": load_levels(client, plan),
            "decode": decode_throughput(client, addresses, plan),
        }


def measure_no_cache(address: str, plan: Plan) -> list[Run]:
    """The fused runs again on a service whose workers re-prefill every call."""
    with FusionClient(address) as client:
        _warm_up(client, plan)
        return fused_runs(client, plan, counter=None)  # the texts must equal the cached ones, so their counts


def _warm_up(client: FusionClient, plan: Plan) -> None:
    # The first request pays for connecting and lazy set-up; no figure should include that.
    client.fuse(plan.prompt, FuseOptions(workers=plan.workers, max_new_tokens=4), timeout_s=plan.timeout_s)


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# figures ------------------------------------------------------------------------------------------


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def fused_vs_solo(fused: Run, solos: list[Run]) -> list[dict[str, Any]]:
    """Per worker, fused over solo wall time, whole and per token of that worker."""
    rows = []
    for solo in solos:
        (name,) = solo.workers
        fused_tokens, solo_tokens = fused.tokens.get(name), solo.tokens.get(name)
        fused_per_token, solo_per_token = _ratio(fused.wall_ms, fused_tokens), _ratio(solo.wall_ms, solo_tokens)
        rows.append({
            "worker": name, "max_new_tokens": fused.max_new_tokens,
            "fused_ms": fused.wall_ms, "solo_ms": solo.wall_ms, "wall_ratio": fused.wall_ms / solo.wall_ms,
            "fused_tokens": fused_tokens, "solo_tokens": solo_tokens,
            "fused_finish": fused.finish_reason, "solo_finish": solo.finish_reason,
            "fused_ms_per_token": fused_per_token, "solo_ms_per_token": solo_per_token,
            "per_token_ratio": _ratio(fused_per_token, solo_per_token),
        })  # fmt: skip
    return rows


def cache_vs_no_cache(cached: list[Run], uncached: list[Run], lead: str) -> list[dict[str, Any]]:
    """Re-prefilling over cached wall time at each cap; tokens are the lead worker's."""
    return [
        {
            "max_new_tokens": c.max_new_tokens,
            "tokens": c.tokens.get(lead),
            "steps": c.timings["steps"],
            "cached_ms": c.wall_ms,
            "no_cache_ms": u.wall_ms,
            "ratio": u.wall_ms / c.wall_ms,
            "same_text": c.text == u.text,
            "finish": c.finish_reason,
        }
        for c, u in zip(cached, uncached)
    ]


def orchestrator_overhead(runs: list[Run]) -> list[dict[str, Any]]:
    """The steps' time (after opening sessions) minus the workers' compute, per step."""
    rows = []
    for run in runs:
        t = run.timings
        loop_ms = t["total_ms"] - t["open_ms"]
        rows.append({
            "max_new_tokens": run.max_new_tokens, "steps": t["steps"], "loop_ms": loop_ms,
            "worker_compute_ms": t["worker_compute_ms"], "overhead_ms": loop_ms - t["worker_compute_ms"],
            "overhead_ms_per_step": _ratio(loop_ms - t["worker_compute_ms"], t["steps"]),
        })  # fmt: skip
    return rows


def step_split(runs: list[Run]) -> list[dict[str, Any]]:
    """A step's wall time as generate fan-out + score fan-out + the rest ("other")."""
    rows = []
    for run in runs:
        t, steps = run.timings, run.timings["steps"]
        loop_ms = t["total_ms"] - t["open_ms"]
        rows.append({
            "max_new_tokens": run.max_new_tokens, "step_ms": _ratio(loop_ms, steps),
            "generate_ms": _ratio(t["generate_ms"], steps), "score_ms": _ratio(t["score_ms"], steps),
            "other_ms": _ratio(loop_ms - t["generate_ms"] - t["score_ms"], steps),
        })  # fmt: skip
    return rows


def build_report(plan: Plan, addresses: dict[str, str | None], cached: dict[str, Any], uncached: list[Run]) -> dict:
    """The JSON document: configuration, one key per issue item, and every run with its text."""
    fused = cached["fused"]
    return {
        "config": {**asdict(plan), "stop_strings": [], **addresses},
        "fused_vs_solo": fused_vs_solo(fused[-1], cached["solo"]),  # lengths ascend: the last is the longest
        "cache_vs_no_cache": cache_vs_no_cache(fused, uncached, plan.workers[0]),
        "orchestrator_overhead": orchestrator_overhead(fused),
        "step_split": step_split(fused),
        "concurrency": cached["concurrency"],
        "decode": cached["decode"],
        "runs": {
            "fused": [asdict(r) for r in fused],
            "fused_no_cache": [asdict(r) for r in uncached],
            "solo": [asdict(r) for r in cached["solo"]],
        },
    }


# tables -------------------------------------------------------------------------------------------

_S = 1000.0  # milliseconds per second: wall times print in seconds, per-step times in ms
# One table per issue item: (report key, what was compared, columns of (header, row field, divisor)).
SECTIONS: tuple[tuple[str, str, tuple[tuple[str, str, float], ...]], ...] = (
    (
        "fused_vs_solo",
        (
            "1. Fused vs each worker alone: the same service, prompt and cap; tokens are counted in that worker's "
            "tokenizer, and an answer that ended before its cap (EOS) has fewer of them, so compare per token"
        ),
        (
            ("worker", "worker", 1), ("cap", "max_new_tokens", 1), ("fused s", "fused_ms", _S),
            ("solo s", "solo_ms", _S), ("fused/solo", "wall_ratio", 1), ("fused tokens", "fused_tokens", 1),
            ("solo tokens", "solo_tokens", 1), ("fused ms/token", "fused_ms_per_token", 1),
            ("solo ms/token", "solo_ms_per_token", 1), ("fused/solo per token", "per_token_ratio", 1),
            ("fused finish", "fused_finish", 1), ("solo finish", "solo_finish", 1),
        ),
    ),
    (
        "cache_vs_no_cache",
        (
            "2. Session caches vs re-prefilling the whole context at every call (--no-cache workers); "
            "tokens are the first worker's"
        ),
        (
            ("cap", "max_new_tokens", 1), ("tokens", "tokens", 1), ("steps", "steps", 1),
            ("cached s", "cached_ms", _S), ("no-cache s", "no_cache_ms", _S), ("no-cache/cached", "ratio", 1),
            ("same text", "same_text", 1), ("finish", "finish", 1),
        ),
    ),
    (
        "orchestrator_overhead",
        "3. Orchestrator overhead: the steps' time minus the workers' compute (slowest worker of each phase)",
        (
            ("cap", "max_new_tokens", 1), ("steps", "steps", 1), ("steps ms", "loop_ms", 1),
            ("worker compute ms", "worker_compute_ms", 1), ("overhead ms", "overhead_ms", 1),
            ("overhead ms/step", "overhead_ms_per_step", 1),
        ),
    ),
    (
        "step_split",
        (
            "4. One step's wall time: generate fan-out, score fan-out, and other (orchestrator work around them, "
            "closing sessions, and the last generate call, which only finds the cap reached)"
        ),
        (
            ("cap", "max_new_tokens", 1), ("step ms", "step_ms", 1), ("generate ms", "generate_ms", 1),
            ("score ms", "score_ms", 1), ("other ms", "other_ms", 1),
        ),
    ),
    (
        "concurrency",
        (
            "5. Concurrent fused requests, client-side latency (the p99 of fewer than 100 requests is their maximum), "
            "and the sessions the workers still hold once closes arrived (waited for up to 5 s; n/a: a worker not serving)"
        ),
        (
            ("concurrent", "concurrency", 1), ("requests", "requests", 1), ("cap", "max_new_tokens", 1),
            ("seconds", "seconds", 1), ("requests/s", "requests_per_s", 1), ("p50 s", "p50_ms", _S),
            ("p99 s", "p99_ms", _S), ("sessions left", "sessions_left", 1),
        ),
    ),
    (
        "decode",
        (
            "6. Worker decode throughput: that many sessions on one worker generating chained segments at once "
            "(continuous batching advances them together)"
        ),
        (
            ("worker", "worker", 1), ("sessions", "sessions", 1), ("tokens", "tokens", 1), ("seconds", "seconds", 1),
            ("tokens/s", "tokens_per_s", 1), ("vs 1 session", "vs_one_session", 1),
            ("sessions left", "sessions_left", 1),
        ),
    ),
)  # fmt: skip


def render_report(report: dict[str, Any]) -> str:
    """The sections that have rows, as Markdown tables under a line saying what was compared."""
    tables = []
    for key, title, columns in SECTIONS:
        if report[key]:
            rows = [[_cell(row[field], divisor) for _, field, divisor in columns] for row in report[key]]
            tables.append(f"{title}\n\n{markdown_table([header for header, _, _ in columns], rows)}")
    return "\n\n".join(tables)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _cell(value: Any, divisor: float) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool | str | int):
        return str(value)
    scaled = value / divisor
    return f"{scaled:,.0f}" if abs(scaled) >= 100 else f"{scaled:.2f}"


# command line -------------------------------------------------------------------------------------


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `coolfusion bench` (its parser is registered in main.py)."""
    add_target_flags(parser, "start a local cluster, then one with --no-cache workers, one at a time")
    parser.add_argument(
        "--no-cache-orchestrator", metavar="ADDR", help="section 2: the same workers, started with --no-cache"
    )
    parser.add_argument("--skip-no-cache", action="store_true", help="leave out section 2 (caches vs re-prefilling)")
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="--local: model presets; '' for none")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="--local: a worker's model")
    parser.add_argument("--workers", default="", help="comma-separated worker names (default: all serving)")
    parser.add_argument(
        "--lengths", default="64,256,512", help="answer length caps, tokens of the first worker (default: %(default)s)"
    )
    parser.add_argument("--concurrency", default="1,4,8", help="concurrent request levels (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=8, help="requests per concurrency level (default: %(default)s)")
    parser.add_argument(
        "--decode-sessions", default="1,4,8,16", help="section 6: concurrent sessions per worker (default: %(default)s)"
    )
    parser.add_argument(
        "--decode-tokens", type=int, default=48, help="section 6: tokens each session generates (default: %(default)s)"
    )
    parser.add_argument(
        "--prompt", help="the user message (default: the GSM8K prompt of `eval` with a sample question)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures and every run here")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="deadline of each request, seconds")
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG, help="where a --local cluster's logs go")


def positive_ints(text: str, flag: str) -> tuple[int, ...]:
    """A comma-separated flag as distinct positive integers, ascending."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise SystemExit(f"coolfusion: {flag} wants comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise SystemExit(f"coolfusion: {flag} wants positive integers, got {text!r}")
    return tuple(values)


def check_flags(args: argparse.Namespace) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Length caps, concurrency levels, decode levels; checked before a local cluster spends minutes starting."""
    lengths, levels = positive_ints(args.lengths, "--lengths"), positive_ints(args.concurrency, "--concurrency")
    decode_levels = positive_ints(args.decode_sessions, "--decode-sessions")
    if args.requests < 1 or args.decode_tokens < 1:
        raise SystemExit("coolfusion: --requests and --decode-tokens must be at least 1")
    if args.local and args.no_cache_orchestrator:
        raise SystemExit("coolfusion: --local starts its own --no-cache cluster; drop --no-cache-orchestrator")
    if not (args.local or args.skip_no_cache or args.no_cache_orchestrator):
        raise SystemExit("coolfusion: section 2 needs --no-cache-orchestrator ADDR (or --local, or --skip-no-cache)")
    return lengths, levels, decode_levels


def run_bench(args: argparse.Namespace) -> int:
    lengths, levels, decode_levels = check_flags(args)
    spec = cluster_spec(args.presets, args.model) if args.local else {}
    prompt = chat(args.prompt or gsm8k_text(DEFAULT_QUESTION))
    with _service(args, spec, no_cache=False) as address:
        workers = _workers(args, spec, address)
        plan = Plan(prompt, workers, lengths, levels, args.requests, args.timeout_s, decode_levels, args.decode_tokens)
        cached = measure_cached(address, plan)
    uncached = []
    if not args.skip_no_cache:
        with _service(args, spec, no_cache=True) as no_cache_address:
            uncached = measure_no_cache(no_cache_address, plan)
    addresses = {"orchestrator": None if args.local else args.orchestrator,
                 "no_cache_orchestrator": args.no_cache_orchestrator}  # fmt: skip
    report = build_report(plan, addresses, cached, uncached)
    print(render_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nJSON: {args.json}")
    return 0


def _workers(args: argparse.Namespace, spec: dict[str, list[str]], address: str) -> tuple[str, ...]:
    named = [name for name in args.workers.split(",") if name]
    if named or spec:
        return tuple(named or spec)
    with FusionClient(address) as client:
        serving = tuple(status.name for status in client.list_workers() if status.serving)
    if not serving:
        raise SystemExit(f"coolfusion: no serving workers at {address}")
    return serving


@contextlib.contextmanager
def _service(args: argparse.Namespace, spec: dict[str, list[str]], no_cache: bool) -> Iterator[str]:
    """The orchestrator to measure: a given address, or a local cluster that lives for the block."""
    if not args.local:
        yield args.no_cache_orchestrator if no_cache else args.orchestrator
        return
    # One cluster at a time: two would share the cores and slow each other down.
    flags = ("--no-cache",) if no_cache else ()
    _progress(f"starting workers {', '.join(spec)}{' with --no-cache' if no_cache else ''} (logs: {args.log})")
    with signals_interrupt(), LocalCluster(spec, log_path=args.log, worker_flags=flags) as cluster:
        yield cluster.address
