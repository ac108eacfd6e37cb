"""`coolfusion demo`: the trio on items taken by a fixed rule, each model's answer beside the fused one."""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from coolfusion.cli import render, tasks
from coolfusion.cli.common import DEFAULT_LOG, cluster_spec, signals_interrupt, start_cluster
from coolfusion.cli.gsm8k import load_items
from coolfusion.cli.prompts import STOP_STRINGS, gsm8k_prompt
from coolfusion.cli.tasks import TaskItem
from coolfusion.cli.tasks.checks import Rule, first_line
from coolfusion.client import FuseOptions, FusionClient
from coolfusion.v1 import orchestrator_pb2

# The rule, fixed before any answer was seen: the first items of each family's held-out part, then
# one GSM8K question. Nothing is picked by how the models do on it.
PER_FAMILY = 2
_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")
DEFAULT_GSM8K = Path("../shared/data/gsm8k/test.jsonl")
# Three tokenizer families with different strengths (facts, arithmetic, opposites), the workload
# fusion is for; the orchestrator runs them with the calibration fitted for them.
TRIO = ("smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct")


@dataclass(frozen=True)
class DemoItem:
    """An item and how it is shown: the question alone, without the few-shot lines before it."""

    item: TaskItem
    shown: str
    max_new_tokens: int
    stop: tuple[str, ...]


def demo_items(gsm8k: Path, gsm8k_index: int, gsm8k_tokens: int, out: TextIO) -> list[DemoItem]:
    """The first PER_FAMILY held-out items of every family, then GSM8K question `gsm8k_index` if the file is there."""
    chosen = [
        DemoItem(item, _asked_line(item), spec.max_new_tokens, spec.stop)
        for name, spec in tasks.FAMILIES.items()
        for item in tasks.items(name, tasks.HELD_OUT)[:PER_FAMILY]
    ]
    if not gsm8k.is_file():
        print(f"no GSM8K file at {gsm8k}: the demo leaves its GSM8K question out", file=out)
        return chosen
    if not (found := load_items(gsm8k, offset=gsm8k_index, limit=1)):
        raise SystemExit(f"coolfusion: {gsm8k} has no question {gsm8k_index}")
    question = found[0]
    item = TaskItem("gsm8k", str(question.index), "gsm8k", "test", question.index, gsm8k_prompt(question.question),
                    (question.reference,), Rule.GSM8K)  # fmt: skip
    return [*chosen, DemoItem(item, question.question, gsm8k_tokens, STOP_STRINGS)]


def _asked_line(item: TaskItem) -> str:
    """A few-shot prompt's last line, the one the models complete."""
    assert isinstance(item.prompt, str)  # task families send plain text; only GSM8K sends chat
    return item.prompt.rsplit("\n", 1)[-1] + " ..."


def ask(client: FusionClient, demo: DemoItem, timeout_s: float) -> orchestrator_pb2.FuseResult:
    """One Cool+R request: it returns the fused answer (with its trace) and each model's own answer."""
    options = FuseOptions(max_new_tokens=demo.max_new_tokens, stop=demo.stop, rerank=True, trace=True)
    return client.fuse(demo.item.prompt, options, timeout_s=timeout_s)


def show(
    demo: DemoItem,
    result: orchestrator_pb2.FuseResult,
    workers: list[str],
    palette: render.Palette | None,
    out: TextIO,
) -> dict[str, bool]:
    """Prints each model's answer, the fused answer by segment and which were right; returns who was right."""
    item = demo.item
    texts = {entry.source: entry.text for entry in result.rerank}
    fused = texts.get("fused", result.text)
    labelled = "".join(render.label(run, palette) for run in _runs(render.segments(result.trace, fused))) or fused
    aggregation = orchestrator_pb2.Aggregation.Name(result.strategy.aggregation).removeprefix("AGGREGATION_")
    strategy = result.strategy.calibration or aggregation.lower()
    print(f"\n== {item.family}, {item.split} item {item.index} ({item.id}), {strategy}\n{demo.shown}", file=out)
    rows = [(f"{name} alone", texts[name], texts[name]) for name in workers if name in texts]
    rows += [("fused", fused, labelled), (f"Cool+R ({result.source})", result.text, result.text)]
    width = max(len(name) for name, _, _ in rows)
    verdicts = [_line(name, text, shown, item, width, out) for name, text, shown in rows]
    print(f"  accepted: {' | '.join(item.answers)}", file=out, flush=True)
    return dict(zip([*(name for name in workers if name in texts), "fused", "Cool+R"], verdicts))


def _runs(pieces: list[render.Segment]) -> list[render.Segment]:
    """Consecutive segments of one worker joined, so the answer reads as who wrote which stretch."""
    runs: list[render.Segment] = []
    for piece in pieces:
        if runs and runs[-1].worker == piece.worker:
            runs[-1] = render.Segment(piece.worker, runs[-1].text + piece.text)
        else:
            runs.append(piece)
    return runs


def _line(name: str, text: str, shown: str, item: TaskItem, width: int, out: TextIO) -> bool:
    """One answer: `shown` (its segments labelled, for the fused one) whole for GSM8K, else its first
    line; what was read; right or wrong."""
    prediction = item.read(text)
    correct = item.correct(prediction)
    verdict = "right" if correct else "wrong"
    if item.rule == Rule.GSM8K:
        indented = "\n      ".join(shown.strip().splitlines())
        print(f"  {name}:\n      {indented}\n  {'':<{width}}  answer {prediction or '(none)'}: {verdict}", file=out)
    else:
        visible = _ESCAPES.sub("", first_line(shown))  # colour codes take no room on the terminal
        print(f"  {name:<{width}}  {first_line(shown)}{' ' * max(0, 32 - len(visible))}  {verdict}", file=out)
    return correct


def tally_line(rights: list[dict[str, bool]]) -> str:
    """How many items each source got right, in the order the sources first appear."""
    sources = list(dict.fromkeys(source for right in rights for source in right))
    counts = [f"{source} {sum(r.get(source, False) for r in rights)}/{len(rights)}" for source in sources]
    return "right: " + ", ".join(counts)


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="fuse the trio on fixed items of each task family and a GSM8K question, end to end"
    )
    parser.add_argument(
        "--presets", default=",".join(TRIO), help="comma-separated model presets (default: %(default)s)"
    )
    parser.add_argument("--gsm8k", type=Path, default=DEFAULT_GSM8K, help="GSM8K JSONL (default: %(default)s)")
    parser.add_argument("--index", type=int, default=0, help="the GSM8K question's line in the file, from 0")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="the GSM8K answer's length, tokens")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="deadline of each request, seconds")
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG, help="where the servers' logs go")
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    items = demo_items(args.gsm8k, args.index, args.max_new_tokens, sys.stdout)
    spec = cluster_spec(args.presets, [])
    # https://no-color.org, as `coolfusion fuse` honours it.
    palette = render.Palette() if sys.stdout.isatty() and not os.environ.get("NO_COLOR") else None
    print("the first start prepares (and converts) the models inside the workers: this can take minutes")
    with signals_interrupt():
        cluster = start_cluster(spec, args.log, sys.stdout)
        try:
            with FusionClient(cluster.address) as client:
                if palette:
                    print(render.legend(list(spec), palette))
                rights = [
                    show(demo, ask(client, demo, args.timeout_s), list(spec), palette, sys.stdout) for demo in items
                ]
            print(f"\n{tally_line(rights)}")
            return 0
        finally:
            print("stopping the cluster...", flush=True)
            cluster.stop()
