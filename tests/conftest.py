"""Shared pytest fixtures."""

import pathlib

import pytest

from tiny_models import FAMILIES, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dirs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny_model(family, root / family) for family in FAMILIES}
