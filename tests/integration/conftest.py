"""Clusters the integration tests share. Starting servers is much of what these tests cost (each
worker process imports torch and transformers: about 9 s of CPU), so tests that need only a
standard cluster share one for the whole run. A test that uses a shared cluster leaves it as it
found it: every worker up, no session open; a test that kills, restarts or reconfigures a server
starts its own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from coolfusion.cli.cluster import LocalCluster

from load_driver import tiny_cluster
from worker_probes import REAL_PAIR


@pytest.fixture(scope="session")
def tiny_trio(tiny_model_dirs, tmp_path_factory) -> Iterator[LocalCluster]:
    """A worker per tiny model family (named after it), with default settings, and an orchestrator."""
    with tiny_cluster(tiny_model_dirs, 3, tmp_path_factory.mktemp("logs") / "tiny-trio.log") as running:
        yield running


@pytest.fixture(scope="session")
def real_pair(tmp_path_factory) -> Iterator[LocalCluster]:
    """The default pair of real models (the cores shared between them) and an orchestrator."""
    spec = {name: ["--preset", preset] for name, preset in REAL_PAIR.items()}
    with LocalCluster(spec, log_path=tmp_path_factory.mktemp("logs") / "real-pair.log") as running:
        yield running
