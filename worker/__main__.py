"""`coolfusion-worker`: serve one model over coolfusion.v1.WorkerService."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from coolfusion.serving.lifecycle import exit_with_parent
from coolfusion.serving.logs import configure_logging
from coolfusion.serving.security import add_security_flags, security_from_args
from coolfusion.serving.tracing import tracing_from_environment
from coolfusion.worker.backend import ENGINES
from coolfusion.worker.settings import BatchLimits, SessionLimits, WorkerSettings


def parse_settings(argv: list[str] | None = None) -> WorkerSettings:
    defaults, limits, batch = WorkerSettings(), SessionLimits(), BatchLimits()
    parser = argparse.ArgumentParser(prog="coolfusion-worker", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a Hugging Face model folder (safetensors) or a .gguf file")
    source.add_argument("--preset", help="a default model: smollm2-135m-instruct or gemma3-270m")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads; 0 = all cores")
    parser.add_argument("--cache-dir", type=Path, help="where GGUF conversions are kept")
    parser.add_argument("--engine", default=defaults.engine, choices=ENGINES, help="the model backend")
    parser.add_argument(
        "--max-batch-sessions", type=int, default=batch.max_sessions, help="sessions advanced by one forward pass"
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=batch.max_tokens, help="tokens in one forward pass (decode + prefill)"
    )
    parser.add_argument(
        "--max-queued-calls", type=int, default=batch.max_queued, help="model calls waiting or running before refusal"
    )
    parser.add_argument("--token-budget", type=int, default=limits.token_budget, help="cached tokens, all sessions")
    parser.add_argument("--max-sessions", type=int, default=limits.max_sessions)
    parser.add_argument("--idle-ttl-s", type=float, default=limits.idle_ttl_s)
    parser.add_argument(
        "--no-cache", action="store_true", help="drop each session's KV cache after every call (a benchmark baseline)"
    )
    parser.add_argument("--grace-s", type=float, default=defaults.grace_s, help="drain time on SIGTERM")
    parser.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics on --host (0 picks a port); default: off")
    add_security_flags(parser)
    args = parser.parse_args(argv)
    tls, auth_tokens = security_from_args(parser, args)
    try:
        tracing = tracing_from_environment(os.environ)  # OTEL_TRACES_EXPORTER and friends
    except ValueError as error:
        parser.error(str(error))
    return WorkerSettings(
        model=args.model,
        preset=args.preset,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        cache_dir=args.cache_dir,
        grace_s=args.grace_s,
        log_json=args.log_json,
        metrics_port=args.metrics_port,
        tracing=tracing,
        engine=args.engine,
        batch=_batch_limits(parser, args),
        limits=SessionLimits(
            token_budget=args.token_budget,
            max_sessions=args.max_sessions,
            idle_ttl_s=args.idle_ttl_s,
            keep_kv_cache=not args.no_cache,
        ),
        tls=tls,
        auth_tokens=auth_tokens,
    )


def _batch_limits(parser: argparse.ArgumentParser, args: argparse.Namespace) -> BatchLimits:
    limits = BatchLimits(args.max_batch_sessions, args.max_batch_tokens, args.max_queued_calls)
    for flag, value in vars(args).items():
        if flag.startswith(("max_batch_", "max_queued_")) and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    return limits


def main(argv: list[str] | None = None) -> None:
    exit_with_parent()
    settings = parse_settings(argv)
    configure_logging(settings.log_json)
    from coolfusion.worker.server import serve  # after flag parsing: --help should not import torch

    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
