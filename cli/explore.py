"""`coolfusion explore`: the decision tree of every asked item (ExploreFusion), stored in trees.jsonl
for `coolfusion calibrate` and `coolfusion report`, which replay it offline (docs/design.md
section 3.7). Resumable: items already in the file are not asked again."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from coolfusion.cli import tasks
from coolfusion.cli.eval import (
    DEFAULT_DATA,
    Sink,
    add_local_flags,
    check_same_run,
    end_cut_line,
    family,
    invocation,
    orchestrator_for,
    progress_bar,
    record_invocation,
    select_items,
)
from coolfusion.cli.tasks import TaskItem
from coolfusion.client import FuseOptions, FusionClient
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
    parser.add_argument("--tasks", default=DEFAULT_FAMILIES, help=f"task families (default: {DEFAULT_FAMILIES})")
    parser.add_argument("--split", choices=tasks.SPLITS, default=tasks.TUNING, help="which part of each family")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GSM8K-format JSONL for the gsm8k family")
    parser.add_argument("--offset", type=int, default=0, help="first item of each family, from 0")
    parser.add_argument("--limit", type=int, default=None, help="items per family (default: all)")
    parser.add_argument("--workers", default="", help="comma-separated worker names, in order (default: all serving)")
    parser.add_argument("--max-nodes", type=int, default=DEFAULT_MAX_NODES, help="nodes per tree")
    parser.add_argument("--concurrency", type=int, default=4, help="items explored at the same time")
    parser.add_argument("--out", type=Path, default=Path("eval-results/trees"), help="folder (resumes what is there)")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="deadline of each item, seconds")


def run_explore(args: argparse.Namespace) -> int:
    names = [name for name in args.tasks.split(",") if name]
    for name in names:
        family(name)  # fails before a local cluster spends a minute starting
    items = select_items(names, args.split, args.offset, args.limit, args.data)
    with orchestrator_for(args) as (address, default_workers), FusionClient(address) as client:
        workers = [name for name in args.workers.split(",") if name] or default_workers(client)
        models = {s.name: s.info.model_id for s in client.list_workers() if s.name in workers}
        # The models are part of what makes trees comparable: a fit applies to them alone.
        settings = {"workers": workers, "models": models, "max_nodes": args.max_nodes, "families": _families(names)}
        path = args.out / TREES
        check_same_run(args.out / "run.json", settings)
        record_invocation(args.out / "run.json", invocation(args, items, workers))
        explore_items(client, items, workers, path, args.max_nodes, args.concurrency, args.timeout_s)
    records = read_trees(path)
    incomplete = sum(not r["tree"].get("complete") for r in records)
    nodes = sum(len(r["tree"]["nodes"]) for r in records)
    print(f"{len(records)} trees in {path} ({nodes} nodes; {incomplete} cut at --max-nodes {args.max_nodes})")
    return 0


def _families(names: list[str]) -> dict[str, Any]:
    return {
        name: {"rule": str(family(name).rule), "max_new_tokens": family(name).max_new_tokens, "stop": list(family(name).stop)}
        for name in sorted(names)
    }  # fmt: skip


def explore_items(
    client: FusionClient,
    items: list[TaskItem],
    workers: list[str],
    path: Path,
    max_nodes: int,
    concurrency: int,
    timeout_s: float,
) -> None:
    """Explores every item not yet in `path`, appending one record per tree as it lands."""
    done = {(r["family"], r["id"]) for r in read_trees(path)}
    todo = [item for item in items if (item.family, item.id) not in done]
    if not todo:
        print(f"explore: every tree is already in {path}", file=sys.stderr)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    end_cut_line(path)
    bar = progress_bar(len(todo), "explore", "tree")
    with open(path, "a", encoding="utf-8") as out, ThreadPoolExecutor(max(1, concurrency)) as pool:
        sink = Sink(out, [], bar)
        futures = [pool.submit(_explore, client, item, workers, max_nodes, timeout_s) for item in todo]
        try:
            for future in as_completed(futures):
                sink.emit([future.result()])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            bar.close()


def _explore(
    client: FusionClient, item: TaskItem, workers: list[str], max_nodes: int, timeout_s: float
) -> dict[str, Any]:
    spec = family(item.family)
    options = FuseOptions(workers=tuple(workers), max_new_tokens=spec.max_new_tokens, stop=spec.stop)
    tree = client.explore(item.prompt, options, max_nodes=max_nodes, timeout_s=timeout_s)
    return {
        "family": item.family, "id": item.id, "index": item.index, "split": item.split,
        "max_new_tokens": spec.max_new_tokens, "tree": json_format.MessageToDict(tree, preserving_proto_field_name=True),
    }  # fmt: skip


def read_run(folder: Path) -> dict[str, Any]:
    """What the trees in `folder` were explored with: workers, their models, limits."""
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

    item: TaskItem
    tree: FusionTree
    max_new_tokens: int


def load_explored(folder: Path) -> list[Explored]:
    """The trees of a `coolfusion explore` folder with their items, in family and split order."""
    records = read_trees(folder / TREES)
    if not records:
        raise SystemExit(f"coolfusion: no trees in {folder / TREES}; run coolfusion explore first")
    order = {name: n for n, name in enumerate(tasks.FAMILIES)}
    records.sort(key=lambda r: (order.get(r["family"], len(order)), r["index"]))
    explored = []
    for record in records:
        by_id = {item.id: item for item in tasks.items(record["family"], record["split"])}
        tree = tree_from_proto(tree_message(record))
        explored.append(Explored(by_id[record["id"]], tree, record["max_new_tokens"]))
    return explored
