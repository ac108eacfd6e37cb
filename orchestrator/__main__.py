"""`coolfusion-orchestrator`: run the Cool-Fusion loop over registered workers."""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import replace
from pathlib import Path

from coolfusion.calibration import Calibration, load_calibration
from coolfusion.orchestrator.admission import AdmissionLimits
from coolfusion.orchestrator.calibrations import Calibrations
from coolfusion.orchestrator.registry import (
    RegistryError,
    WorkerEntry,
    add_route,
    load_registry,
    registry_calibrations,
    registry_routes,
    workers_from_environment,
)
from coolfusion.orchestrator.server import serve
from coolfusion.orchestrator.settings import OrchestratorSettings
from coolfusion.orchestrator.strategy import Aggregation, RepetitionGuard, Strategy
from coolfusion.serving.lifecycle import exit_with_parent
from coolfusion.serving.logs import configure_logging
from coolfusion.serving.security import add_security_flags, security_from_args
from coolfusion.serving.tracing import tracing_from_environment


def parse_settings(argv: list[str] | None = None) -> OrchestratorSettings:
    defaults = OrchestratorSettings(workers=())
    parser = argparse.ArgumentParser(prog="coolfusion-orchestrator", description=__doc__)
    parser.add_argument(
        "--workers", type=Path, help="registry file (YAML or JSON); COOLFUSION_WORKERS adds name=addr,..."
    )
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port")
    parser.add_argument("--call-timeout-s", type=float, default=defaults.call_timeout_s, help="one worker call")
    parser.add_argument("--request-timeout-s", type=float, default=defaults.request_timeout_s)
    load = parser.add_argument_group("load: backpressure instead of degradation")
    load.add_argument(
        "--max-running-fusions", type=int, default=defaults.admission.max_running, help="fusions run at once"
    )
    load.add_argument(
        "--max-waiting-fusions", type=int, default=defaults.admission.max_waiting,
        help="fusions waiting for a slot; more are refused with RESOURCE_EXHAUSTED",
    )  # fmt: skip
    load.add_argument("--max-wait-s", type=float, default=defaults.admission.max_wait_s, help="longest wait for a slot")
    load.add_argument(
        "--max-choices", type=int, default=defaults.limits.max_choices,
        help="most answers one request may ask for (n); they share its admission slot",
    )  # fmt: skip
    load.add_argument(
        "--busy-wait-s", type=float, default=defaults.busy_wait_s,
        help="how long a call may retry a busy worker before the request fails as overloaded",
    )  # fmt: skip
    parser.add_argument(
        "--max-connection-age-s",
        type=float,
        default=defaults.max_connection_age_s,
        help="close each client connection after this long (calls in flight finish), so balancing clients re-resolve",
    )
    parser.add_argument("--grace-s", type=float, default=defaults.grace_s, help="drain time on SIGTERM")
    parser.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics on --host (0 picks a port); default: off")
    strategy = parser.add_argument_group("fusion defaults, for requests that do not set their own")
    strategy.add_argument(
        "--aggregation", type=Aggregation, choices=list(Aggregation), default=defaults.strategy.aggregation
    )
    strategy.add_argument(
        "--repetition-guard", type=RepetitionGuard, choices=list(RepetitionGuard),
        default=defaults.strategy.repetition_guard,
    )  # fmt: skip
    strategy.add_argument(
        "--calibration", action="append", type=Path, default=[], metavar="FILE",
        help="a calibration file requests may name (repeatable; the registry's `calibrations` add more)",
    )  # fmt: skip
    strategy.add_argument(
        "--default-calibration", metavar="NAME",
        help="run requests that choose no aggregation with this calibration, where they are inside its scope "
        "and it fits their workers",
    )  # fmt: skip
    strategy.add_argument(
        "--route", action="append", default=[], metavar="NAME=CALIBRATION",
        help="a route (e.g. coolfusion/extract, a gateway model name) that runs requests with a loaded "
        "calibration (repeatable; the registry's `routes` add more)",
    )  # fmt: skip
    add_security_flags(parser)
    args = parser.parse_args(argv)
    tls, auth_tokens = security_from_args(parser, args)
    try:
        tracing = tracing_from_environment(os.environ)  # OTEL_TRACES_EXPORTER and friends
    except ValueError as error:
        parser.error(str(error))
    try:
        workers = load_registry(args.workers, workers_from_environment())
        calibrations = _calibrations(args.calibration + registry_calibrations(args.workers), workers)
        routes = _routes(args.route, registry_routes(args.workers), workers)
        # Refuses shared names, an unknown default, and routes to calibrations not loaded.
        Calibrations(calibrations, args.default_calibration, routes)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    return OrchestratorSettings(
        workers=tuple(workers),
        host=args.host,
        port=args.port,
        call_timeout_s=args.call_timeout_s,
        request_timeout_s=args.request_timeout_s,
        busy_wait_s=args.busy_wait_s,
        max_connection_age_s=args.max_connection_age_s,
        admission=_admission(parser, args),
        limits=replace(defaults.limits, max_choices=args.max_choices),
        grace_s=args.grace_s,
        log_json=args.log_json,
        metrics_port=args.metrics_port,
        tracing=tracing,
        strategy=Strategy(aggregation=args.aggregation, repetition_guard=args.repetition_guard),
        calibrations=calibrations,
        default_calibration=args.default_calibration,
        routes=routes,
        tls=tls,
        auth_tokens=auth_tokens,
    )


def _calibrations(paths: list[Path], workers: list[WorkerEntry]) -> tuple[Calibration, ...]:
    """The calibration files, each fitted for registered workers only."""
    loaded = tuple(load_calibration(path) for path in paths)
    registered = {w.name for w in workers}
    for calibration in loaded:
        if missing := [name for name in calibration.worker_names if name not in registered]:
            raise ValueError(f"calibration {calibration.name!r} was fitted for unregistered workers {missing}")
    return loaded


def _routes(flags: list[str], listed: dict[str, str], workers: list[WorkerEntry]) -> dict[str, str]:
    """The registry's routes, then those of --route NAME=CALIBRATION; no route may be named like a
    worker, since the HTTP gateway offers both as models."""
    routes = dict(listed)
    for flag in flags:
        name, sep, calibration = flag.partition("=")
        if not (sep and name and calibration):
            raise RegistryError(f"--route wants NAME=CALIBRATION, got {flag!r}")
        add_route(routes, name, calibration, "--route")
    if clashes := sorted(set(routes) & {w.name for w in workers}):
        raise RegistryError(f"routes {clashes} are named like workers; the gateway offers both as models")
    return routes


def _admission(parser: argparse.ArgumentParser, args: argparse.Namespace) -> AdmissionLimits:
    if args.max_choices < 1:
        parser.error("--max-choices must be >= 1")
    if args.max_running_fusions < 1 or args.max_waiting_fusions < 0 or args.max_wait_s < 0:
        parser.error("--max-running-fusions must be >= 1; --max-waiting-fusions and --max-wait-s >= 0")
    return AdmissionLimits(args.max_running_fusions, args.max_waiting_fusions, args.max_wait_s)


def main(argv: list[str] | None = None) -> None:
    exit_with_parent()
    settings = parse_settings(argv)
    configure_logging(settings.log_json)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
