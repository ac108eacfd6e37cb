"""Soak on loopback: many fusions through tiny-model workers at concurrency 1-16, some streams
cancelled by their callers mid-way; then sessions left open and worker memory.

Exits 1 when a request failed (other than the deliberate cancellations), a worker was dropped, or a
session was left open. tests/integration/test_soak.py runs the same procedure with assertions.

Usage: python scripts/soak.py [--total 1000] [--cancel-every 10] [--workers 3] [--log FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the load driver and the tiny-model builder live with the tests

from load_driver import measure_soak, tiny_cluster
from tiny_models import FAMILIES, build_tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total", type=int, default=1000, help="fusions after the warm-up")
    parser.add_argument("--cancel-every", type=int, default=10, help="every n-th is a stream cancelled mid-way")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (tiny model families in turn)")
    parser.add_argument("--log", type=Path, help="append the servers' logs to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="coolfusion-soak-") as folder:
        families = FAMILIES[: min(args.workers, len(FAMILIES))]
        model_dirs = {f: build_tiny_model(f, Path(folder) / f) for f in families}
        with tiny_cluster(model_dirs, args.workers, args.log) as cluster:
            run = measure_soak(cluster, args.total, args.cancel_every)
    print(run.report())
    return 0 if run.clean else 1


if __name__ == "__main__":
    sys.exit(main())
