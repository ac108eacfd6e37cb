"""Fusion benchmarks, measured side by side in one run (issue 3's figures).

1. Orchestrator overhead per step on loopback with tiny models: request time minus the workers'
   own compute time (reported by each worker per call), per step.
2. On the default pair, for one GSM8K question: fused wall time against the sum of the two models'
   solo greedy `generate` times for the same answer length (each in its own tokens), and against
   the cache-free reference implementation (tests/reference.py) producing the same text.

Usage: python scripts/bench_fusion.py [--tiny-only] [--max-new-tokens 64] [--question 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builder and the reference live with the tests

from coolfusion.client import FusionClient, chat  # noqa: E402
from coolfusion.client.cluster import LocalCluster  # noqa: E402
from coolfusion.worker import loading  # noqa: E402

from reference import ReferenceModel, reference_fuse  # noqa: E402
from tiny_models import FAMILIES, build_tiny_model  # noqa: E402

GSM8K = ROOT / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"
INSTRUCTION = "Solve the problem step by step, then give the final answer on its own line as '#### <number>'."
PRESETS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}


def tiny_overhead(requests: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        dirs = {f: build_tiny_model(f, Path(folder) / f) for f in FAMILIES}
        with LocalCluster({f: ["--model", str(d)] for f, d in dirs.items()}) as cluster:
            with FusionClient(cluster.address) as client:
                client.fuse("Warm up.", max_new_tokens=8)
                per_step, step_ms, compute_ms = [], [], []
                for i in range(requests):
                    t = client.fuse(f"Question {i}: Tom has {i} apples and buys 4 more.", max_new_tokens=48).timings
                    loop_ms = t.total_ms - t.open_ms
                    per_step.append((loop_ms - t.worker_compute_ms) / t.steps)
                    step_ms.append(loop_ms / t.steps)
                    compute_ms.append(t.worker_compute_ms / t.steps)
    return {
        "tiny_requests": requests,
        "tiny_step_ms_median": round(statistics.median(step_ms), 2),
        "tiny_worker_compute_ms_per_step_median": round(statistics.median(compute_ms), 2),
        "tiny_overhead_ms_per_step_median": round(statistics.median(per_step), 2),
        "tiny_overhead_ms_per_step_p90": round(sorted(per_step)[int(0.9 * (len(per_step) - 1))], 2),
    }


def question(index: int) -> list[dict]:
    with GSM8K.open() as lines:
        item = json.loads(next(line for i, line in enumerate(lines) if i == index))
    return chat(f"{item['question']}\n{INSTRUCTION}")


def real_pair(index: int, max_new_tokens: int) -> dict:
    prompt = question(index)
    with LocalCluster({n: ["--preset", p] for n, p in PRESETS.items()}) as cluster:
        with FusionClient(cluster.address) as client:
            started = time.perf_counter()
            result = client.fuse(prompt, max_new_tokens=max_new_tokens)
            fused_s = time.perf_counter() - started
    models = {
        n: ReferenceModel(n, *loading.load_model(loading.resolve_model_folder(preset=p))) for n, p in PRESETS.items()
    }
    solo_s = {n: solo_generate_seconds(m, prompt, result.text) for n, m in models.items()}
    started = time.perf_counter()
    reference_text, _ = reference_fuse(list(models.values()), prompt, max_new_tokens=max_new_tokens)
    reference_s = time.perf_counter() - started
    return {
        "question": index,
        "answer_tokens": {n: m.answer_tokens(*m.render(prompt), result.text) for n, m in models.items()},
        "steps": result.timings.steps,
        "fused_s": round(fused_s, 1),
        "solo_generate_s": {n: round(s, 1) for n, s in solo_s.items()},
        "fused_over_sum_of_solo": round(fused_s / sum(solo_s.values()), 2),
        "reference_s": round(reference_s, 1),
        "fused_over_reference": round(fused_s / reference_s, 3),
        "reference_text_equal": reference_text == result.text,
    }


def solo_generate_seconds(model: ReferenceModel, prompt: list[dict], answer: str) -> float:
    """transformers greedy generate with its KV cache, producing as many tokens as the fused answer has
    in this model's tokenizer; one thread, as each worker of the local cluster gets on 2 cores."""
    rendered, special = model.render(prompt)
    tokens = model.answer_tokens(rendered, special, answer)
    ids = torch.tensor([model.ids(rendered, special)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        model.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-requests", type=int, default=20)
    parser.add_argument("--tiny-only", action="store_true")
    parser.add_argument("--question", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(tiny_overhead(args.tiny_requests)), flush=True)
    if not args.tiny_only:
        print(json.dumps(real_pair(args.question, args.max_new_tokens)), flush=True)


if __name__ == "__main__":
    main()
