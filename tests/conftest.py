"""Shared pytest fixtures, and the test process's torch threads."""

import pathlib

import pytest
import torch

from tiny_models import FAMILIES, build_tiny_model


def pytest_configure(config: pytest.Config) -> None:
    # One torch thread in the test process, which runs in-process workers and the cache-free
    # references. A second thread buys little on the tiny models, and when other work keeps both
    # cores busy, torch's threads wait for each other at every operation: a reference fusion of
    # the tiny models took 28-32 s with two threads and 2.9-3.5 s with one, and a 600-token
    # SmolLM2 forward pass 21-24 s against 7-8 s, measured side by side on the loaded 2-core
    # development machine. Worker processes choose their own threads (--threads).
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dirs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny_model(family, root / family) for family in FAMILIES}
