"""The `coolfusion` command line: argument parsing and dispatch; fuse, workers, up, demo and problems run here."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from coolfusion.cli import problems, render
from coolfusion.cli.bench import add_bench_arguments, run_bench
from coolfusion.cli.calibrate import add_calibrate_arguments, run_calibrate
from coolfusion.cli.cluster import DEFAULT_PRESETS, ClusterError
from coolfusion.cli.common import (
    DEFAULT_LOG,
    DEFAULT_ORCHESTRATOR,
    add_orchestrator_flag,
    add_strategy_flags,
    choose_calibrations,
    cluster_spec,
    signals_interrupt,
    start_cluster,
    strategy_from_args,
)
from coolfusion.cli.demo import add_demo
from coolfusion.cli.eval import add_eval_arguments, run_eval
from coolfusion.cli.explore import add_explore_arguments, run_explore
from coolfusion.cli.items import add_items_arguments
from coolfusion.cli.report import add_report_arguments, run_report
from coolfusion.client import (
    SELECTIONS,
    CoolfusionError,
    FuseOptions,
    FusionClient,
    __version__,
    chat,
    json_object,
    json_schema,
    regex,
)
from coolfusion.v1 import orchestrator_pb2, worker_pb2

Subparsers = argparse._SubParsersAction  # argparse has no public name for it


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `coolfusion` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if hasattr(args, "orchestrator"):
        # Resolved here, not as an argparse default, so the environment is read at run time only.
        args.orchestrator = args.orchestrator or os.environ.get("COOLFUSION_ORCHESTRATOR") or DEFAULT_ORCHESTRATOR
    try:
        return args.run(args)
    except CoolfusionError as error:
        print(f"coolfusion: {error.code.name}: {error.details}", file=sys.stderr)
        return 2 if error.code == grpc.StatusCode.INVALID_ARGUMENT else 1
    except ClusterError as error:
        print(f"coolfusion: the local cluster failed to start: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) left; silence stdout so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coolfusion", description="Cool-Fusion: small LMs answer as one.")
    parser.add_argument("--version", action="version", version=f"coolfusion {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def _use_colour(out: TextIO) -> bool:
    # https://no-color.org: an opt-out that terminal users expect to be honoured.
    return out.isatty() and not os.environ.get("NO_COLOR")


def _palette(out: TextIO) -> render.Palette | None:
    return render.Palette() if _use_colour(out) else None


def _to_json(message: Message, indent: int | None = 2) -> str:
    return json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, indent=indent
    )


# fuse ---------------------------------------------------------------------------------------------


def add_fuse(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("fuse", help="fuse one answer and show which worker won each segment")
    parser.add_argument("prompt", metavar="PROMPT")
    add_orchestrator_flag(parser)
    parser.add_argument("--workers", default="", help="comma-separated worker names (default: all)")
    parser.add_argument("--stream", action="store_true", help="print segments as they are chosen")
    parser.add_argument("--json", action="store_true", help="print the FuseResult as JSON (JSON lines with --stream)")
    parser.add_argument("--plain", action="store_true", help="send PROMPT as plain text instead of a chat message")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="answer length, tokens (0: server default)")
    parser.add_argument("--segment-max-tokens", type=int, default=0, help="per-step cap, tokens (0: server default)")
    parser.add_argument("--stop", action="append", default=[], metavar="S", help="stop before this string (repeatable)")
    parser.add_argument("--rerank", action="store_true", help="Cool+R: also rank the workers' solo answers")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="deadline of the whole call, seconds")
    sampling = parser.add_argument_group("sampling (0 temperature, the default, is greedy)")
    sampling.add_argument("--temperature", type=float, default=0.0, help="how the workers draw proposals, 0-2")
    sampling.add_argument("--top-p", type=float, default=0.0, help="nucleus filter, (0, 1]")
    sampling.add_argument("--top-k", type=int, default=0, help="top-k filter (0: none)")
    sampling.add_argument("--seed", type=int, default=None, help="the same seed gives the same answer")
    sampling.add_argument("--selection", choices=SELECTIONS, default="", help="how a step's winner is chosen")
    sampling.add_argument("-n", type=int, default=0, help="answers to fuse (printed one after another)")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", type=Path, help="the answer is JSON valid against this schema")
    shape.add_argument("--json-object", action="store_true", help="the answer is a JSON object")
    shape.add_argument("--regex", metavar="PATTERN", help="the whole answer matches this regular expression")
    add_strategy_flags(parser)
    parser.set_defaults(run=run_fuse)


def constraint_from_args(args: argparse.Namespace) -> worker_pb2.Constraint | None:
    """The answer's constraint from --json-schema, --json-object or --regex (docs/design.md chapter 9)."""
    if args.json_schema:
        return json_schema(args.json_schema.read_text())
    if args.json_object:
        return json_object()
    return regex(args.regex) if args.regex else None


def run_fuse(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.plain else chat(args.prompt)
    options = FuseOptions(
        workers=tuple(name for name in args.workers.split(",") if name),
        max_new_tokens=args.max_new_tokens,
        stop=tuple(args.stop),
        segment_max_tokens=args.segment_max_tokens,
        rerank=args.rerank,
        strategy=strategy_from_args(args),
        constraint=constraint_from_args(args),
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        selection=args.selection,
        n=args.n,
    )
    if args.stream and args.n > 1:
        raise SystemExit("coolfusion: --stream shows one answer; leave out -n or --stream")
    with FusionClient(args.orchestrator) as client:
        if args.n > 1:
            results = client.fuse_choices(prompt, replace(options, trace=True), timeout_s=args.timeout_s)
            for result in results:
                print(_to_json(result) if args.json else render.render_result(result, _palette(sys.stdout)))
            return 0
        if args.stream:
            events = client.fuse_stream(prompt, options, timeout_s=args.timeout_s)
            if args.json:
                for event in events:
                    print(_to_json(event, indent=None), flush=True)
            else:
                print_stream(events, sys.stdout)
            return 0
        # The trace carries each step's winner, which the attribution needs.
        result = client.fuse(prompt, replace(options, trace=True), timeout_s=args.timeout_s)
    print(_to_json(result) if args.json else render.render_result(result, _palette(sys.stdout)))
    return 0


def print_stream(
    events: Iterator[orchestrator_pb2.FuseStreamResponse], out: TextIO, workers: list[str] | None = None
) -> orchestrator_pb2.FuseResult | None:
    """Prints a FuseStream as it arrives; returns its summary."""
    printer = render.StreamPrinter(out, _palette(out), workers or ())
    result = None
    for event in events:
        if (summary := printer.event(event)) is not None:
            result = summary
    return result


# workers ------------------------------------------------------------------------------------------


def add_workers(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("workers", help="list the orchestrator's workers and their health")
    add_orchestrator_flag(parser)
    parser.add_argument("--json", action="store_true", help="print the statuses as a JSON list")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="deadline, seconds")
    parser.set_defaults(run=run_workers)


def run_workers(args: argparse.Namespace) -> int:
    with FusionClient(args.orchestrator) as client:
        listing = client.describe(timeout_s=args.timeout_s)
    statuses = list(listing.workers)
    if args.json:
        print(json.dumps([json.loads(_to_json(status)) for status in statuses], indent=2))
    else:
        print(f"orchestrator {args.orchestrator}, coolfusion {listing.orchestrator_version or 'unknown'}")
        print(workers_table(statuses))
    return 0


def workers_table(statuses: list[orchestrator_pb2.WorkerStatus]) -> str:
    rows = [("name", "serving", "model", "version", "device", "dtype", "max ctx", "sessions", "address", "error")]
    for s in statuses:
        info = s.info
        rows.append((
            s.name, "yes" if s.serving else "no", info.model_id, info.server_version, info.device, info.dtype,
            str(info.limits.max_context_tokens or ""), str(info.load.open_sessions) if s.serving else "",
            s.address, s.error,
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# up and demo: a local cluster ---------------------------------------------------------------------


def add_up(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "up", help="run a local cluster (workers, orchestrator, OpenAI-compatible gateway) until Ctrl-C or SIGTERM"
    )
    parser.add_argument(
        "--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated model presets; '' for none"
    )
    parser.add_argument(
        "--model", action="append", default=[], metavar="NAME=PATH", help="a worker for a model folder or GGUF file"
    )
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG, help="where the servers' logs go")
    parser.add_argument("--gateway-port", type=int, default=0, help="the HTTP gateway's port (default: any free one)")
    parser.add_argument("--no-gateway", action="store_true", help="start no OpenAI-compatible HTTP gateway")
    parser.add_argument(
        "--calibrations", type=Path, default=None, metavar="DIR",
        help="calibrations of `coolfusion calibrate` to load instead of those that ship (each must fit these workers)",
    )  # fmt: skip
    parser.add_argument(
        "--default-calibration", default=None, metavar="NAME",
        help="the calibration requests inside its scope run with, or 'none' (default: the pooled fit for "
        "exactly these workers, where one is loaded and beat the unfitted default)",
    )  # fmt: skip
    parser.set_defaults(run=run_up)


def run_up(args: argparse.Namespace) -> int:
    spec = cluster_spec(args.presets, args.model)
    calibrations = choose_calibrations(spec, args.calibrations, args.default_calibration)  # fails before starting
    gateway_port = None if args.no_gateway or not _gateway_installed() else args.gateway_port
    with signals_interrupt():
        cluster = start_cluster(spec, args.log, sys.stdout, gateway_port, calibrations)
        try:
            print(f"orchestrator: {cluster.address}")
            if cluster.gateway is not None:
                models = ", ".join(["coolfusion", *calibrations.routes, *spec])
                print(f"OpenAI-compatible API: {cluster.gateway_url} (models: {models})")
            print(f"ready: {len(spec)} workers ({', '.join(spec)}); Ctrl-C or SIGTERM stops the cluster", flush=True)
            cluster.supervise(sys.stderr)  # a server that dies is started again, until Ctrl-C or SIGTERM
        except KeyboardInterrupt:
            return 0
        finally:
            print("stopping the cluster...", flush=True)
            cluster.stop()


def _gateway_installed() -> bool:
    """Whether the gateway's web stack (the `gateway` extra) is installed; `up` runs without it otherwise."""
    if all(importlib.util.find_spec(name) for name in ("starlette", "uvicorn")):
        return True
    print("no HTTP gateway: install coolfusion[gateway] for the OpenAI-compatible API", file=sys.stderr)
    return False


# eval, problems and bench -------------------------------------------------------------------------


def add_eval(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("eval", help="GSM8K accuracy of each worker solo, Cool and Cool+R")
    add_eval_arguments(parser)
    parser.set_defaults(run=run_eval)


def add_explore(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "explore", help="every answer the workers' fusion could give per item, for calibrate and report"
    )
    add_explore_arguments(parser)
    parser.set_defaults(run=run_explore)


def add_calibrate(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="fit a selection rule per task family and for their mix, from explored tuning trees"
    )
    add_calibrate_arguments(parser)
    parser.set_defaults(run=run_calibrate)


def add_items(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "items", help="check a labelled-items file (your own prompts and answers), or export the task families as one"
    )
    add_items_arguments(parser)


def add_report(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="every worker alone, pair and trio under each strategy, replayed from explored trees"
    )
    add_report_arguments(parser)
    parser.set_defaults(run=run_report)


def add_problems(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("problems", help="write seeded arithmetic word problems, GSM8K JSONL, for eval")
    parser.add_argument(
        "--seed", type=int, default=problems.DEFAULT_SEED, help="same seed, same set (default: %(default)s)"
    )
    parser.add_argument("--count", type=int, default=200, help="how many; kinds take turns (default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=Path("problems.jsonl"), help="where to write (default: %(default)s)"
    )
    parser.set_defaults(run=run_problems)


def run_problems(args: argparse.Namespace) -> int:
    written = problems.generate(args.seed, args.count)
    problems.write_jsonl(written, args.out)
    print(f"{len(written)} problems (seed {args.seed}) in {args.out}; score them: coolfusion eval --gsm8k {args.out}")
    return 0


def add_bench(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("bench", help="fused vs solo, caches vs re-prefilling, overhead, concurrency")
    add_bench_arguments(parser)
    parser.set_defaults(run=run_bench)


# Adding a subcommand: write its add_X(subparsers) (which sets `run`), then list it here.
SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    add_fuse,
    add_workers,
    add_up,
    add_demo,
    add_eval,
    add_items,
    add_explore,
    add_calibrate,
    add_report,
    add_problems,
    add_bench,
)


if __name__ == "__main__":
    sys.exit(main())
