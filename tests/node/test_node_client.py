"""A Node.js client built from the .proto files alone gets the same answers as the Python client."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import grpc
import pytest

from coolfusion.cli.cluster import LocalCluster
from coolfusion.v1 import orchestrator_pb2 as opb
from coolfusion.v1 import orchestrator_pb2_grpc, worker_pb2

HERE = pathlib.Path(__file__).parent
SCRIPT = HERE / "call.mjs"
PROMPT = "Tom has 3 apples and buys 4 more."
MAX_NEW_TOKENS = 12
WORKERS = ("bpe", "char")


@pytest.fixture(scope="module")
def node_client() -> list[str]:
    """The argv prefix that runs call.mjs, with its dependencies installed from package-lock.json."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed; the Node.js client proof needs both")
    if not (HERE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        # --ignore-scripts: the only install script (protobufjs's) is a version check that newer
        # npm refuses to run anyway; the pinned lock file is all this needs.
        subprocess.run(
            [npm, "ci", "--prefix", str(HERE), "--ignore-scripts", "--no-audit", "--no-fund"],
            check=True,
            timeout=300,
            capture_output=True,
        )
    return [node, str(SCRIPT)]


@pytest.fixture(scope="module")
def cluster(tiny_model_dirs, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "cluster.log"
    with LocalCluster({f: ["--model", str(tiny_model_dirs[f])] for f in WORKERS}, log_path=log) as running:
        yield running


def run_node(node_client: list[str], cluster: LocalCluster, *extra: str) -> dict:
    completed = subprocess.run(
        [*node_client, cluster.address, cluster.workers["bpe"].address, *extra],
        check=False,  # the exit code is asserted with the script's stderr
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, f"call.mjs exited {completed.returncode}: {completed.stderr}"
    return json.loads(completed.stdout)


def test_node_client_gets_the_same_fusion_as_the_python_client(node_client, cluster):
    answer = run_node(node_client, cluster, "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW_TOKENS))

    request = opb.FuseRequest(
        parameters=opb.FusionParameters(prompt=worker_pb2.Prompt(text=PROMPT), max_new_tokens=MAX_NEW_TOKENS)
    )
    with grpc.insecure_channel(cluster.address) as channel:
        expected = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Fuse(request, timeout=60).result

    assert answer["protocol_version"] == "coolfusion.v1"
    assert answer["model_id"]
    assert answer["text"] == expected.text
    assert answer["text"]  # an empty answer would make the comparison vacuous
    assert answer["finish_reason"] == worker_pb2.FinishReason.Name(expected.finish_reason)
    assert [s["worker"] for s in answer["shares"]] == list(WORKERS)
    assert [(s["segments"], s["chars"]) for s in answer["shares"]] == [(s.segments, s.chars) for s in expected.shares]


def test_node_client_sees_invalid_argument_with_details_for_an_empty_prompt(node_client, cluster):
    error = run_node(node_client, cluster, "--empty-prompt")["error"]

    assert (error["code"], error["name"]) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "INVALID_ARGUMENT")
    assert "prompt" in error["details"]


def test_node_client_exits_non_zero_when_the_server_is_unreachable(node_client):
    completed = subprocess.run(
        [*node_client, "127.0.0.1:1", "127.0.0.1:1", "--deadline-ms", "2000"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode != 0
    assert "UNAVAILABLE" in completed.stderr or "DEADLINE_EXCEEDED" in completed.stderr
