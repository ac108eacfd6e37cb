"""What several subcommands share: target and strategy flags, the local cluster's spec, start-up and signals."""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from coolfusion.calibration import Calibration, CalibrationError, load_calibration, shipped_calibrations
from coolfusion.calibration.items import POOLED
from coolfusion.cli.cluster import DEFAULT_PRESETS, LocalCluster
from coolfusion.client import AGGREGATIONS, REPETITION_GUARDS, fusion_strategy
from coolfusion.v1 import orchestrator_pb2

DEFAULT_ORCHESTRATOR = "127.0.0.1:50050"
# Short worker names for the presets, so segment labels stay readable.
PRESET_NAMES = {"smollm2-135m-instruct": "smollm2", "gemma3-270m": "gemma3", "qwen2.5-coder-0.5b-instruct": "qwen"}
DEFAULT_LOG = Path(tempfile.gettempdir()) / "coolfusion-cluster.log"
# A local cluster's routes are the gateway's model names: its fusion model ("coolfusion"), a slash
# and the calibration's scope, e.g. coolfusion/facts.
ROUTE_PREFIX = "coolfusion/"


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


def start_cluster(
    spec: dict[str, list[str]],
    log: Path,
    out: TextIO,
    gateway_port: int | None = None,
    calibrations: CalibrationChoice | None = None,
) -> LocalCluster:
    """Starts the workers of `spec`, an orchestrator with `calibrations` (default: those that ship
    for them) and, given a port (0: any), the gateway, telling `out` what it does and how long it took."""
    described = ", ".join(f"{name} ({' '.join(model_args)})" for name, model_args in spec.items())
    print(f"starting workers: {described}", file=out)
    print(f"server logs: {log}", file=out, flush=True)
    chosen = calibrations or choose_calibrations(spec)
    if chosen.default:
        print(f"default strategy: calibration {chosen.default} ({chosen.source}), inside its scope", file=out)
    if chosen.routes:
        print(f"routes: {', '.join(f'{r} ({c})' for r, c in chosen.routes.items())}", file=out)
    started = time.monotonic()
    cluster = LocalCluster(spec, log_path=log, gateway_port=gateway_port, orchestrator_flags=chosen.flags())
    cluster.start()  # stops what it started on failure
    print(f"cluster up in {time.monotonic() - started:.0f} s", file=out, flush=True)
    return cluster


@dataclass(frozen=True)
class CalibrationChoice:
    """The calibrations a local orchestrator loads (name -> file), its default one and its routes
    (route -> calibration name), and where they came from."""

    files: dict[str, Path]
    default: str | None
    routes: dict[str, str]
    source: str

    def flags(self) -> tuple[str, ...]:
        loaded = [arg for path in self.files.values() for arg in ("--calibration", str(path))]
        routes = [arg for route, name in self.routes.items() for arg in ("--route", f"{route}={name}")]
        default = ["--default-calibration", self.default] if self.default else []
        return (*loaded, *routes, *default)


def choose_calibrations(
    spec: dict[str, list[str]], folder: Path | None = None, default: str | None = None
) -> CalibrationChoice:
    """The calibrations of `folder` (a `coolfusion calibrate` output; default: those that ship,
    fitted on the task families), those fitted for workers of `spec`: every one whose preset
    workers serve the models it names (from `folder`, any other fails at once, naming the file).
    Each fitted for exactly these workers gets a route, ROUTE_PREFIX + its scope; the default is
    `default` ("none": no default calibration), else the pooled fit for exactly these workers
    where it beat the unfitted default on its tuning items."""
    presets = {name: args[1] for name, args in spec.items() if args[:1] == ["--preset"]}
    found = shipped_calibrations() if folder is None else _folder_calibrations(folder)
    files: dict[str, Path] = {}
    for path, calibration in found:
        if reason := _not_for(calibration, spec, presets):
            if folder is not None:
                raise SystemExit(f"coolfusion: {path}: {reason}")
            continue
        files[calibration.name] = path
    loaded = {name: calibration for _, calibration in found if (name := calibration.name) in files}
    routes = {
        f"{ROUTE_PREFIX}{calibration.fitted_on.get('scope') or name}": name
        for name, calibration in loaded.items()
        if calibration.worker_names == tuple(spec)
    }
    source = "fitted on the task families' tuning parts" if folder is None else f"from {folder}"
    if default == "none":
        return CalibrationChoice(files, None, routes, source)
    if default is not None:
        if default not in loaded:
            raise SystemExit(f"coolfusion: --default-calibration {default!r} is not among {sorted(loaded)}")
        return CalibrationChoice(files, default, routes, source)
    pooled = loaded.get(f"{POOLED}-{'-'.join(spec)}")
    return CalibrationChoice(files, pooled.name if pooled and _won(pooled) else None, routes, source)


def _folder_calibrations(folder: Path) -> list[tuple[Path, Calibration]]:
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise SystemExit(f"coolfusion: no calibration files (*.json) in {folder}")
    try:
        return [(path, load_calibration(path)) for path in paths]
    except CalibrationError as error:
        raise SystemExit(f"coolfusion: {error}") from None


def _not_for(calibration: Calibration, spec: dict[str, list[str]], presets: dict[str, str]) -> str | None:
    """Why a calibration does not fit the workers of `spec` (None: it does); a worker loaded from a
    path says which model it serves only once it runs, where the orchestrator checks it."""
    for fitted in calibration.workers:
        if fitted.name not in spec:
            return f"calibration {calibration.name!r} was fitted for worker {fitted.name}, which this cluster lacks"
        if fitted.name in presets and presets[fitted.name] != fitted.model_id:
            return (
                f"calibration {calibration.name!r} was fitted for {fitted.name} serving {fitted.model_id!r}; "
                f"it serves {presets[fitted.name]!r}"
            )
    return None


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
