"""`coolfusion explore`: the decision tree of every asked item (ExploreFusion), stored in trees.jsonl
for `coolfusion calibrate` and `coolfusion report`, which replay it offline (docs/design.md
section 3.7). The items come from a labelled-items file (`--data`, docs/own-traffic.md) or from
the task families, which are asked exactly as their export to such a file would be. Resumable:
items already in the file are not asked again."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from coolfusion.calibration.items import HELD_OUT, TUNING, ItemsError, ItemsFile, LabelledItem, load_items
from coolfusion.cli import tasks
from coolfusion.cli.eval import (
    Sink,
    add_local_flags,
    check_same_run,
    commit,
    end_cut_line,
    orchestrator_for,
    progress_bar,
    record_invocation,
)
from coolfusion.cli.tasks.export import export
from coolfusion.client import FuseOptions, FusionClient, json_schema
from coolfusion.orchestrator.domain import FusionTree
from coolfusion.orchestrator.tree_proto import tree_from_proto
from coolfusion.v1 import orchestrator_pb2

TREES = "trees.jsonl"
DEFAULT_FAMILIES = "facts,arithmetic,opposites"
# Nodes per tree: a short answer's tree needs tens; a runaway one is cut there and marked incomplete.
DEFAULT_MAX_NODES = 64


def add_explore_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `coolfusion explore` (registered in main.py)."""
    add_local_flags(parser)
    parser.add_argument(
        "--data", type=Path, default=None,
        help="a labelled-items file (docs/own-traffic.md); every item of it, tuning and held-out, is explored",
    )  # fmt: skip
    parser.add_argument(
        "--tasks", default=DEFAULT_FAMILIES, help=f"without --data: task families (default: {DEFAULT_FAMILIES})"
    )
    parser.add_argument(
        "--split",
        choices=tasks.SPLITS,
        default=None,
        help="only this part (default: tuning of the families; all of --data)",
    )
    parser.add_argument("--offset", type=int, default=0, help="first item (of each family, or of the file), from 0")
    parser.add_argument("--limit", type=int, default=None, help="items (per family, or of the file; default: all)")
    parser.add_argument("--workers", default="", help="comma-separated worker names, in order (default: all serving)")
    parser.add_argument("--max-nodes", type=int, default=DEFAULT_MAX_NODES, help="nodes per tree")
    parser.add_argument("--concurrency", type=int, default=4, help="items explored at the same time")
    parser.add_argument("--out", type=Path, default=Path("eval-results/trees"), help="folder (resumes what is there)")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="deadline of each item, seconds")


def run_explore(args: argparse.Namespace) -> int:
    items, source = _chosen_items(args)  # fails on a bad file or family before a local cluster starts
    with orchestrator_for(args) as (address, default_workers), FusionClient(address) as client:
        workers = [name for name in args.workers.split(",") if name] or default_workers(client)
        models = {s.name: s.info.model_id for s in client.list_workers() if s.name in workers}
        # The models are part of what makes trees comparable: a fit applies to them alone.
        settings = {"workers": workers, "models": models, "max_nodes": args.max_nodes, **source}
        path = args.out / TREES
        check_same_run(args.out / "run.json", settings)
        record_invocation(args.out / "run.json", _invocation(args, items, workers))
        explore_items(client, items, workers, path, args.max_nodes, args.concurrency, args.timeout_s)
    records = read_trees(path)
    incomplete = sum(not r["tree"].get("complete") for r in records)
    nodes = sum(len(r["tree"]["nodes"]) for r in records)
    print(f"{len(records)} trees in {path} ({nodes} nodes; {incomplete} cut at --max-nodes {args.max_nodes})")
    return 0


def _chosen_items(args: argparse.Namespace) -> tuple[list[LabelledItem], dict[str, Any]]:
    """The items to explore and what run.json records of where they came from."""
    end = None if args.limit is None else args.offset + args.limit
    if args.data is not None:
        data = read_items(args.data)
        chosen = [item for item in data.items if args.split in (None, item.split)]
        return chosen[args.offset : end], {"data": str(args.data.resolve())}
    names = [name for name in args.tasks.split(",") if name]
    if unknown := [name for name in names if name not in tasks.FAMILIES]:
        raise SystemExit(f"coolfusion: unknown task family {unknown[0]!r}; choose from {', '.join(tasks.FAMILIES)}")
    split = args.split or tasks.TUNING
    chosen = [item for name in names for item in export([name], [split])[args.offset : end]]
    return chosen, {"families": _families(names)}


def read_items(path: Path) -> ItemsFile:
    """A labelled-items file, or the command's end with each bad line and what is wrong."""
    try:
        return load_items(path)
    except ItemsError as error:
        raise SystemExit(f"coolfusion: {error}") from None


def _families(names: list[str]) -> dict[str, Any]:
    families = {name: tasks.FAMILIES[name] for name in sorted(names)}
    return {
        name: {"rule": str(spec.rule), "max_new_tokens": spec.max_new_tokens, "stop": list(spec.stop)}
        for name, spec in families.items()
    }


def _invocation(args: argparse.Namespace, items: list[LabelledItem], workers: list[str]) -> dict[str, Any]:
    """What this invocation asked for, beside the settings run.json compares."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.tag] = counts.get(item.tag, 0) + 1
    return {
        "command": ["coolfusion", *sys.argv[1:]], "commit": commit(), "data": str(args.data) if args.data else None,
        "tasks": None if args.data else args.tasks, "split": args.split, "offset": args.offset, "limit": args.limit,
        "items": counts, "workers": workers, "concurrency": args.concurrency,
    }  # fmt: skip


def explore_items(
    client: FusionClient,
    items: Sequence[LabelledItem],
    workers: list[str],
    path: Path,
    max_nodes: int,
    concurrency: int,
    timeout_s: float,
) -> None:
    """Explores every item without a tree in `path` (for the same question), appending one record
    per tree as it lands."""
    done = {(record_tag(r), r["id"], r.get("fingerprint")) for r in read_trees(path)}
    todo = [item for item in items if not ({(item.tag, item.id, item.fingerprint), (item.tag, item.id, None)} & done)]
    if not todo:
        print(f"explore: every tree is already in {path}", file=sys.stderr)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    end_cut_line(path)
    # Items that ask the same question (each field of one extracted text) share one exploration.
    alike: dict[str, list[LabelledItem]] = {}
    for item in todo:
        alike.setdefault(item.fingerprint, []).append(item)
    bar = progress_bar(len(todo), "explore", "tree")
    with open(path, "a", encoding="utf-8") as out, ThreadPoolExecutor(max(1, concurrency)) as pool:
        sink = Sink(out, [], bar)
        futures = {
            pool.submit(_explore, client, group[0], workers, max_nodes, timeout_s): group for group in alike.values()
        }
        try:
            for future in as_completed(futures):
                tree = future.result()
                sink.emit([_record(item, tree) for item in futures[future]])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            bar.close()


def _explore(
    client: FusionClient, item: LabelledItem, workers: list[str], max_nodes: int, timeout_s: float
) -> dict[str, Any]:
    """The tree of `item`'s question, as a record's `tree` field; under its schema, if it has one."""
    constraint = json_schema(item.json_schema) if item.json_schema is not None else None
    options = FuseOptions(
        workers=tuple(workers), max_new_tokens=item.max_new_tokens, stop=item.stop, constraint=constraint
    )
    tree = client.explore(item.request_prompt, options, max_nodes=max_nodes, timeout_s=timeout_s)
    return json_format.MessageToDict(tree, preserving_proto_field_name=True)


def _record(item: LabelledItem, tree: dict[str, Any]) -> dict[str, Any]:
    return {
        "tag": item.tag, "id": item.id, "split": item.split, "fingerprint": item.fingerprint,
        "max_new_tokens": item.max_new_tokens, "tree": tree,
    }  # fmt: skip


def record_tag(record: Mapping[str, Any]) -> str:
    """A tree record's tag (records written before labelled items call it `family`)."""
    return str(record.get("tag", record.get("family", "")))


def read_run(folder: Path) -> dict[str, Any]:
    """What the trees in `folder` were explored with: workers, their models, limits, the items' source."""
    path = folder / "run.json"
    if not path.is_file():
        raise SystemExit(f"coolfusion: {path} is missing; is {folder} a `coolfusion explore` folder?")
    return json.loads(path.read_text(encoding="utf-8"))["settings"]


def read_trees(path: Path) -> list[dict[str, Any]]:
    """The records of a trees file; a line cut short by an interrupted write is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # that item is simply explored again
    return records


def tree_message(record: Mapping[str, Any]) -> orchestrator_pb2.FusionTree:
    return json_format.ParseDict(record["tree"], orchestrator_pb2.FusionTree())


@dataclass(frozen=True)
class Explored:
    """One item's tree, ready to replay: the item (its answer rule) and its length limit."""

    item: LabelledItem
    tree: FusionTree
    max_new_tokens: int


@dataclass(frozen=True)
class ExploredRun:
    """A `coolfusion explore` folder read back with its items: the settings it ran with, the items'
    file (None for the task families), and every item's tree in the items' order."""

    settings: dict[str, Any]
    data: ItemsFile | None
    explored: list[Explored]


def load_explored(folder: Path, data: Path | None = None) -> ExploredRun:
    """The trees of a `coolfusion explore` folder with their items: those of `data` (default: the
    file the folder was explored from), every one of which must have its tree, or the task families'
    items that were explored. A tree counts for an item only if it was asked the same question."""
    settings = read_run(folder)
    records = read_trees(folder / TREES)
    if not records:
        raise SystemExit(f"coolfusion: no trees in {folder / TREES}; run coolfusion explore first")
    path = data or (Path(settings["data"]) if "data" in settings else None)
    items_file = read_items(path) if path is not None else None
    trees = {(record_tag(r), r["id"]): r for r in records}
    if items_file is None:
        items = [item for item in export(list(tasks.FAMILIES)) if (item.tag, item.id) in trees]
    else:
        items = list(items_file.items)
    explored, missing = [], []
    for item in items:
        record = trees.get((item.tag, item.id))
        if record is None or record.get("fingerprint", item.fingerprint) != item.fingerprint:
            missing.append(item)
            continue
        explored.append(Explored(item, tree_from_proto(tree_message(record)), item.max_new_tokens))
    held_out = [item for item in items if item.split == HELD_OUT]
    if missing and missing != held_out:  # the held-out part may wait until after fitting, whole
        first = next((item for item in missing if item.split == TUNING), missing[0])
        raise SystemExit(
            f"coolfusion: {len(missing)} items of {path} have no tree for their question in {folder} (first: line "
            f"{first.line}, id {first.id!r}); run `coolfusion explore --data {path} --out {folder}`, which resumes"
        )
    return ExploredRun(settings, items_file, explored)
