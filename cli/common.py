"""What several subcommands share: target and strategy flags, the local cluster's spec, start-up and signals."""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TextIO

from coolfusion.calibration import Calibration, shipped_calibrations
from coolfusion.cli.cluster import DEFAULT_PRESETS, LocalCluster
from coolfusion.client import AGGREGATIONS, REPETITION_GUARDS, fusion_strategy
from coolfusion.v1 import orchestrator_pb2

DEFAULT_ORCHESTRATOR = "127.0.0.1:50050"
# Short worker names for the presets, so segment labels stay readable.
PRESET_NAMES = {"smollm2-135m-instruct": "smollm2", "gemma3-270m": "gemma3", "qwen2.5-coder-0.5b-instruct": "qwen"}
DEFAULT_LOG = Path(tempfile.gettempdir()) / "coolfusion-cluster.log"


# flags --------------------------------------------------------------------------------------------


def add_orchestrator_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--orchestrator ADDR; main() fills in the environment's or the default address when it is left out."""
    default = f"$COOLFUSION_ORCHESTRATOR or {DEFAULT_ORCHESTRATOR}"
    parser.add_argument("--orchestrator", metavar="ADDR", help=f"host:port (default: {default})")


def add_target_flags(parser: argparse.ArgumentParser, local_help: str) -> None:
    """--orchestrator ADDR, or --local to start a cluster here (eval, bench)."""
    target = parser.add_mutually_exclusive_group()
    add_orchestrator_flag(target)
    target.add_argument("--local", action="store_true", help=local_help)


def add_strategy_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for FusionStrategy; each left out takes the orchestrator's default."""
    group = parser.add_argument_group("fusion strategy (default: the orchestrator's)")
    group.add_argument("--aggregation", default="", choices=AGGREGATIONS)
    group.add_argument("--repetition-guard", default="", choices=REPETITION_GUARDS)
    group.add_argument("--weight", action="append", default=[], metavar="WORKER=W", help="score weight (repeatable)")
    group.add_argument(
        "--prompt-template", action="append", default=[], metavar="WORKER=TEMPLATE",
        help="plain-text template with {prompt} for one worker (repeatable)",
    )  # fmt: skip


def strategy_from_args(args: argparse.Namespace) -> orchestrator_pb2.FusionStrategy:
    weights = {name: float(value) for name, value in _pairs(args.weight, "--weight")}
    templates = dict(_pairs(args.prompt_template, "--prompt-template"))
    return fusion_strategy(args.aggregation, args.repetition_guard, weights, templates)


def _pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    if bad := [v for v in values if "=" not in v]:
        raise SystemExit(f"coolfusion: {flag} takes WORKER=VALUE, got {bad[0]!r}")
    return [(name, value) for name, _, value in (v.partition("=") for v in values)]


# a local cluster ----------------------------------------------------------------------------------


def cluster_spec(presets: str, models: list[str]) -> dict[str, list[str]]:
    """Worker name -> worker model arguments; `NAME=PATH` entries add workers or replace same-named ones."""
    spec = {PRESET_NAMES.get(p, p): ["--preset", p] for p in presets.split(",") if p.strip()}
    for entry in models:
        name, sep, path = entry.partition("=")
        if not (sep and name and path):
            raise SystemExit(f"coolfusion: --model wants NAME=PATH, got {entry!r}")
        spec[name] = ["--model", path]
    if not spec:
        raise SystemExit("coolfusion: no workers: give --presets or --model")
    return spec


def default_spec() -> dict[str, list[str]]:
    """The default pair (smollm2, gemma3), as `demo` and `eval --local` run it."""
    return cluster_spec(",".join(DEFAULT_PRESETS), [])


def start_cluster(spec: dict[str, list[str]], log: Path, out: TextIO, gateway_port: int | None = None) -> LocalCluster:
    """Starts the workers of `spec`, an orchestrator with the calibrations that ship for them and,
    given a port (0: any), the gateway, telling `out` what it does and how long it took."""
    described = ", ".join(f"{name} ({' '.join(model_args)})" for name, model_args in spec.items())
    print(f"starting workers: {described}", file=out)
    print(f"server logs: {log}", file=out, flush=True)
    flags, default = calibration_flags(spec)
    if default:
        print(f"default strategy: calibration {default} (fitted on the task families' tuning parts)", file=out)
    started = time.monotonic()
    cluster = LocalCluster(spec, log_path=log, gateway_port=gateway_port, orchestrator_flags=flags)
    cluster.start()  # stops what it started on failure
    print(f"cluster up in {time.monotonic() - started:.0f} s", file=out, flush=True)
    return cluster


def calibration_flags(spec: dict[str, list[str]]) -> tuple[tuple[str, ...], str | None]:
    """The orchestrator flags that load every shipped calibration fitted for workers of `spec`
    (presets, by name and model), and make the pooled fit for exactly these workers the default
    where one ships; with that default's name, or None."""
    presets = {name: args[1] for name, args in spec.items() if args[:1] == ["--preset"]}
    flags: list[str] = []
    names = []
    for path, calibration in shipped_calibrations():  # a handful of small files, read at start-up
        if all(presets.get(w.name) == w.model_id for w in calibration.workers):
            flags += ["--calibration", str(path)]
            names.append(calibration.name)
    pooled = {c.name: c for _, c in shipped_calibrations()}.get(f"pooled-{'-'.join(spec)}")
    if pooled is None or pooled.name not in names or not _won(pooled):
        return tuple(flags), None
    return (*flags, "--default-calibration", pooled.name), pooled.name


def _won(calibration: Calibration) -> bool:
    """Whether the fit beat the product's default on its tuning items: only then does it replace it."""
    return calibration.tuning.get("correct", 0) > calibration.tuning.get("reached", {}).get("default", math.inf)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Turns the first SIGTERM or SIGINT into KeyboardInterrupt, and ignores later ones.

    SIGTERM must unwind like Ctrl-C so the cluster's processes (in their own sessions, so they see
    neither signal) are always stopped; a second signal must not cut that cleanup short.
    """
    fired = False

    def interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
