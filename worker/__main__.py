"""`coolfusion-worker`: serve one model over coolfusion.v1.WorkerService."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from coolfusion.serving.lifecycle import exit_with_parent
from coolfusion.serving.logs import configure_logging
from coolfusion.serving.security import add_security_flags, security_from_args
from coolfusion.serving.tracing import tracing_from_environment
from coolfusion.worker.backend import ENGINES
from coolfusion.worker.errors import StartupError
from coolfusion.worker.hf.placement import check_device_map_flag, parse_max_memory
from coolfusion.worker.model_files import PRESET_NAMES
from coolfusion.worker.settings import BatchLimits, SessionLimits, VLLMSettings, WorkerSettings

T = TypeVar("T")


def parse_settings(argv: list[str] | None = None) -> WorkerSettings:
    defaults, limits, batch = WorkerSettings(), SessionLimits(), BatchLimits()
    parser = argparse.ArgumentParser(prog="coolfusion-worker", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a Hugging Face model folder (safetensors) or a .gguf file")
    source.add_argument("--preset", help=f"a default model: {PRESET_NAMES}")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--device", default=defaults.device, help="the whole model on one device: cpu, cuda or cuda:N")
    where.add_argument(
        "--device-map",
        type=_checked(check_device_map_flag),
        help="place the model across devices with accelerate: auto, balanced, sequential, or a JSON file "
        "mapping module names to devices (cuda:N, cpu, disk)",
    )
    parser.add_argument(
        "--max-memory",
        type=_checked(parse_max_memory),
        default=(),
        help="with --device-map: the most weight memory per device, e.g. cuda:0=70GiB,cuda:1=70GiB,cpu=64GiB",
    )
    parser.add_argument("--offload-dir", type=Path, help="disk-offloaded weights (default: <cache dir>/offload)")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads; 0 = all cores")
    parser.add_argument("--cache-dir", type=Path, help="where GGUF conversions are kept")
    parser.add_argument(
        "--engine",
        default=defaults.engine,
        choices=ENGINES,
        help="the model engine: transformers (exact, no extra install) or vllm (needs vllm installed)",
    )
    _add_vllm_flags(parser)
    parser.add_argument(
        "--max-batch-sessions", type=int, default=batch.max_sessions, help="sessions advanced by one forward pass"
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=batch.max_tokens, help="tokens in one forward pass (decode + prefill)"
    )
    parser.add_argument(
        "--max-queued-calls", type=int, default=batch.max_queued, help="model calls waiting or running before refusal"
    )
    parser.add_argument(
        "--token-budget", type=int, help="cached tokens over all sessions; default: what the free memory holds"
    )
    parser.add_argument(
        "--memory-headroom",
        type=float,
        default=limits.memory_headroom,
        help="fraction of the free memory a budget sized from memory leaves unused",
    )
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
    _check_placement_and_budget(parser, args)
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
        device_map=args.device_map,
        max_memory=args.max_memory,
        offload_dir=args.offload_dir,
        dtype=args.dtype,
        threads=args.threads,
        cache_dir=args.cache_dir,
        grace_s=args.grace_s,
        log_json=args.log_json,
        metrics_port=args.metrics_port,
        tracing=tracing,
        engine=args.engine,
        vllm=_vllm_settings(parser, args),
        batch=_batch_limits(parser, args),
        limits=SessionLimits(
            token_budget=args.token_budget,
            memory_headroom=args.memory_headroom,
            max_sessions=args.max_sessions,
            idle_ttl_s=args.idle_ttl_s,
            keep_kv_cache=not args.no_cache,
        ),
        tls=tls,
        auth_tokens=auth_tokens,
    )


def _add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    defaults = VLLMSettings()
    group = parser.add_argument_group("vLLM engine (--engine vllm)")
    group.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=defaults.tensor_parallel_size,
        help="GPUs that share the model's layers (default: %(default)s)",
    )
    group.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=defaults.gpu_memory_utilization,
        help="share of each GPU's memory vLLM may take (default: %(default)s)",
    )
    group.add_argument("--block-size", type=int, help="tokens per KV block (default: 16 on a GPU, 32 on the CPU)")
    group.add_argument("--max-model-len", type=int, help="the longest context served (default: the model's)")
    group.add_argument(
        "--kv-cache-gib", type=float, help="KV cache size in GiB (default: from --gpu-memory-utilization; 4 on the CPU)"
    )
    group.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run without compiling or CUDA graphs (default: eager on the CPU, compiled on a GPU)",
    )


def _vllm_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> VLLMSettings:
    """The vLLM flags, checked; given with another engine they are an error, not silently ignored."""
    settings = VLLMSettings(
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib,
        enforce_eager=args.enforce_eager,
    )
    if args.engine != "vllm":
        if settings != VLLMSettings():
            parser.error("the vLLM flags (--tensor-parallel-size ... --enforce-eager) need --engine vllm")
        return settings
    for flag in ("device_map", "offload_dir"):
        if getattr(args, flag):
            parser.error(
                f"--{flag.replace('_', '-')} is the transformers engine's; vLLM places a model with --tensor-parallel-size"
            )
    for flag in ("tensor_parallel_size", "block_size", "max_model_len"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if not 0 < settings.gpu_memory_utilization <= 1:
        parser.error(f"--gpu-memory-utilization must be in (0, 1], got {settings.gpu_memory_utilization}")
    if settings.kv_cache_gib is not None and settings.kv_cache_gib <= 0:
        parser.error(f"--kv-cache-gib must be positive, got {settings.kv_cache_gib}")
    return settings


def _checked(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type whose ValueError message reaches the user (argparse hides it otherwise)."""

    def checked(value: str) -> T:
        try:
            return parse(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return checked


def _check_placement_and_budget(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.device_map is None:
        for flag in ("max_memory", "offload_dir"):
            if getattr(args, flag):
                parser.error(f"--{flag.replace('_', '-')} needs --device-map")
    if args.token_budget is not None and args.token_budget < 1:
        parser.error(f"--token-budget must be at least 1, got {args.token_budget}")
    if not 0 <= args.memory_headroom < 1:
        parser.error(f"--memory-headroom must be in [0, 1), got {args.memory_headroom}")


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

    try:
        asyncio.run(serve(settings))
    except StartupError as error:  # settings this machine cannot serve: a message, not a traceback
        logging.getLogger("coolfusion.worker").critical("cannot start: %s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
