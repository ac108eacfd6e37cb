"""What a constraint costs a fusion (docs/design.md chapter 9), measured side by side in one run.

1. Fused steps: the same extraction prompts fused with a JSON Schema and without, taken in turns;
   the time of a step (generation and scoring, the slowest worker each) per fusion, median.
2. Decoding: on each worker, the same contexts (every prefix of the constrained answers) generate
   one segment in a session opened with the constraint and in one without; compute per token.
3. Compiles: each worker's coolfusion_worker_grammar_compiles_total is not read here (the worker's
   metrics port is off in a local cluster); tests/integration/test_metrics.py checks that a second
   request with the same schema compiles nothing.

    python scripts/bench_constrained.py                  # the default pair, started here
    python scripts/bench_constrained.py --orchestrator HOST:PORT --worker smollm2=HOST:PORT ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import ExitStack

import grpc

from coolfusion.cli.cluster import LocalCluster
from coolfusion.cli.common import cluster_spec
from coolfusion.client import FuseOptions, FusionClient, chat, json_schema
from coolfusion.v1 import worker_pb2, worker_pb2_grpc

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
# Written for this benchmark.
TEXTS = [
    "Maria Lopez, 34, moved to Seville last spring.",
    "The new manager is Tom Becker; he is 51 and lives in Hamburg.",
    "Aiko Tanaka (age 27) works from Osaka.",
    "At 45, Pierre Dubois still cycles across Lyon every day.",
    "Our oldest member, Edna Clarke, turned 88 in Leeds.",
    "Ravi Patel, a 39-year-old engineer from Pune, won the prize.",
]


def prompt(text: str) -> list[dict[str, str]]:
    return chat(f"Extract the person's name, age and city as JSON.\nText: {text}")


def fused_steps(client: FusionClient, rounds: int, max_new_tokens: int) -> dict[str, list[float]]:
    """Per-step milliseconds of each fusion, constrained and free, the two taken in turns."""
    per_step: dict[str, list[float]] = {"constrained": [], "free": []}
    answers = []
    for _ in range(rounds):
        for text in TEXTS:
            for name, constraint in (("constrained", json_schema(PERSON)), ("free", None)):
                result = client.fuse(prompt(text), FuseOptions(max_new_tokens=max_new_tokens, constraint=constraint))
                if result.dropped:
                    raise SystemExit(f"a worker was dropped: {result.dropped}")
                timings = result.timings
                per_step[name].append((timings.generate_ms + timings.score_ms) / max(timings.steps, 1))
                if name == "constrained":
                    answers.append((text, result.text))
    per_step["answers"] = answers  # type: ignore[assignment]
    return per_step


def decode_per_token(address: str, answers: list[tuple[str, str]]) -> dict[str, float]:
    """Median compute per generated token, at the same contexts, with and without the constraint."""
    times: dict[str, list[float]] = {"constrained": [], "free": []}
    constraint = json_schema(PERSON)
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        for i, (text, answer) in enumerate(dict.fromkeys(answers)):
            cuts = [k for k in range(len(answer)) if answer[k] == " "] or [0]
            for k in cuts:
                for name, held in (("constrained", constraint), ("free", None)):
                    session = f"bench-{name}-{i}-{k}-{time.monotonic_ns()}"
                    opened = stub.OpenSession(
                        worker_pb2.OpenSessionRequest(
                            session_id=session, prompt=_prompt_proto(text), answer_text=answer[:k], constraint=held
                        ),
                        timeout=120,
                    )
                    segment = stub.GenerateSegment(
                        worker_pb2.GenerateSegmentRequest(
                            session_id=session, expected_context_tokens=opened.context_tokens
                        ),
                        timeout=120,
                    )
                    stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=session), timeout=30)
                    times[name].append(segment.compute_ms / max(segment.generated_tokens, 1))
    return {name: statistics.median(values) for name, values in times.items()}


def _prompt_proto(text: str) -> worker_pb2.Prompt:
    messages = [worker_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt(text)]
    return worker_pb2.Prompt(chat=worker_pb2.ChatConversation(messages=messages))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orchestrator", help="an orchestrator to use (default: start the default pair here)")
    parser.add_argument("--worker", action="append", default=[], metavar="NAME=ADDR", help="a worker to decode on")
    parser.add_argument("--rounds", type=int, default=2, help="times each prompt is fused each way")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--presets", default="smollm2-135m-instruct,gemma3-270m", help="the workers started here")
    args = parser.parse_args()
    with ExitStack() as stack:
        if args.orchestrator:
            address, workers = args.orchestrator, dict(w.split("=", 1) for w in args.worker)
        else:
            cluster = stack.enter_context(LocalCluster(cluster_spec(args.presets, []), log_path=None))
            address, workers = cluster.address, {n: w.address for n, w in cluster.workers.items()}
        with FusionClient(address, timeout_s=900) as client:
            client.fuse(prompt(TEXTS[0]), FuseOptions(max_new_tokens=8, constraint=json_schema(PERSON)))  # warm up
            steps = fused_steps(client, args.rounds, args.max_new_tokens)
        decode = {name: decode_per_token(addr, steps["answers"]) for name, addr in workers.items()}  # type: ignore[arg-type]
    constrained, free = statistics.median(steps["constrained"]), statistics.median(steps["free"])
    report = {
        "fused step ms (median)": {"constrained": constrained, "free": free, "ratio": constrained / free},
        "decode ms per token (median)": {
            name: {**d, "ratio": d["constrained"] / d["free"]} for name, d in decode.items()
        },
        "fusions each way": len(steps["free"]),
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
