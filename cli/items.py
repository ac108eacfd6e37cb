"""`coolfusion items`: checks a labelled-items file and says what is in it (tags, splits, prompt
forms, rules, lengths), or writes the task families as one (docs/own-traffic.md)."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from coolfusion.calibration.items import HELD_OUT, TUNING, ItemsFile, write_items
from coolfusion.cli import tasks
from coolfusion.cli.explore import DEFAULT_FAMILIES, read_items
from coolfusion.cli.tasks.export import export


def add_items_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="check a labelled-items file: every bad line with what is wrong")
    check.add_argument("file", type=Path)
    check.set_defaults(run=run_check)
    exported = actions.add_parser("export-tasks", help="write the task families as a labelled-items file")
    exported.add_argument("out", type=Path)
    exported.add_argument("--tasks", default=DEFAULT_FAMILIES, help=f"families (default: {DEFAULT_FAMILIES})")
    exported.add_argument("--split", choices=tasks.SPLITS, default=None, help="only this part (default: both)")
    exported.set_defaults(run=run_export)


def run_check(args: argparse.Namespace) -> int:
    print(describe(read_items(args.file)))
    return 0


def describe(data: ItemsFile) -> str:
    """What the file holds, per tag: items in each part, prompt forms, rules and answer caps."""
    lines = [f"{data.path}: {len(data.items)} items, sha256 {data.sha256[:16]}..., split: {data.split_rule()}"]
    for tag in [*data.tags, ""]:
        chosen = [item for item in data.items if item.tag == tag]
        if not chosen:
            continue
        splits = Counter(item.split for item in chosen)
        forms = ", ".join(f"{form} {n}" for form, n in Counter(item.form for item in chosen).items())
        rules = ", ".join(f"{rule} {n}" for rule, n in Counter(str(item.rule) for item in chosen).items())
        caps = sorted({item.max_new_tokens for item in chosen})
        lines.append(
            f"  {tag or '(untagged)'}: {splits[TUNING]} tuning, {splits[HELD_OUT]} held-out; {forms}; {rules}; "
            f"max_new_tokens {caps[0]}" + (f"-{caps[-1]}" if len(caps) > 1 else "")
        )
    return "\n".join(lines)


def run_export(args: argparse.Namespace) -> int:
    names = [name for name in args.tasks.split(",") if name]
    if unknown := [name for name in names if name not in tasks.FAMILIES]:
        raise SystemExit(f"coolfusion: unknown task family {unknown[0]!r}; choose from {', '.join(tasks.FAMILIES)}")
    items = export(names, [args.split] if args.split else tasks.SPLITS)
    write_items(items, args.out)
    print(f"{len(items)} items of {', '.join(names)} in {args.out}")
    return 0
