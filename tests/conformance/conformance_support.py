"""Names shared by the conformance fixtures and tests (kept apart from conftest.py, which pytest
imports under a module name shared with tests/conftest.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from coolfusion.v1 import worker_pb2

# Every call carries a deadline, as every gRPC client should; generous, since a real model on CPU is slow.
RPC_TIMEOUT_S = 60.0

# open_session(text) / open_session(chat=[(role, content), ...]), optionally answer_text=...,
# session_id=... (see the `open_session` fixture).
OpenSession = Callable[..., worker_pb2.OpenSessionResponse]


def new_session_id(prefix: str = "conf") -> str:
    """A caller-chosen session id no other test (or other run) uses."""
    return f"{prefix}-{uuid.uuid4().hex}"
