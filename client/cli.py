"""The `coolfusion` command line: fuse, list workers, run a local cluster, and the GSM8K demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from coolfusion.client import problems, render
from coolfusion.client.client import CoolfusionError, FusionClient, chat, fusion_strategy
from coolfusion.client.cluster import DEFAULT_PRESETS, ClusterError, LocalCluster
from coolfusion.v1 import orchestrator_pb2

DEFAULT_ORCHESTRATOR = "127.0.0.1:50050"
# Short worker names for the presets, so segment labels stay readable.
PRESET_NAMES = {"smollm2-135m-instruct": "smollm2", "gemma3-270m": "gemma3"}
DEFAULT_LOG = Path(tempfile.gettempdir()) / "coolfusion-cluster.log"
DEMO_INSTRUCTION = "Reason step by step, then give the final answer on its own line as: #### <number>"

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
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def _add_orchestrator_flag(parser: argparse.ArgumentParser) -> None:
    default = f"$COOLFUSION_ORCHESTRATOR or {DEFAULT_ORCHESTRATOR}"
    parser.add_argument("--orchestrator", metavar="ADDR", help=f"host:port (default: {default})")


def add_target_flags(parser: argparse.ArgumentParser, local_help: str) -> None:
    """--orchestrator ADDR, or --local to start a cluster here (eval, bench)."""
    target = parser.add_mutually_exclusive_group()
    _add_orchestrator_flag(target)
    target.add_argument("--local", action="store_true", help=local_help)


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
    _add_orchestrator_flag(parser)
    parser.add_argument("--workers", default="", help="comma-separated worker names (default: all)")
    parser.add_argument("--stream", action="store_true", help="print segments as they are chosen")
    parser.add_argument("--json", action="store_true", help="print the FuseResult as JSON (JSON lines with --stream)")
    parser.add_argument("--plain", action="store_true", help="send PROMPT as plain text instead of a chat message")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="answer length, tokens (0: server default)")
    parser.add_argument("--segment-max-tokens", type=int, default=0, help="per-step cap, tokens (0: server default)")
    parser.add_argument("--stop", action="append", default=[], metavar="S", help="stop before this string (repeatable)")
    parser.add_argument("--rerank", action="store_true", help="Cool+R: also rank the workers' solo answers")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="deadline of the whole call, seconds")
    add_strategy_flags(parser)
    parser.set_defaults(run=run_fuse)


def add_strategy_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for FusionStrategy; each left out takes the orchestrator's default."""
    group = parser.add_argument_group("fusion strategy (default: the orchestrator's)")
    group.add_argument("--aggregation", default="", choices=["ppl_mean", "nll_mean", "robust"])
    group.add_argument("--repetition-guard", default="", choices=["off", "stop", "steer"])
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
    return [tuple(v.split("=", 1)) for v in values]


def run_fuse(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.plain else chat(args.prompt)
    options: dict[str, Any] = {
        "workers": [name for name in args.workers.split(",") if name],
        "max_new_tokens": args.max_new_tokens,
        "stop": args.stop,
        "segment_max_tokens": args.segment_max_tokens,
        "rerank": args.rerank,
        "timeout_s": args.timeout_s,
        "strategy": strategy_from_args(args),
    }
    with FusionClient(args.orchestrator) as client:
        if args.stream:
            events = client.fuse_stream(prompt, **options)
            if args.json:
                for event in events:
                    print(_to_json(event, indent=None), flush=True)
            else:
                print_stream(events, sys.stdout)
            return 0
        # The trace carries each step's winner, which the attribution needs.
        result = client.fuse(prompt, trace=True, **options)
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
    _add_orchestrator_flag(parser)
    parser.add_argument("--json", action="store_true", help="print the statuses as a JSON list")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="deadline, seconds")
    parser.set_defaults(run=run_workers)


def run_workers(args: argparse.Namespace) -> int:
    with FusionClient(args.orchestrator) as client:
        statuses = client.list_workers(timeout_s=args.timeout_s)
    if args.json:
        print(json.dumps([json.loads(_to_json(status)) for status in statuses], indent=2))
    else:
        print(workers_table(statuses))
    return 0


def workers_table(statuses: list[orchestrator_pb2.WorkerStatus]) -> str:
    rows = [("name", "serving", "model", "device", "dtype", "max ctx", "sessions", "address", "error")]
    for s in statuses:
        info = s.info
        rows.append((
            s.name, "yes" if s.serving else "no", info.model_id, info.device, info.dtype,
            str(info.limits.max_context_tokens or ""), str(info.load.open_sessions) if s.serving else "",
            s.address, s.error,
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# up and demo: a local cluster ---------------------------------------------------------------------


def add_up(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("up", help="run a local cluster (workers + orchestrator) until Ctrl-C or SIGTERM")
    parser.add_argument(
        "--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated model presets; '' for none"
    )
    parser.add_argument(
        "--model", action="append", default=[], metavar="NAME=PATH", help="a worker for a model folder or GGUF file"
    )
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG, help="where the servers' logs go")
    parser.set_defaults(run=run_up)


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


def run_up(args: argparse.Namespace) -> int:
    spec = cluster_spec(args.presets, args.model)
    with _signals_interrupt():
        cluster = start_cluster(spec, args.log, sys.stdout)
        try:
            print(f"orchestrator: {cluster.address}")
            print(f"ready: {len(spec)} workers ({', '.join(spec)}); Ctrl-C or SIGTERM stops the cluster", flush=True)
            return _wait_while_running(cluster)
        except KeyboardInterrupt:
            return 0
        finally:
            print("stopping the cluster...", flush=True)
            cluster.stop()


def start_cluster(spec: dict[str, list[str]], log: Path, out: TextIO) -> LocalCluster:
    described = ", ".join(f"{name} ({' '.join(model_args)})" for name, model_args in spec.items())
    print(f"starting workers: {described}", file=out)
    print(f"server logs: {log}", file=out, flush=True)
    started = time.monotonic()
    cluster = LocalCluster(spec, log_path=log).start()  # stops whatever it started if this fails
    print(f"cluster up in {time.monotonic() - started:.0f} s", file=out, flush=True)
    return cluster


def _wait_while_running(cluster: LocalCluster) -> int:
    processes = [*cluster.workers.values(), cluster.orchestrator]
    while True:
        time.sleep(1.0)  # KeyboardInterrupt (Ctrl-C or our SIGTERM handler) ends the wait
        for p in processes:
            if p is not None and p.process.poll() is not None:
                print(f"coolfusion: {p.name} exited with code {p.process.returncode}", file=sys.stderr)
                return 1


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
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


def add_demo(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("demo", help="fuse the default model pair on a GSM8K question, end to end")
    parser.add_argument("--gsm8k", type=Path, default=Path("../shared/data/gsm8k/test.jsonl"), help="GSM8K JSONL")
    parser.add_argument("--index", type=int, default=0, help="question number in the file, from 0")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="answer length, tokens")
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG, help="where the servers' logs go")
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    question, reference = read_gsm8k(args.gsm8k, args.index)
    spec = {PRESET_NAMES[p]: ["--preset", p] for p in DEFAULT_PRESETS}
    print("the first start prepares (and converts) the models inside the workers: this can take minutes")
    with _signals_interrupt():
        cluster = start_cluster(spec, args.log, sys.stdout)
        try:
            print(f"\nquestion {args.index}: {question}\n", flush=True)
            with FusionClient(cluster.address) as client:
                prompt = chat(f"{question}\n\n{DEMO_INSTRUCTION}")
                events = client.fuse_stream(prompt, max_new_tokens=args.max_new_tokens)
                result = print_stream(events, sys.stdout, list(spec))
            fused = final_number(result.text) if result else None
            print(f"\nfused answer: {fused or '(none)'}   reference: {reference}")
            return 0
        finally:
            print("stopping the cluster...", flush=True)
            cluster.stop()


def read_gsm8k(path: Path, index: int) -> tuple[str, str]:
    """Question `index` of a GSM8K JSONL file and the final number of its reference answer."""
    if not path.is_file():
        raise SystemExit(f"coolfusion: no GSM8K file at {path}; run from the repository root or pass --gsm8k")
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines):
            if number == index:
                record = json.loads(line)
                return record["question"], final_number(record["answer"]) or record["answer"]
    raise SystemExit(f"coolfusion: {path} has no question {index}")


def final_number(text: str) -> str | None:
    """The number after the last `####` (GSM8K's answer marker), commas removed."""
    found = re.findall(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", text)
    return found[-1].replace(",", "") if found else None


def add_eval(subparsers: Subparsers) -> None:
    # Imported here: eval.py builds on this module (cluster start-up, preset names).
    from coolfusion.client.eval import add_eval_arguments, run_eval

    parser = subparsers.add_parser("eval", help="GSM8K accuracy of each worker solo, Cool and Cool+R")
    add_eval_arguments(parser)
    parser.set_defaults(run=run_eval)


# problems -----------------------------------------------------------------------------------------


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
    # Imported here: bench.py builds on this module (cluster spec, signal handling).
    from coolfusion.client.bench import add_bench_arguments, run_bench

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
    add_problems,
    add_bench,
)


if __name__ == "__main__":
    sys.exit(main())
