"""Fixtures for the WorkerService conformance suite: a worker address, a stub, fresh sessions.

The suite speaks only gRPC (the generated coolfusion.v1 stubs, grpc.health.v1 and server
reflection), so it can check a worker written in any language. Point it at one with
`--worker-address HOST:PORT` (or COOLFUSION_WORKER_ADDRESS); without one it starts a local
coolfusion worker on a tiny random model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest

from coolfusion.v1 import worker_pb2, worker_pb2_grpc

from conformance_support import RPC_TIMEOUT_S, OpenSession, new_session_id

ADDRESS_ENV = "COOLFUSION_WORKER_ADDRESS"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("coolfusion conformance")
    group.addoption(
        "--worker-address",
        default=None,
        help=f"HOST:PORT of the worker under test (or ${ADDRESS_ENV}); default: start a local tiny worker",
    )
    group.addoption(
        "--tiny-family",
        default="bpe",
        choices=["bpe", "metaspace", "char"],
        help="tiny model family of the local worker started when no address is given",
    )


def _option(config: pytest.Config, name: str, default: str | None) -> str | None:
    # The option exists only when this conftest was loaded before argument parsing (that is,
    # when tests/conformance is named on the command line); otherwise fall back quietly.
    try:
        return config.getoption(name)
    except ValueError:
        return default


@pytest.fixture(scope="session")
def worker_address(request: pytest.FixtureRequest) -> Iterator[str]:
    """The worker under test: the given address, or a local worker on a tiny model."""
    address = _option(request.config, "--worker-address", None) or os.environ.get(ADDRESS_ENV)
    if address:
        yield address
        return
    # Only the local mode needs the model stack; resolved lazily so that a team testing its own
    # worker needs just grpc and the generated stubs (see README.md).
    from coolfusion.cli.cluster import launch, stop_processes, wait_ready, worker_argv

    family = _option(request.config, "--tiny-family", "bpe")
    try:
        tiny_model_dirs = request.getfixturevalue("tiny_model_dirs")  # from tests/conftest.py
    except pytest.FixtureLookupError:
        pytest.exit(f"no worker to test: pass --worker-address HOST:PORT or set ${ADDRESS_ENV}", returncode=4)
    worker = launch("conformance-worker", worker_argv(["--model", str(tiny_model_dirs[family])]))
    try:
        wait_ready(worker, 120)
        yield worker.address
    finally:
        stop_processes([worker])


@pytest.fixture(scope="session")
def channel(worker_address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(worker_address) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> worker_pb2_grpc.WorkerServiceStub:
    return worker_pb2_grpc.WorkerServiceStub(channel)


@pytest.fixture(scope="session")
def info(stub: worker_pb2_grpc.WorkerServiceStub) -> worker_pb2.GetInfoResponse:
    """GetInfo as the worker answers it at the start of the run (limits do not change)."""
    return stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=RPC_TIMEOUT_S)


@pytest.fixture
def open_session(stub: worker_pb2_grpc.WorkerServiceStub) -> Iterator[OpenSession]:
    """Opens sessions with fresh caller-chosen ids; closes them all when the test ends.

    open_session("text prompt") or open_session(chat=[("user", "hi")]), optionally with
    answer_text=..., session_id=... (pass session_id="" to let the worker choose) and constraint=....
    """
    opened: list[str] = []

    def _open(
        text: str | None = None,
        *,
        chat: list[tuple[str, str]] | None = None,
        answer_text: str = "",
        session_id: str | None = None,
        constraint: worker_pb2.Constraint | None = None,
    ) -> worker_pb2.OpenSessionResponse:
        if chat is not None:
            messages = [worker_pb2.ChatMessage(role=r, content=c) for r, c in chat]
            prompt = worker_pb2.Prompt(chat=worker_pb2.ChatConversation(messages=messages))
        else:
            prompt = worker_pb2.Prompt(text=text)
        request = worker_pb2.OpenSessionRequest(
            session_id=new_session_id() if session_id is None else session_id,
            prompt=prompt,
            answer_text=answer_text,
            constraint=constraint,
        )
        response = stub.OpenSession(request, timeout=RPC_TIMEOUT_S)
        opened.append(response.session_id)
        return response

    yield _open
    for session_id in opened:
        try:
            stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=session_id), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError:
            pass  # cleanup only; the test's own assertions already ran
