"""Local cluster processes never outlive the process that launched them."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

LAUNCH_AND_DIE = """
import os, sys
from coolfusion.cli.cluster import launch, wait_ready, worker_argv
worker = wait_ready(launch("w", worker_argv(["--model", sys.argv[1]])), 120)
print(worker.process.pid, flush=True)
os._exit(0)  # no cleanup at all, as if the launcher were killed
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux-only")
def test_a_worker_exits_when_its_launcher_dies_without_cleaning_up(tiny_model_dirs):
    launcher = subprocess.run(
        [sys.executable, "-c", LAUNCH_AND_DIE, str(tiny_model_dirs["bpe"])],
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    pid = int(launcher.stdout.split()[-1])
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid), f"worker {pid} outlived its launcher"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent (init here) has yet to reap it.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"
