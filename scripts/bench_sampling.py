"""Sampled fusion on real models, in one run (docs/design.md chapter 10):

1. reproducible: one sampled request repeated 20 times, each beside 8 other sampled requests;
2. across restarts: the same request after every process of the cluster was restarted;
3. greedy: temperature 0 against no sampling at all, byte for byte, on several prompts;
4. n answers: the wall time of n=4 sampled answers against one, the two taken in turns.

    python scripts/bench_sampling.py                        # the default pair, started here
    python scripts/bench_sampling.py --presets smollm2-135m-instruct,gemma3-270m,qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from coolfusion.cli.cluster import LocalCluster
from coolfusion.cli.common import cluster_spec
from coolfusion.client import FuseOptions, FusionClient, chat

# Written for this benchmark: open prompts, where sampling has room to vary.
PROMPTS = [
    "Write two sentences about why rivers bend.",
    "Describe a quiet morning in a small town.",
    "Give three tips for learning to cook.",
    "What makes a good friend?",
    "Explain in simple words how a bicycle stays upright.",
    "Tell a very short story about a lost key.",
    "Why do leaves change colour in autumn?",
    "Name a few things people do on a rainy day.",
    "What would you pack for a day at the beach?",
]
SAMPLED = FuseOptions(max_new_tokens=32, temperature=0.8, top_p=0.95, seed=2026)


def repeats(address: str, count: int) -> dict:
    """`count` repeats of one sampled request, each beside 8 others (other prompts and seeds)."""
    with FusionClient(address, timeout_s=1800) as client, ThreadPoolExecutor(9) as pool:
        texts = []
        for repeat in range(count):
            crowd = [
                pool.submit(client.fuse, chat(p), FuseOptions(max_new_tokens=32, temperature=1.0, seed=repeat * 8 + i))
                for i, p in enumerate(PROMPTS[1:])
            ]
            texts.append(client.fuse(chat(PROMPTS[0]), SAMPLED).text)
            for other in crowd:
                other.result()
            print(f"repeat {repeat + 1}/{count}", file=sys.stderr, flush=True)
    return {"repeats": count, "identical": sum(t == texts[0] for t in texts), "text": texts[0]}


def greedy_equals_temperature_zero(address: str) -> dict:
    with FusionClient(address, timeout_s=1800) as client:
        same = [
            client.fuse(chat(p), FuseOptions(max_new_tokens=32)).text
            == client.fuse(chat(p), FuseOptions(max_new_tokens=32, temperature=0.0, seed=7)).text
            for p in PROMPTS[:4]
        ]
    return {"prompts": len(same), "byte_identical": sum(same)}


def choices_cost(address: str, rounds: int, n: int) -> dict:
    """Wall seconds of n sampled answers and of one, taken in turns on the same prompts."""
    times: dict[str, list[float]] = {"one": [], f"n={n}": []}
    with FusionClient(address, timeout_s=1800) as client:
        for r in range(rounds):
            for p in PROMPTS[:3]:
                for name, count in (("one", 1), (f"n={n}", n)):
                    options = FuseOptions(max_new_tokens=32, temperature=0.8, seed=100 + r, n=count)
                    started = time.perf_counter()
                    client.fuse_choices(chat(p), options)
                    times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {**medians, "ratio": medians[f"n={n}"] / medians["one"], "pairs": len(times["one"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="smollm2-135m-instruct,gemma3-270m")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the n-answers timing (3 prompts each)")
    parser.add_argument("-n", type=int, default=4)
    args = parser.parse_args()
    spec = cluster_spec(args.presets, [])
    report: dict = {"workers": list(spec)}
    with LocalCluster(spec, log_path=None) as cluster:
        with FusionClient(cluster.address, timeout_s=1800) as client:
            client.fuse(chat(PROMPTS[0]), FuseOptions(max_new_tokens=4))  # warm up
        report["reproducible"] = repeats(cluster.address, args.repeats)
        report["greedy"] = greedy_equals_temperature_zero(cluster.address)
        report["choices"] = choices_cost(cluster.address, args.rounds, args.n)
    with LocalCluster(spec, log_path=None) as restarted, FusionClient(restarted.address, timeout_s=1800) as client:
        again = client.fuse(chat(PROMPTS[0]), SAMPLED).text
    report["after_restart"] = {"identical": again == report["reproducible"]["text"]}
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
