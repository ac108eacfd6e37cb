"""Do constrained answers parse and validate? Every subset of the workers (each alone, each pair,
all of them) answers a prompt per schema under that schema; each answer that a model ended (not
cut by the token cap) must parse as JSON and validate against its schema (docs/design.md
chapter 9). Schemas: the ten of tests/integration/test_structured_output.py, with longer bounds.

    python scripts/structured_validity.py --presets smollm2-135m-instruct,gemma3-270m,qwen2.5-coder-0.5b-instruct
    python scripts/structured_validity.py --orchestrator HOST:PORT        # any running cluster (vLLM workers too)

With `--trees`, it reads a `coolfusion explore --data` folder instead and checks every answer a
model ended in every tree (each subset of workers and every strategy the trees hold) against its
item's `json_schema`:

    python scripts/structured_validity.py --trees eval-results/trees-extraction \
        --data calibration/workloads/extraction.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from contextlib import ExitStack
from pathlib import Path

import jsonschema

from coolfusion.calibration.items import load_items
from coolfusion.cli.cluster import LocalCluster
from coolfusion.cli.common import cluster_spec
from coolfusion.client import FuseOptions, FusionClient, chat, json_schema
from coolfusion.v1 import worker_pb2


def closed(properties: dict, required: list[str] | None = None) -> dict:
    listed = list(properties) if required is None else required
    return {"type": "object", "properties": properties, "required": listed, "additionalProperties": False}


TEXT = {"type": "string", "maxLength": 40}
# (schema, what to ask): written for this check.
CASES = {
    "flat": (closed({"name": TEXT, "age": {"type": "integer"}}), "Ada Lovelace was 36. Give her name and age."),
    "nested": (
        closed({"address": closed({"city": TEXT, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
        "The office is at 12 Rue Cler, 75007 Paris. Give the city and postal code.",
    ),
    "enum-array": (
        closed(
            {"colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}}
        ),
        "Which colours are in the French flag?",
    ),
    "numbers": (
        closed({"price": {"type": "number"}, "quantity": {"type": "integer"}}),
        "I bought 3 books for 12.50 euros each. Give the price of one and the quantity.",
    ),
    "optional": (closed({"title": TEXT, "subtitle": TEXT}, required=["title"]), "Name a famous novel."),
    "pattern": (closed({"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}), "What is the currency code of Japan?"),
    "nullable": (
        closed({"married": {"type": "boolean"}, "spouse": {"anyOf": [TEXT, {"type": "null"}]}}),
        "Marie Curie married Pierre Curie. Was she married, and to whom?",
    ),
    "objects": (
        closed(
            {"items": {"type": "array", "items": closed({"name": TEXT, "count": {"type": "integer"}}), "maxItems": 3}}
        ),
        "List what is in the basket: 2 apples and 5 eggs.",
    ),
    "top-enum": (
        {"enum": ["positive", "negative", "neutral"]},
        "Is the review 'I loved this film' positive or negative?",
    ),
    "refs": (
        {
            "$defs": {"person": closed({"name": TEXT, "born": {"type": "integer"}})},
            **closed({"author": {"$ref": "#/$defs/person"}}),
        },
        "Who wrote Hamlet, and in which year was he born?",
    ),
}


def check(client: FusionClient, workers: tuple[str, ...], max_new_tokens: int) -> list[dict]:
    rows = []
    for name, (schema, question) in CASES.items():
        prompt = chat(f"{question}\nAnswer in JSON.")
        result = client.fuse(
            prompt, FuseOptions(workers=workers, max_new_tokens=max_new_tokens, constraint=json_schema(schema))
        )
        cut = result.finish_reason == worker_pb2.FINISH_REASON_LENGTH
        valid = None
        if not cut:
            try:
                jsonschema.validate(json.loads(result.text), schema)
                valid = True
            except (json.JSONDecodeError, jsonschema.ValidationError):
                valid = False
        rows.append({"schema": name, "workers": workers, "cut": cut, "valid": valid, "text": result.text})
        print(
            f"{'+'.join(workers)} {name}: {'cut' if cut else 'valid' if valid else 'INVALID'} {result.text!r}",
            file=sys.stderr,
        )
    return rows


def check_trees(folder: Path, data: Path) -> int:
    """Every EOS-ended answer of the explored trees in `folder`, validated against its item's schema."""
    schemas = {item.id: json.loads(item.json_schema) for item in load_items(data).items if item.json_schema}
    trees, valid, invalid = set(), 0, []
    for line in (folder / "trees.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["fingerprint"] in trees or record["id"] not in schemas:
            continue  # items of one text share a tree
        trees.add(record["fingerprint"])
        for answer in record["tree"]["answers"]:
            if not answer.get("ends_with_eos"):
                continue
            try:
                jsonschema.validate(json.loads(answer["text"]), schemas[record["id"]])
                valid += 1
            except (json.JSONDecodeError, jsonschema.ValidationError) as error:
                invalid.append({"id": record["id"], "text": answer["text"], "error": str(error)[:200]})
    json.dump(
        {"trees": len(trees), "ended_answers": valid + len(invalid), "valid": valid, "invalid": invalid},
        sys.stdout,
        indent=2,
    )
    print()
    return 0 if not invalid else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orchestrator", help="a running orchestrator (default: start --presets here)")
    parser.add_argument("--presets", default="smollm2-135m-instruct,gemma3-270m,qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--trees", type=Path, help="a `coolfusion explore --data` folder to check instead")
    parser.add_argument("--data", type=Path, help="with --trees: its labelled-items file")
    args = parser.parse_args()
    if args.trees:
        if not args.data:
            parser.error("--trees needs --data")
        return check_trees(args.trees, args.data)
    with ExitStack() as stack:
        if args.orchestrator:
            address = args.orchestrator
        else:
            address = stack.enter_context(LocalCluster(cluster_spec(args.presets, []), log_path=None)).address
        client = stack.enter_context(FusionClient(address, timeout_s=1800))
        names = [w.name for w in client.list_workers() if w.serving]
        subsets = [s for n in range(1, len(names) + 1) for s in itertools.combinations(names, n)]
        rows = [row for subset in subsets for row in check(client, subset, args.max_new_tokens)]
    finished = [r for r in rows if not r["cut"]]
    report = {
        "answers": len(rows),
        "cut_by_the_cap": len(rows) - len(finished),
        "finished": len(finished),
        "valid": sum(r["valid"] for r in finished),
        "invalid": [r for r in finished if not r["valid"]],
        "by_subset": {
            "+".join(
                s
            ): f"{sum(1 for r in rows if r['workers'] == s and r['valid'])}/{sum(1 for r in rows if r['workers'] == s and not r['cut'])}"
            for s in subsets
        },
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0 if not report["invalid"] else 1


if __name__ == "__main__":
    sys.exit(main())
