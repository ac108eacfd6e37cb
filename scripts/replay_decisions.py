"""Replays aggregation rules on the first disagreement of each item stored by `coolfusion eval`.

Before an item's first scored step every worker proposed the same text, so that step's candidates
and scores are the same under any rule; its winner mostly decides a short answer. For each item
where exactly one worker alone was right, this script asks which worker's candidate each rule
would pick there and counts the item right when that worker was right alone (items where both or
neither were right count as right and wrong under every rule). Each `--asked` mode is printed
twice, as it was answered and as replayed from its own first decision, which shows how far the
replay can be trusted. Usage:

    python scripts/replay_decisions.py eval-results/tuning-2 --asked cool@paper,cool@nll_mean+stop

Rules: ppl_mean, nll_mean, nll_sum (total NLL, not per token), proposer:F (a proposer's own score
counts F times), weight:WORKER=W (nll_mean with that worker weighted W).
"""

from __future__ import annotations

import argparse
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coolfusion.cli import tasks
from coolfusion.cli.eval import read_results, rescored

Candidate = dict[str, Any]  # one stored candidate: text, by, ppl (worker -> perplexity), tokens
Rule = Callable[[Candidate], float]  # lower wins


def rule(name: str) -> Rule:
    """A rule by its name on the command line."""
    kind, _, parameter = name.partition(":")
    if kind == "ppl_mean":
        return lambda c: sum(c["ppl"].values()) / len(c["ppl"])
    if kind == "nll_mean":
        return lambda c: sum(map(math.log, c["ppl"].values())) / len(c["ppl"])
    if kind == "nll_sum":
        return lambda c: sum(math.log(p) * c["tokens"][w] for w, p in c["ppl"].items())
    if kind == "proposer":
        factor = float(parameter)
        return lambda c: _weighted(c, {w: factor if w in c["by"] else 1.0 for w in c["ppl"]})
    if kind == "weight":
        worker, _, weight = parameter.partition("=")
        return lambda c: _weighted(c, {w: float(weight) if w == worker else 1.0 for w in c["ppl"]})
    raise SystemExit(f"unknown rule {name!r}")


def _weighted(candidate: Candidate, weights: dict[str, float]) -> float:
    nlls = {w: math.log(p) for w, p in candidate["ppl"].items()}
    return sum(weights[w] * nlls[w] for w in nlls) / sum(weights.values())


def replay(folder: Path, rules: list[str], asked: list[str]) -> None:
    items = [i for f in tasks.FAMILIES for s in tasks.SPLITS for i in tasks.items(f, s)]
    by_item: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for record in rescored(read_results(folder / "results.jsonl"), items):
        by_item[(record["family"], record["id"])][record["mode"]] = record
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for (family, _), modes in by_item.items():
        solos = {m.removeprefix("solo:"): r["correct"] for m, r in modes.items() if m.startswith("solo:")}
        steps = modes[asked[0]]["steps"]
        tally = counts[family]
        tally["items"] += 1
        for mode in asked:
            tally[mode] += modes[mode]["correct"]
        replays = rules + [f"{mode} (replayed)" for mode in asked]
        if sum(solos.values()) != 1 or not steps:
            for name in replays:
                tally[name] += all(solos.values())  # both right: any choice is; neither: none is
            continue
        candidates = steps[0]["candidates"]
        for name in rules:
            scores = [rule(name)(c) for c in candidates]
            tally[name] += solos[candidates[scores.index(min(scores))]["by"][0]]
        for mode in asked:
            winner = modes[mode]["steps"][0]["winner"]
            tally[f"{mode} (replayed)"] += solos[candidates[winner]["by"][0]]
    for family, tally in counts.items():
        print(f"{family}: {tally['items']} items")
        for name in rules + asked + [f"{m} (replayed)" for m in asked]:
            print(f"  {name:32s} {tally[name]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a `coolfusion eval --out` folder with solo and cool records")
    parser.add_argument("--asked", required=True, help="comma-separated cool modes of the folder to check against")
    parser.add_argument("--rules", default="ppl_mean,nll_mean,proposer:3,weight:gemma3=1.5")
    args = parser.parse_args()
    replay(args.folder, args.rules.split(","), args.asked.split(","))


if __name__ == "__main__":
    main()
