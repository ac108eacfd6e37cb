"""A deployment measured on its own labelled items, served: every item of a labelled-items file
(docs/own-traffic.md) asked of a running orchestrator as traffic would ask it, under the
orchestrator's own choice of rule (its default calibration, a tag's fit, or the unfitted default),
each answer checked by the item's rule. Where `calibrate` replays explored trees, this asks the
servers themselves, so it checks that what runs is what was measured.

    coolfusion up --presets smollm2-135m-instruct,gemma3-270m,qwen2.5-coder-0.5b-instruct \\
        --calibrations eval-results/calibrations-records --no-gateway          # prints ADDR
    .venv/bin/python scripts/served_items.py --orchestrator ADDR \\
        --data calibration/workloads/records.jsonl --split held-out

With `--untagged` the items are sent without their tags (the pooled rule answers them all). It
prints the right answers per tag and in all, which rule answered how many items, and for items
with a `json_schema`, how many finished answers parse and validate against it (jsonschema, a
check independent of the constraint engine that held them)."""

from __future__ import annotations

import argparse
import collections
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema

from coolfusion.calibration.items import SPLITS, LabelledItem, load_items
from coolfusion.client import FuseOptions, FusionClient, json_schema
from coolfusion.v1 import orchestrator_pb2, worker_pb2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orchestrator", required=True)
    parser.add_argument("--data", type=Path, required=True, help="a labelled-items file")
    parser.add_argument("--split", choices=SPLITS, default=None, help="only these items (default: all)")
    parser.add_argument("--workers", default="", help="comma-separated worker names (default: all serving)")
    parser.add_argument("--untagged", action="store_true", help="send the items without their tags")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="a JSONL file of every answer")
    args = parser.parse_args()
    items = [item for item in load_items(args.data).items if args.split in (None, item.split)]
    workers = tuple(w for w in args.workers.split(",") if w)
    with FusionClient(args.orchestrator, timeout_s=600) as client, ThreadPoolExecutor(args.concurrency) as pool:
        answers = list(pool.map(lambda item: _ask(client, item, workers, args.untagged), items))
    records = [_record(item, result) for item, result in zip(items, answers)]
    if args.out is not None:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    _print_summary(records)
    return 0


def _ask(
    client: FusionClient, item: LabelledItem, workers: tuple[str, ...], untagged: bool
) -> orchestrator_pb2.FuseResult:
    constraint = json_schema(item.json_schema) if item.json_schema is not None else None
    options = FuseOptions(
        workers=workers,
        max_new_tokens=item.max_new_tokens,
        stop=item.stop,
        constraint=constraint,
        tag="" if untagged else item.tag,
    )
    return client.fuse(item.request_prompt, options)


def _record(item: LabelledItem, result: orchestrator_pb2.FuseResult) -> dict[str, object]:
    reason = orchestrator_pb2.RuleReason.Name(result.rule_choice.reason).removeprefix("RULE_REASON_").lower()
    return {
        "id": item.id,
        "tag": item.tag,
        "text": result.text,
        "correct": item.correct(item.read(result.text)),
        "rule": result.strategy.calibration or "unfitted",
        "reason": reason,
        "cut": result.finish_reason == worker_pb2.FINISH_REASON_LENGTH,
        "schema_valid": None if item.json_schema is None else _validates(result.text, item.json_schema),
    }


def _validates(text: str, schema: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), json.loads(schema))
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def _print_summary(records: list[dict[str, object]]) -> None:
    by_tag: dict[str, list[bool]] = collections.defaultdict(list)
    for record in records:
        by_tag[str(record["tag"])].append(bool(record["correct"]))
    for tag, right in sorted(by_tag.items()):
        print(f"{tag or '(untagged)'}: {sum(right)} / {len(right)}")
    total = sum(bool(r["correct"]) for r in records)
    print(f"all: {total} / {len(records)} ({100 * total / max(1, len(records)):.1f}%)")
    rules = collections.Counter((str(r["rule"]), str(r["reason"])) for r in records)
    for (rule, reason), count in sorted(rules.items()):
        print(f"  {count} items answered by {rule} ({reason})")
    held = [r for r in records if r["schema_valid"] is not None]
    if held:
        finished = [r for r in held if not r["cut"]]
        valid = sum(bool(r["schema_valid"]) for r in finished)
        print(f"schema: {valid} of {len(finished)} finished answers valid ({len(held) - len(finished)} cut by the cap)")


if __name__ == "__main__":
    sys.exit(main())
