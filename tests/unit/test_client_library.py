"""The client library on its own: what importing it loads, and how FuseOptions become request parameters."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from coolfusion.client import FuseOptions, fusion_parameters, fusion_strategy
from coolfusion.v1 import orchestrator_pb2

# Packages an application that only calls the orchestrator must not pay for.
_HEAVY = ("torch", "transformers", "matplotlib", "tqdm", "yaml", "starlette", "uvicorn")
_LIBRARY = ("coolfusion.client", "coolfusion.v1")


def test_importing_the_library_loads_only_grpc_protobuf_and_the_stubs() -> None:
    # A fresh interpreter: this test process has already imported the tooling and the servers.
    code = "import coolfusion.client, json, sys; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    modules = json.loads(done.stdout)
    ours = [m for m in modules if m.startswith("coolfusion.")]
    assert "coolfusion.client.client" in ours
    assert [m for m in ours if not m.startswith(_LIBRARY)] == []
    servers = (
        "coolfusion.cli",
        "coolfusion.serving",
        "coolfusion.orchestrator",
        "coolfusion.worker",
        "coolfusion.gateway",
    )
    for forbidden in servers:
        assert not [m for m in modules if m == forbidden or m.startswith(f"{forbidden}.")]
    assert not [m for m in modules if m.split(".")[0] in _HEAVY]


def test_no_options_leave_everything_to_the_orchestrator() -> None:
    parameters = fusion_parameters("Hi")
    assert list(parameters.workers) == list(parameters.stop_strings) == []
    assert (parameters.max_new_tokens, parameters.segment_max_tokens, parameters.include_trace) == (0, 0, False)
    assert parameters.rerank_mode == orchestrator_pb2.RERANK_MODE_NONE and not parameters.HasField("strategy")


def test_every_option_reaches_the_request() -> None:
    strategy = fusion_strategy("nll_mean", "stop")
    options = FuseOptions(
        workers=["a", "b"], max_new_tokens=64, stop=iter(["\nQ:"]), segment_max_tokens=8, rerank=True, trace=True,
        strategy=strategy,
    )  # fmt: skip
    assert (options.workers, options.stop) == (("a", "b"), ("\nQ:",))  # stored as tuples, whatever was given
    parameters = fusion_parameters("Hi", options)
    assert (list(parameters.workers), list(parameters.stop_strings)) == (["a", "b"], ["\nQ:"])
    assert (parameters.max_new_tokens, parameters.segment_max_tokens) == (64, 8)
    assert parameters.rerank_mode == orchestrator_pb2.RERANK_MODE_FULL_ANSWER and parameters.include_trace
    assert parameters.strategy == strategy


def test_options_are_frozen() -> None:
    options = FuseOptions(max_new_tokens=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.max_new_tokens = 9  # type: ignore[misc]
    assert dataclasses.replace(options, trace=True) == FuseOptions(max_new_tokens=8, trace=True)


def test_the_keyword_form_before_fuse_options_builds_the_same_request_with_a_deprecation_warning() -> None:
    strategy = fusion_strategy("nll_mean", "stop")
    with pytest.warns(
        DeprecationWarning, match=r"fusion_parameters\(prompt, workers=\.\.\., max_new_tokens=\.\.\., .*FuseOptions\("
    ):
        old = fusion_parameters("Hi", workers=["a"], max_new_tokens=64, stop=["\nQ:"], trace=True, strategy=strategy)
    new = fusion_parameters("Hi", FuseOptions(workers=("a",), max_new_tokens=64, stop=("\nQ:",), trace=True,
                                              strategy=strategy))  # fmt: skip
    assert old == new


def test_the_keyword_form_refuses_what_it_never_took() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_tokens'"):
        fusion_parameters("Hi", max_tokens=4)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="not both"):
        fusion_parameters("Hi", FuseOptions(), max_new_tokens=4)


def test_the_package_reports_its_installed_version() -> None:
    from importlib import metadata

    import coolfusion.client

    assert coolfusion.client.__version__ == metadata.version("coolfusion") != "0+unknown"
