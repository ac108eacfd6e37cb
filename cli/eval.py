"""`coolfusion eval`: GSM8K accuracy of each worker solo, of Cool (fusion) and of Cool+R (rerank)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from google.protobuf import json_format

from coolfusion.cli.common import (
    DEFAULT_LOG,
    add_strategy_flags,
    add_target_flags,
    default_spec,
    signals_interrupt,
    start_cluster,
    strategy_from_args,
)
from coolfusion.cli.gsm8k import Item, extract_answer, load_items
from coolfusion.cli.prompts import STOP_STRINGS, gsm8k_prompt
from coolfusion.client import DeadlineExceededError, FuseOptions, FusionClient, PromptLike
from coolfusion.v1 import orchestrator_pb2

DEFAULT_DATA = Path("../shared/data/gsm8k/test.jsonl")
MODE_KINDS = ("solo", "cool", "cool_r")
_Z95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval


@dataclass(frozen=True)
class Mode:
    """One way of answering: which workers fuse, and whether Cool+R reranks."""

    name: str
    workers: tuple[str, ...]
    rerank: bool = False


class Fuser(Protocol):
    """What the evaluation needs of a client (FusionClient; a fake in tests)."""

    def fuse(
        self, prompt: PromptLike, options: FuseOptions | None = None, *, timeout_s: float | None = None
    ) -> orchestrator_pb2.FuseResult: ...


# answers ------------------------------------------------------------------------------------------


def is_correct(prediction: str | None, reference: str) -> bool:
    """Numeric equality within 1e-6, so that "18.00" matches "18"."""
    return prediction is not None and abs(float(prediction) - float(reference)) <= 1e-6


# modes --------------------------------------------------------------------------------------------


def parse_kinds(text: str) -> set[str]:
    """The --modes flag as a set of MODE_KINDS; checked before a local cluster spends minutes starting."""
    kinds = {kind for kind in text.split(",") if kind}
    if unknown := kinds - set(MODE_KINDS):
        raise SystemExit(f"coolfusion: unknown modes {sorted(unknown)}; choose from {', '.join(MODE_KINDS)}")
    return kinds


def build_modes(kinds: set[str], workers: list[str]) -> list[Mode]:
    """The modes to run, in table order: each worker solo, then Cool, then Cool+R."""
    modes = [Mode(f"solo:{name}", (name,)) for name in workers] if "solo" in kinds else []
    if "cool" in kinds:
        modes.append(Mode("cool", tuple(workers)))
    if "cool_r" in kinds:
        modes.append(Mode("cool_r", tuple(workers), rerank=True))
    return modes


# results ------------------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of a results file; a line cut short by an interrupted write is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the record is simply redone
    return records


def pending(items: list[Item], modes: list[Mode], done: Iterable[Mapping[str, Any]]) -> list[tuple[Item, Mode]]:
    """(item, mode) pairs without a result yet, item by item so a partial run compares modes on the same items."""
    finished = {(record["mode"], record["index"]) for record in done}
    return [(item, mode) for item in items for mode in modes if (mode.name, item.index) not in finished]


@dataclass(frozen=True)
class Request:
    """What every question of a run is asked with."""

    max_new_tokens: int
    timeout_s: float
    strategy: orchestrator_pb2.FusionStrategy | None = None  # None: the orchestrator's default

    def describe(self) -> dict[str, Any]:
        """What makes two runs' answers comparable, kept beside the results (see check_same_run)."""
        strategy = json_format.MessageToDict(self.strategy) if self.strategy else {}
        return {"max_new_tokens": self.max_new_tokens, "strategy": strategy, "stop": list(STOP_STRINGS)}

    def options(self, mode: Mode) -> FuseOptions:
        """What one question is asked with in `mode`."""
        return FuseOptions(
            workers=mode.workers, max_new_tokens=self.max_new_tokens, stop=STOP_STRINGS, rerank=mode.rerank,
            strategy=self.strategy,
        )  # fmt: skip


def answer(client: Fuser, item: Item, mode: Mode, request: Request) -> dict[str, Any]:
    """Asks the orchestrator one question in one mode; returns the record to append."""
    started = time.monotonic()
    try:
        result = client.fuse(gsm8k_prompt(item.question), request.options(mode), timeout_s=request.timeout_s)
    except DeadlineExceededError as error:
        # A runaway item counts as wrong rather than stopping the run; other errors (a worker
        # down, a bad flag) stop it, and the next run resumes.
        return _record(item, mode, time.monotonic() - started, error=error.details)
    return _record(item, mode, time.monotonic() - started, result)


def answers_inside(record: Mapping[str, Any], item: Item, modes: list[Mode]) -> list[dict[str, Any]]:
    """The solo and Cool records a Cool+R record already holds: Cool+R computes the fused answer and
    each worker's solo answer with the very loops those modes run, and returns them in its ranking.
    Taking them from there spares asking for the same answers again (a third of the compute)."""
    texts = {entry["source"]: entry["text"] for entry in record.get("ranking", [])}
    derived = []
    for mode in modes:
        source = "fused" if len(mode.workers) > 1 else mode.workers[0]
        if mode.rerank or source not in texts:
            continue
        prediction = extract_answer(texts[source])
        derived.append({
            "mode": mode.name, "index": item.index, "prediction": prediction, "reference": item.reference,
            "correct": is_correct(prediction, item.reference), "text": texts[source], "seconds": None,
            "source": source, "dropped": record["dropped"], "error": None, "taken_from": record["mode"],
        })  # fmt: skip
    return derived


def _record(
    item: Item, mode: Mode, seconds: float, result: orchestrator_pb2.FuseResult | None = None, error: str | None = None
) -> dict[str, Any]:
    text = result.text if result else ""
    prediction = extract_answer(text)
    return {
        "mode": mode.name, "index": item.index, "prediction": prediction, "reference": item.reference,
        "correct": is_correct(prediction, item.reference), "text": text, "seconds": round(seconds, 3),
        # Which answer Cool+R returned ("fused" or a worker), and workers the orchestrator dropped.
        "source": result.source if result else "", "dropped": [d.worker for d in result.dropped] if result else [],
        "error": error,
        "ranking": [{"source": e.source, "text": e.text, "score": e.fused_score} for e in result.rerank] if result else [],
    }  # fmt: skip


def run(
    client: Fuser, items: list[Item], modes: list[Mode], results_path: Path, request: Request
) -> list[dict[str, Any]]:
    """Answers every pair not yet in `results_path`, appending each record as it lands; returns all records."""
    check_same_run(results_path.parent / "run.json", request.describe())
    records = read_results(results_path)
    # Cool+R first: its record holds the solo and Cool answers of the same item (answers_inside).
    todo = sorted(pending(items, modes, records), key=lambda pair: not pair[1].rerank)
    todo.sort(key=lambda pair: pair[0].index)
    if not todo:
        print(f"eval: every answer is already in {results_path}", file=sys.stderr)
        return records
    results_path.parent.mkdir(parents=True, exist_ok=True)
    _end_cut_line(results_path)
    progress = _progress(len(todo))
    try:
        with open(results_path, "a", encoding="utf-8") as out:
            finished = {(record["mode"], record["index"]) for record in records}
            for item, mode in todo:
                if (mode.name, item.index) not in finished:
                    record = answer(client, item, mode, request)
                    new = [record] + (answers_inside(record, item, modes) if mode.rerank else [])
                    new = [r for r in new if (r["mode"], r["index"]) not in finished]
                    out.writelines(json.dumps(r) + "\n" for r in new)
                    out.flush()  # an interrupted run keeps every finished answer
                    records.extend(new)
                    finished.update((r["mode"], r["index"]) for r in new)
                progress.update(1)
    finally:
        progress.close()
    return records


def check_same_run(path: Path, settings: dict[str, Any]) -> None:
    """Records the run's settings beside its results; refuses to resume results made differently."""
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded != settings:
            raise SystemExit(
                f"coolfusion: {path.parent} holds results asked with {recorded}, not {settings}; "
                "use another --out folder"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _end_cut_line(path: Path) -> None:
    """Ends a line an interrupted write left open, so the next record does not join it."""
    if not path.is_file():
        return
    with open(path, "rb+") as file:  # binary: text files cannot seek relative to their end
        if file.seek(0, os.SEEK_END) == 0:
            return
        file.seek(-1, os.SEEK_END)
        if file.read(1) != b"\n":
            file.write(b"\n")


class _LineProgress:
    """Without tqdm: one line per finished request, with an ETA from the mean time so far."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        print(f"eval: {self.done}/{self.total} requests, {elapsed:.0f} s, ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm  # installed with the worker extra; the client alone may lack it
    except ImportError:
        return _LineProgress(total)
    return tqdm(total=total, desc="eval", unit="request", file=sys.stderr)


# summary ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """One mode's tally over the evaluated items."""

    mode: str
    correct: int
    total: int
    mean_seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def wilson_interval(correct: int, total: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion; unlike the normal approximation it stays inside [0, 1]."""
    if total == 0:
        return 0.0, 1.0  # no evidence either way
    p = correct / total
    denominator = 1 + z**2 / total
    centre = (p + z**2 / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z**2 / (4 * total**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def score(records: Iterable[Mapping[str, Any]], items: list[Item], modes: list[Mode]) -> list[Score]:
    """Per-mode tallies over this run's items only (the results file may hold other ranges)."""
    wanted = {item.index for item in items}
    scores = []
    for mode in modes:
        mine = [r for r in records if r["mode"] == mode.name and r["index"] in wanted]
        timed = [r["seconds"] for r in mine if r["seconds"] is not None]  # answers taken from Cool+R have none
        seconds = sum(timed) / len(timed) if timed else float("nan")
        scores.append(Score(mode.name, sum(r["correct"] for r in mine), len(mine), seconds))
    return scores


def summary_table(scores: list[Score]) -> str:
    """A Markdown table: accuracy, correct/total, 95% Wilson interval and mean seconds per answer."""
    lines = [
        "| mode | accuracy | correct / total | 95% CI (Wilson) | mean s |",
        "|:-----|---------:|----------------:|:---------------:|-------:|",
    ]
    for s in scores:
        low, high = wilson_interval(s.correct, s.total)
        lines.append(
            f"| {s.mode} | {100 * s.accuracy:.1f}% | {s.correct} / {s.total} "
            f"| {100 * low:.1f}–{100 * high:.1f}% | {_seconds(s.mean_seconds)} |"
        )
    return "\n".join(lines)


def _seconds(mean: float) -> str:
    return "in cool_r" if math.isnan(mean) else f"{mean:.1f}"


def plot_accuracy(scores: list[Score], path: Path) -> None:
    """Bar chart of accuracy per mode with Wilson 95% error bars, as PNG."""
    # Imported here: matplotlib is an optional extra, and the Agg canvas needs no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.2 * len(scores) + 2, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    accuracies = [100 * s.accuracy for s in scores]
    intervals = [wilson_interval(s.correct, s.total) for s in scores]
    # Clamped: at 0/n or n/n the bound equals the accuracy up to rounding, and matplotlib rejects -1e-15.
    below = [max(0.0, a - 100 * low) for a, (low, _) in zip(accuracies, intervals)]
    above = [max(0.0, 100 * high - a) for a, (_, high) in zip(accuracies, intervals)]
    axes.bar([s.mode for s in scores], accuracies, yerr=[below, above], capsize=6, color="tab:blue")
    axes.set_ylim(0, 100)
    axes.set_ylabel("GSM8K accuracy, % (95% Wilson CI)")
    axes.set_title(f"n = {max((s.total for s in scores), default=0)} questions")
    figure.savefig(path, dpi=120)


def write_summary(scores: list[Score], out_dir: Path) -> str:
    """Writes summary.md and (with matplotlib) accuracy.png; returns the table."""
    table = summary_table(scores)
    (out_dir / "summary.md").write_text(table + "\n", encoding="utf-8")
    try:
        plot_accuracy(scores, out_dir / "accuracy.png")
    except ImportError:
        print("coolfusion: matplotlib is not installed; skipping accuracy.png", file=sys.stderr)
    return table


# command line -------------------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `coolfusion eval` (its parser is registered in main.py)."""
    add_target_flags(parser, "start the default pair (smollm2, gemma3) here and stop it afterwards")
    parser.add_argument(
        "--data", "--gsm8k", type=Path, default=DEFAULT_DATA,
        help=f"GSM8K-format JSONL, e.g. from `coolfusion problems` (default: {DEFAULT_DATA})",
    )  # fmt: skip
    parser.add_argument("--offset", type=int, default=0, help="first question, line number from 0")
    parser.add_argument("--limit", type=int, default=None, help="number of questions (default: all)")
    parser.add_argument("--workers", default="", help="comma-separated worker names (default: all serving)")
    parser.add_argument("--modes", default=",".join(MODE_KINDS), help="comma-separated subset of solo,cool,cool_r")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length, tokens")
    parser.add_argument("--out", type=Path, default=Path("eval-results"), help="results folder (resumes what is there)")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="deadline of each request, seconds")
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG, help="where a --local cluster's logs go")
    add_strategy_flags(parser)


def run_eval(args: argparse.Namespace) -> int:
    items = load_items(args.data, args.offset, args.limit)
    request = Request(args.max_new_tokens, args.timeout_s, strategy_from_args(args))
    kinds = parse_kinds(args.modes)
    with _orchestrator(args) as (address, default_workers), FusionClient(address) as client:
        workers = [name for name in args.workers.split(",") if name] or default_workers(client)
        if not workers:
            raise SystemExit(f"coolfusion: no serving workers at {address}")
        modes = build_modes(kinds, workers)
        records = run(client, items, modes, args.out / "results.jsonl", request)
    print(write_summary(score(records, items, modes), args.out))
    print(f"\nresults: {args.out / 'results.jsonl'}; table: {args.out / 'summary.md'}")
    return 0


def _serving_workers(client: FusionClient) -> list[str]:
    return [status.name for status in client.list_workers() if status.serving]


@contextlib.contextmanager
def _orchestrator(args: argparse.Namespace) -> Iterator[tuple[str, Callable[[FusionClient], list[str]]]]:
    """The orchestrator to ask and how to name its workers by default: a given address, or a local cluster."""
    if not args.local:
        # Asked only when --workers is not given, so a finished run needs no orchestrator.
        yield args.orchestrator, _serving_workers
        return
    spec = default_spec()
    with signals_interrupt():  # SIGTERM must unwind through the cluster's stop()
        cluster = start_cluster(spec, args.log, sys.stderr)
        try:
            yield cluster.address, lambda client: list(spec)
        finally:
            print("stopping the cluster...", file=sys.stderr, flush=True)
            cluster.stop()
