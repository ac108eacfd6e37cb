"""Load test on loopback: tiny-model workers and an orchestrator as processes, many Fuse requests in flight.

Prints requests completed, errors, requests per second, p50/p99 latency, and per worker the sessions
left open afterwards and resident memory after the warm-up and after the load. Exits 1 when a
request failed, a worker was dropped, or a session was left open. tests/integration/test_load.py
runs the same procedure (tests/load_driver.py) with assertions.

Usage: python scripts/load_test.py [--duration-s 20] [--concurrency 8] [--workers 3]
                                  [--max-new-tokens 8] [--warmup-s 5] [--log FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the load driver and the tiny-model builder live with the tests

from load_driver import MAX_NEW_TOKENS, WARMUP_S, measure, tiny_cluster
from tiny_models import FAMILIES, build_tiny_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=20.0, help="how long clients keep sending requests")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (tiny model families in turn)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="answer length of each request")
    parser.add_argument("--warmup-s", type=float, default=WARMUP_S, help="load before memory is first read")
    parser.add_argument("--log", type=Path, help="append the servers' logs to this file")
    args = parser.parse_args(argv)
    if args.duration_s < 0 or args.warmup_s < 0 or args.concurrency < 1 or args.workers < 1 or args.max_new_tokens < 1:
        parser.error("--duration-s and --warmup-s must be >= 0; --concurrency, --workers and --max-new-tokens >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="coolfusion-load-") as folder:
        families = FAMILIES[: min(args.workers, len(FAMILIES))]
        model_dirs = {f: build_tiny_model(f, Path(folder) / f) for f in families}
        print(f"starting {args.workers} workers and an orchestrator", flush=True)
        with tiny_cluster(model_dirs, args.workers, args.log) as cluster:
            run = measure(cluster, args.duration_s, args.concurrency, args.max_new_tokens, args.warmup_s)
    print(run.report())
    clean = not run.load.errors and not run.load.dropped and not any(w.sessions_after for w in run.workers)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
