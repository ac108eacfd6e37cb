"""`coolfusion eval`: per task family, accuracy of each worker solo, Cool per strategy, Cool+R and the oracle."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from google.protobuf import json_format

from coolfusion.cli import quality, tasks
from coolfusion.cli.cluster import DEFAULT_PRESETS
from coolfusion.cli.common import (
    DEFAULT_LOG,
    add_strategy_flags,
    add_target_flags,
    cluster_spec,
    signals_interrupt,
    start_cluster,
    strategy_from_args,
)
from coolfusion.cli.gsm8k import load_items
from coolfusion.cli.prompts import STOP_STRINGS, gsm8k_prompt
from coolfusion.cli.tasks import Family, TaskItem
from coolfusion.cli.tasks.checks import Rule
from coolfusion.client import (
    SELECTIONS,
    DeadlineExceededError,
    FuseOptions,
    FusionClient,
    fusion_parameters,
    fusion_strategy,
)
from coolfusion.v1 import orchestrator_pb2

DEFAULT_DATA = Path("../shared/data/gsm8k/test.jsonl")
MODE_KINDS = ("solo", "cool", "cool_r")
GSM8K = Family("gsm8k", Rule.GSM8K, STOP_STRINGS, 256, list)
# --strategies names besides AGGREGATION[+GUARD]: the paper's exact rule, and the orchestrator's own default.
NAMED_STRATEGIES = {"paper": ("ppl_mean", "off"), "default": ("", "")}


@dataclass(frozen=True)
class Mode:
    """One way of answering: which workers fuse, whether Cool+R reranks, under which strategy label."""

    name: str
    workers: tuple[str, ...]
    rerank: bool = False
    strategy: str = ""  # a key of Request.strategies


class Fuser(Protocol):
    """What the evaluation needs of a client (FusionClient; a fake in tests)."""

    def fuse(
        self, prompt: Any, options: FuseOptions | None = None, *, timeout_s: float | None = None
    ) -> orchestrator_pb2.FuseResult: ...


# items --------------------------------------------------------------------------------------------


def family(name: str) -> Family:
    """A family by name: one of cli/tasks, or `gsm8k` (the --data file)."""
    if name == GSM8K.name:
        return GSM8K
    if name not in tasks.FAMILIES:
        raise SystemExit(f"coolfusion: unknown task family {name!r}; choose from gsm8k, {', '.join(tasks.FAMILIES)}")
    return tasks.FAMILIES[name]


def select_items(names: Sequence[str], split: str, offset: int, limit: int | None, data: Path) -> list[TaskItem]:
    """Items [offset, offset + limit) of each family's split (GSM8K: of the file's lines), family by family."""
    chosen: list[TaskItem] = []
    for name in names:
        if name == GSM8K.name:
            chosen += [
                TaskItem(GSM8K.name, str(i.index), GSM8K.name, "test", i.index, gsm8k_prompt(i.question),
                         (i.reference,), Rule.GSM8K)
                for i in load_items(data, offset, limit)
            ]  # fmt: skip
        else:
            family(name)
            end = None if limit is None else offset + limit
            chosen += tasks.items(name, split)[offset:end]
    return chosen


# strategies and modes -----------------------------------------------------------------------------


def parse_strategies(text: str, args: argparse.Namespace) -> dict[str, orchestrator_pb2.FusionStrategy]:
    """--strategies as label -> strategy; without it, one unlabelled strategy from the single flags.
    Each entry is `paper`, `default`, AGGREGATION[+GUARD] or calibration=NAME (a calibration the
    orchestrator loaded); --prompt-template applies to all, --weight to all but calibrations."""
    base = strategy_from_args(args)
    if not text:
        return {"": base}
    strategies = {}
    for label in (entry for entry in text.split(",") if entry):
        if label.startswith("calibration="):
            calibrated = fusion_strategy(calibration=label.removeprefix("calibration="))
            calibrated.prompt_templates.update(base.prompt_templates)
            strategies[label] = calibrated
            continue
        aggregation, _, guard = label.partition("+")
        aggregation, guard = NAMED_STRATEGIES.get(label, (aggregation, guard))
        try:
            named = fusion_strategy(aggregation, guard)
        except ValueError as error:
            raise SystemExit(f"coolfusion: --strategies {label!r}: {error}") from None
        strategy = orchestrator_pb2.FusionStrategy()
        strategy.CopyFrom(base)
        strategy.ClearField("aggregation")
        strategy.ClearField("repetition_guard")
        strategy.MergeFrom(named)
        strategies[label] = strategy
    return strategies


def parse_kinds(text: str) -> set[str]:
    """The --modes flag as a set of MODE_KINDS; checked before a local cluster spends minutes starting."""
    kinds = {kind for kind in text.split(",") if kind}
    if unknown := kinds - set(MODE_KINDS):
        raise SystemExit(f"coolfusion: unknown modes {sorted(unknown)}; choose from {', '.join(MODE_KINDS)}")
    return kinds


def build_modes(kinds: set[str], workers: list[str], labels: Sequence[str] = ("",)) -> list[Mode]:
    """The modes to run, in table order: each worker solo (under the first strategy), then Cool under
    each strategy, then Cool+R under each."""
    first = labels[0]
    modes = [Mode(f"solo:{name}", (name,), strategy=first) for name in workers] if "solo" in kinds else []
    for kind, rerank in (("cool", False), ("cool_r", True)):
        if kind in kinds:
            modes += [Mode(f"{kind}@{label}" if label else kind, tuple(workers), rerank, label) for label in labels]
    return modes


# asking -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What every question of a run is asked with; a cap of None takes each family's own."""

    max_new_tokens: int | None
    timeout_s: float
    strategies: Mapping[str, orchestrator_pb2.FusionStrategy | None] = field(default_factory=lambda: {"": None})
    sampling: FuseOptions = field(default_factory=FuseOptions)  # temperature, top_p, seed, selection; greedy

    def cap(self, spec: Family) -> int:
        return self.max_new_tokens or spec.max_new_tokens

    def describe(self, families: Iterable[str]) -> dict[str, Any]:
        """What makes two runs' answers comparable, kept beside the results (see check_same_run)."""
        return {
            "families": {
                name: {"rule": str(family(name).rule), "max_new_tokens": self.cap(family(name)),
                       "stop": list(family(name).stop)}
                for name in sorted(set(families))
            },
            "strategies": {
                label: json_format.MessageToDict(s) if s else {} for label, s in self.strategies.items()
            },
            "sampling": json_format.MessageToDict(fusion_parameters("", self.sampling).sampling),
        }  # fmt: skip

    def options(self, mode: Mode, item: TaskItem) -> FuseOptions:
        """What one question is asked with in `mode`; the trace shows each scored step for analysis."""
        spec = family(item.family)
        return replace(
            self.sampling, workers=mode.workers, max_new_tokens=self.cap(spec), stop=spec.stop, rerank=mode.rerank,
            strategy=self.strategies.get(mode.strategy), trace=True,
        )  # fmt: skip


def answer(client: Fuser, item: TaskItem, mode: Mode, request: Request) -> dict[str, Any]:
    """Asks the orchestrator one question in one mode; returns the record to append."""
    started = time.monotonic()
    try:
        result = client.fuse(item.prompt, request.options(mode, item), timeout_s=request.timeout_s)
    except DeadlineExceededError as error:
        # A runaway item counts as wrong rather than stopping the run; other errors (a worker
        # down, a bad flag) stop it, and the next run resumes.
        return _record(item, mode, time.monotonic() - started, error=error.details)
    return _record(item, mode, time.monotonic() - started, result)


def answers_inside(record: Mapping[str, Any], item: TaskItem, modes: list[Mode]) -> list[dict[str, Any]]:
    """The solo and Cool records a Cool+R record already holds: Cool+R computes the fused answer and
    each worker's solo answer with the very loops those modes run (same strategy), and returns them
    in its ranking. Taking them from there spares asking for the same answers again."""
    texts = {entry["source"]: entry["text"] for entry in record.get("ranking", [])}
    asked_with = next(m.strategy for m in modes if m.name == record["mode"])
    derived = []
    for mode in modes:
        source = "fused" if len(mode.workers) > 1 else mode.workers[0]
        if mode.rerank or mode.strategy != asked_with or source not in texts:
            continue
        prediction = item.read(texts[source])
        derived.append({
            **_identity(item, mode), "prediction": prediction, "reference": item.reference,
            "correct": item.correct(prediction), "text": texts[source], "seconds": None, "source": source,
            "dropped": record["dropped"], "error": None, "taken_from": record["mode"],
            "steps": record.get("steps", []) if source == "fused" else [],
        })  # fmt: skip
    return derived


def _identity(item: TaskItem, mode: Mode) -> dict[str, Any]:
    return {"mode": mode.name, "family": item.family, "id": item.id, "index": item.index}


def _record(
    item: TaskItem,
    mode: Mode,
    seconds: float,
    result: orchestrator_pb2.FuseResult | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    text = result.text if result else ""
    prediction = item.read(text)
    return {
        **_identity(item, mode), "prediction": prediction, "reference": item.reference,
        "correct": item.correct(prediction), "text": text, "seconds": round(seconds, 3),
        # Which answer Cool+R returned ("fused" or a worker), and workers the orchestrator dropped.
        "source": result.source if result else "", "dropped": [d.worker for d in result.dropped] if result else [],
        "error": error,
        "ranking": [{"source": e.source, "text": e.text, "score": e.fused_score} for e in result.rerank] if result else [],
        "steps": decisions(result.trace) if result else [],
    }  # fmt: skip


def decisions(trace: Iterable[orchestrator_pb2.FuseStep]) -> list[dict[str, Any]]:
    """The steps whose candidates differed: what each worker thought of each, and the winner. Enough
    to replay another aggregation on the first disagreement offline."""
    return [
        {
            "step": step.index, "winner": step.winner_index,
            "candidates": [
                {"text": c.text, "eos": c.ends_with_eos, "by": list(c.proposed_by),
                 "ppl": {s.worker: s.perplexity for s in c.scores}, "tokens": {s.worker: s.scored_tokens for s in c.scores}}
                for c in step.candidates
            ],
        }
        for step in trace
        if len(step.candidates) > 1
    ]  # fmt: skip


# results ------------------------------------------------------------------------------------------


def key(record: Mapping[str, Any]) -> tuple[str, str, str]:
    """(mode, family, id); records written before families existed are GSM8K lines."""
    return record["mode"], record.get("family", GSM8K.name), record.get("id", str(record.get("index")))


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of a results file; a line cut short by an interrupted write is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the record is simply redone
        record.setdefault("family", GSM8K.name)
        record.setdefault("id", str(record.get("index")))
        records.append(record)
    return records


def pending(
    items: list[TaskItem], modes: list[Mode], done: Iterable[Mapping[str, Any]]
) -> list[tuple[TaskItem, list[Mode]]]:
    """Per item, the modes without a result yet; Cool+R first, since its record holds the others' answers."""
    finished = {key(record) for record in done}
    jobs = []
    for item in items:
        todo = [m for m in modes if (m.name, item.family, item.id) not in finished]
        if todo:
            jobs.append((item, sorted(todo, key=lambda m: not m.rerank)))
    return jobs


def run(
    client: Fuser,
    items: list[TaskItem],
    modes: list[Mode],
    results_path: Path,
    request: Request,
    concurrency: int = 1,
    invocation: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Answers every pair not yet in `results_path`, appending each record as it lands (items run
    `concurrency` at a time, each item's modes in turn); returns all records. `invocation` (what
    was asked for, to re-run it) is added to run.json."""
    check_same_run(results_path.parent / "run.json", request.describe(i.family for i in items))
    if invocation is not None:
        record_invocation(results_path.parent / "run.json", invocation)
    records = read_results(results_path)
    jobs = pending(items, modes, records)
    if not jobs:
        print(f"eval: every answer is already in {results_path}", file=sys.stderr)
        return records
    results_path.parent.mkdir(parents=True, exist_ok=True)
    end_cut_line(results_path)
    progress = progress_bar(sum(len(todo) for _, todo in jobs), "eval", "answer")
    with open(results_path, "a", encoding="utf-8") as out:
        sink = Sink(out, records, progress)
        try:
            with ThreadPoolExecutor(max(1, concurrency)) as pool:
                futures = [pool.submit(_answer_item, client, item, todo, modes, request, sink) for item, todo in jobs]
                try:
                    for future in as_completed(futures):
                        future.result()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        finally:
            progress.close()
    return records


class Sink:
    """Appends records from any thread: one line each, flushed, so an interrupted run keeps them."""

    def __init__(self, out: Any, records: list[dict[str, Any]], progress: Any):
        self._out, self._records, self._progress = out, records, progress
        self._lock = threading.Lock()

    def emit(self, new: list[dict[str, Any]]) -> None:
        with self._lock:
            self._out.writelines(json.dumps(r) + "\n" for r in new)
            self._out.flush()
            self._records.extend(new)
            self._progress.update(len(new))


def _answer_item(
    client: Fuser, item: TaskItem, todo: list[Mode], modes: list[Mode], request: Request, sink: Sink
) -> None:
    done: set[str] = set()
    for mode in todo:
        if mode.name in done:
            continue  # taken from an earlier Cool+R record of this item
        record = answer(client, item, mode, request)
        new = [record] + (answers_inside(record, item, modes) if mode.rerank else [])
        new = [r for r in new if r["mode"] not in done and any(m.name == r["mode"] for m in todo)]
        done.update(r["mode"] for r in new)
        sink.emit(new)


def check_same_run(path: Path, settings: dict[str, Any]) -> None:
    """Records the run's settings beside its results; refuses to resume results made differently."""
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8")).get("settings")
        if recorded != settings:
            raise SystemExit(
                f"coolfusion: {path.parent} holds results asked with {recorded}, not {settings}; "
                "use another --out folder"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "invocations": []}, indent=2) + "\n", encoding="utf-8")


def record_invocation(path: Path, details: dict[str, Any]) -> None:
    """Appends what this invocation asked for (command, commit, items, workers) to run.json."""
    run_file = json.loads(path.read_text(encoding="utf-8"))
    run_file["invocations"].append(details)
    path.write_text(json.dumps(run_file, indent=2) + "\n", encoding="utf-8")


def end_cut_line(path: Path) -> None:
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
    """Without tqdm: one line per finished unit, with an ETA from the mean time so far."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.done, self.started = total, 0, time.monotonic()
        self.desc, self.unit = desc, unit

    def update(self, n: int) -> None:
        self.done += n
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        print(
            f"{self.desc}: {self.done}/{self.total} {self.unit}s, {elapsed:.0f} s, ETA {eta:.0f} s",
            file=sys.stderr, flush=True,
        )  # fmt: skip

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str) -> Any:
    """A tqdm bar on stderr, or one line per update where tqdm is not installed."""
    try:
        from tqdm import tqdm  # installed with the worker extra; the client alone may lack it
    except ImportError:
        return _LineProgress(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)


# summary ------------------------------------------------------------------------------------------


def reports(
    records: list[dict[str, Any]], items: list[TaskItem], modes: list[Mode], split: str
) -> list[quality.FamilyReport]:
    """One report per family of this run, over this run's items only (the results may hold more)."""
    by_family: dict[str, list[TaskItem]] = {}
    for item in items:
        by_family.setdefault(item.family, []).append(item)
    records = rescored(records, items)
    return [
        quality.family_report(name, _label(chosen, split), records, [i.id for i in chosen], modes)
        for name, chosen in by_family.items()
    ]


def rescored(records: list[dict[str, Any]], items: list[TaskItem]) -> list[dict[str, Any]]:
    """The records of `items` read again from their texts by today's answer rules, so that a
    corrected alias or rule applies to results already on disk."""
    known = {(item.family, item.id): item for item in items}
    fresh = []
    for record in records:
        item = known.get((record["family"], record["id"]))
        if item is not None:
            prediction = item.read(record["text"])
            record = {**record, "prediction": prediction, "correct": item.correct(prediction)}
        fresh.append(record)
    return fresh


def _label(chosen: list[TaskItem], split: str) -> str:
    first, last = chosen[0].index, chosen[-1].index
    if chosen[0].family == GSM8K.name:
        return f"GSM8K line {first}" if first == last else f"GSM8K lines {first}-{last}"
    return f"{split}, item {first}" if first == last else f"{split}, items {first}-{last}"


def write_summary(family_reports: list[quality.FamilyReport], out_dir: Path) -> str:
    """Writes summary.md, summary.json and (with matplotlib) accuracy.png; returns the tables."""
    tables = "\n\n".join(quality.family_table(r) for r in family_reports)
    (out_dir / "summary.md").write_text(tables + "\n", encoding="utf-8")
    summary = [quality.report_json(r) for r in family_reports]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    try:
        quality.plot_accuracy(family_reports, out_dir / "accuracy.png")
    except ImportError:
        print("coolfusion: matplotlib is not installed; skipping accuracy.png", file=sys.stderr)
    return tables


# command line -------------------------------------------------------------------------------------


def add_local_flags(parser: argparse.ArgumentParser) -> None:
    """--orchestrator ADDR, or --local with the presets to start and where their logs go."""
    add_target_flags(parser, "start a cluster of --presets here and stop it afterwards")
    parser.add_argument(
        "--presets",
        default=",".join(DEFAULT_PRESETS),
        help="--local: comma-separated model presets (default: the pair)",
    )
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG, help="where a --local cluster's logs go")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `coolfusion eval` (its parser is registered in main.py)."""
    add_local_flags(parser)
    names = ", ".join(["gsm8k", *tasks.FAMILIES])
    parser.add_argument("--tasks", default="gsm8k", help=f"comma-separated task families: {names} (default: gsm8k)")
    parser.add_argument(
        "--split", choices=tasks.SPLITS, default=tasks.TUNING, help="which part of each task family (not gsm8k)"
    )
    parser.add_argument(
        "--data", "--gsm8k", type=Path, default=DEFAULT_DATA,
        help=f"GSM8K-format JSONL for the gsm8k family, e.g. from `coolfusion problems` (default: {DEFAULT_DATA})",
    )  # fmt: skip
    parser.add_argument("--offset", type=int, default=0, help="first item of each family (GSM8K: line), from 0")
    parser.add_argument("--limit", type=int, default=None, help="items per family (default: all)")
    parser.add_argument("--workers", default="", help="comma-separated worker names (default: all serving)")
    parser.add_argument("--modes", default=",".join(MODE_KINDS), help="comma-separated subset of solo,cool,cool_r")
    parser.add_argument(
        "--strategies", default="",
        help="comma-separated strategies to compare, each paper, default, AGGREGATION[+GUARD] "
        "(e.g. nll_mean+stop) or calibration=NAME; default: the single one the strategy flags give",
    )  # fmt: skip
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="answer length, tokens (default: each family's own)"
    )
    parser.add_argument("--concurrency", type=int, default=1, help="items asked at the same time (default: 1)")
    parser.add_argument("--out", type=Path, default=Path("eval-results"), help="results folder (resumes what is there)")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="deadline of each request, seconds")
    add_strategy_flags(parser)
    sampling = parser.add_argument_group("sampling (docs/design.md chapter 10): every request of the run")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    sampling.add_argument("--top-p", type=float, default=0.0, help="nucleus filter, (0, 1] (default: none)")
    sampling.add_argument("--seed", type=int, default=None, help="every request's seed (default: drawn per request)")
    sampling.add_argument("--selection", choices=SELECTIONS, default="", help="how a step's winner is chosen")


def run_eval(args: argparse.Namespace) -> int:
    names = [name for name in args.tasks.split(",") if name]
    for name in names:
        family(name)  # fails before a local cluster spends a minute starting
    items = select_items(names, args.split, args.offset, args.limit, args.data)
    strategies = parse_strategies(args.strategies, args)
    sampling = FuseOptions(temperature=args.temperature, top_p=args.top_p, seed=args.seed, selection=args.selection)
    request = Request(args.max_new_tokens, args.timeout_s, strategies, sampling)
    kinds = parse_kinds(args.modes)
    with orchestrator_for(args) as (address, default_workers), FusionClient(address) as client:
        workers = [name for name in args.workers.split(",") if name] or default_workers(client)
        modes = build_modes(kinds, workers, list(strategies))
        asked = invocation(args, items, workers, modes=args.modes, strategies=args.strategies)
        records = run(client, items, modes, args.out / "results.jsonl", request, args.concurrency, asked)
    print(write_summary(reports(records, items, modes, args.split), args.out))
    print(f"\nresults: {args.out / 'results.jsonl'}; tables: {args.out / 'summary.md'}")
    return 0


def invocation(args: argparse.Namespace, items: list[TaskItem], workers: list[str], **asked: Any) -> dict[str, Any]:
    """Everything needed to ask the same questions again, beside the settings run.json compares;
    `asked` adds what the subcommand itself was asked for."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.family] = counts.get(item.family, 0) + 1
    return {
        "command": ["coolfusion", *sys.argv[1:]], "commit": commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tasks": args.tasks, "split": args.split, "offset": args.offset, "limit": args.limit, "items": counts,
        "data": str(args.data) if "gsm8k" in counts else None, "arithmetic_seed": tasks.arithmetic.SEED,
        "split_rule": "per kind: shuffle with seed '<family>/<kind>', alternate tuning/held-out",
        "workers": workers, "concurrency": args.concurrency, **asked,
    }  # fmt: skip


def commit() -> str | None:
    """The repository's commit, with "+dirty" when the working tree differs; None outside a checkout."""

    def git(*argv: str) -> str:
        here = Path(__file__).resolve().parent  # the code that runs, wherever it is run from
        return subprocess.run(["git", *argv], cwd=here, capture_output=True, text=True, check=True, timeout=10).stdout

    try:
        return git("rev-parse", "HEAD").strip() + ("+dirty" if git("status", "--porcelain").strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _serving_workers(client: FusionClient) -> list[str]:
    workers = [status.name for status in client.list_workers() if status.serving]
    if not workers:
        raise SystemExit(f"coolfusion: no serving workers at {client.address}")
    return workers


@contextlib.contextmanager
def orchestrator_for(args: argparse.Namespace) -> Iterator[tuple[str, Callable[[FusionClient], list[str]]]]:
    """The orchestrator to ask and how to name its workers by default: a given address, or a local
    cluster of --presets."""
    if not args.local:
        # Asked only when --workers is not given, so a finished run needs no orchestrator.
        yield args.orchestrator, _serving_workers
        return
    spec = cluster_spec(args.presets, [])
    with signals_interrupt():  # SIGTERM must unwind through the cluster's stop()
        cluster = start_cluster(spec, args.log, sys.stderr)
        try:
            yield cluster.address, lambda client: list(spec)
        finally:
            print("stopping the cluster...", file=sys.stderr, flush=True)
            cluster.stop()
