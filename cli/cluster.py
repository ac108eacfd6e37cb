"""A local cluster: worker, orchestrator and gateway processes on loopback, started and stopped together;
a server that dies meanwhile is started again, as a Deployment restarts its pod."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Self, TextIO

from coolfusion.serving.lifecycle import PARENT_PID_VARIABLE

# Every server logs "... ready ... on HOST:PORT" once it serves; the port may have been picked by the OS.
_READY = re.compile(r"ready\b.* on [^ ]+:(\d+)")
DEFAULT_PRESETS = ("smollm2-135m-instruct", "gemma3-270m")
# A server that dies is started again after RESTART_DELAY_S, on its port (the orchestrator knows its
# workers by address, the gateway its orchestrator); each restart of a server that died within
# RESTART_RESET_S of its last start waits twice as long, up to RESTART_MAX_DELAY_S (the shape of
# Kubernetes' crash-loop back-off, scaled to processes that start in seconds).
RESTART_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 60.0
RESTART_RESET_S = 60.0


class ClusterError(RuntimeError):
    """A process of the local cluster failed to start."""


@dataclass
class LocalProcess:
    """A started server process and the port it listens on."""

    name: str
    process: subprocess.Popen
    argv: list[str]  # what started it, to start it again
    env: dict | None = None
    port: int = 0
    log_lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    started_at: float = field(default_factory=time.monotonic)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def launch(name: str, argv: list[str], log: TextIO | None = None, env: dict | None = None) -> LocalProcess:
    """Starts `argv` and keeps draining its log into `log` (if any); see `wait_ready`."""
    # A session of its own: Ctrl-C on the terminal reaches `coolfusion up`, which then drains the
    # servers in order, instead of reaching every server at once. PARENT_PID_VARIABLE makes the
    # server exit if this process dies without stopping it (serving.lifecycle.exit_with_parent);
    # a preexec_fn could do that too, but is unsafe in a process with gRPC threads.
    environment = {**(os.environ if env is None else env), PARENT_PID_VARIABLE: str(os.getpid())}
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment, start_new_session=True
    )
    started = LocalProcess(name, process, argv, env)
    threading.Thread(target=_drain, args=(started, log), daemon=True).start()
    return started


def wait_ready(started: LocalProcess, timeout_s: float) -> LocalProcess:
    """Waits for the process's ready line; stops it and raises with its log tail if it fails."""
    deadline = time.monotonic() + timeout_s
    while not started.ready.wait(0.2):
        if started.process.poll() is not None or time.monotonic() > deadline:
            stop_processes([started])
            tail = "".join(started.log_lines[-15:])
            raise ClusterError(f"{started.name} did not become ready (exit code {started.process.returncode}):\n{tail}")
    return started


def _drain(started: LocalProcess, log: TextIO | None) -> None:
    assert started.process.stderr is not None  # launch() pipes it
    for line in started.process.stderr:
        started.log_lines.append(line)
        del started.log_lines[:-200]  # keep the tail for error messages only
        if log is not None:
            log.write(f"[{started.name}] {line}")
            log.flush()
        match = _READY.search(line)
        if match and not started.ready.is_set():
            started.port = int(match.group(1))
            started.ready.set()


def stop_processes(processes: list[LocalProcess], grace_s: float = 10.0) -> None:
    """SIGTERM (graceful drain), then SIGKILL whatever is still running after `grace_s`."""
    for p in processes:
        if p.process.poll() is None:
            p.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in processes:
        try:
            p.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.process.pid, signal.SIGKILL)
            p.process.wait()


def worker_argv(model_args: list[str], extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "coolfusion.worker", *model_args, "--host", "127.0.0.1", "--port", "0", *extra]


def orchestrator_argv(extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "coolfusion.orchestrator", "--host", "127.0.0.1", "--port", "0", *extra]


def orchestrator_env(workers: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with COOLFUSION_WORKERS naming `workers` (name -> address): how a
    local orchestrator learns its workers."""
    return {**os.environ, "COOLFUSION_WORKERS": ",".join(f"{name}={address}" for name, address in workers.items())}


def gateway_argv(orchestrator: str, port: int = 0, extra: Sequence[str] = ()) -> list[str]:
    host = ["--host", "127.0.0.1", "--port", str(port)]
    return [sys.executable, "-m", "coolfusion.gateway", *host, "--orchestrator", orchestrator, *extra]


@dataclass
class Backoff:
    """When a dead server is started again: after `delay_s`, doubled for a server that died soon after
    its last start, back to the first delay for one that had run RESTART_RESET_S."""

    delay_s: float = RESTART_DELAY_S
    restarts: int = 0
    due_at: float | None = None  # set while the server is dead and waits for its restart

    def schedule(self, started_at: float, now: float) -> float:
        """The server died at `now`: when it starts again."""
        if self.restarts and now - started_at < RESTART_RESET_S:
            self.delay_s = min(2 * self.delay_s, RESTART_MAX_DELAY_S)
        else:
            self.delay_s = RESTART_DELAY_S
        self.due_at = now + self.delay_s
        return self.delay_s

    def restarted(self) -> None:
        """The server was started again: nothing is due until it dies again."""
        self.due_at, self.restarts = None, self.restarts + 1


def exit_reason(code: int) -> str:
    """How a process ended, e.g. `killed by SIGKILL` or `exited with code 1`."""
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class LocalCluster:
    """Workers plus an orchestrator that knows them, and optionally the OpenAI-compatible gateway in
    front of it; a context manager that always cleans up."""

    def __init__(
        self,
        workers: dict[str, list[str]],
        log_path: Path | None = None,
        ready_timeout_s: float = 600.0,
        worker_flags: tuple[str, ...] = (),
        gateway_port: int | None = None,
        orchestrator_flags: tuple[str, ...] = (),
    ):
        self._workers_spec = workers  # name -> worker model arguments, e.g. ["--preset", "gemma3-270m"]
        self._worker_flags = worker_flags  # given to every worker, e.g. ("--no-cache",)
        self._orchestrator_flags = orchestrator_flags  # e.g. ("--calibration", FILE)
        self._log = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed in stop()
        self._ready_timeout_s = ready_timeout_s
        self._gateway_port = gateway_port  # None: no gateway; 0: any free port
        self.workers: dict[str, LocalProcess] = {}
        self.orchestrator: LocalProcess | None = None
        self.gateway: LocalProcess | None = None
        self._backoff: dict[str, Backoff] = {}  # by server name, once it died
        self._returning: dict[str, float] = {}  # restarted servers not ready yet: when each died

    def start(self) -> Self:
        try:
            # Workers load their models in parallel; the orchestrator starts once they all serve.
            threads = ["--threads", str(max(1, (os.cpu_count() or 1) // len(self._workers_spec)))]
            for name, model_args in self._workers_spec.items():
                self.workers[name] = launch(name, worker_argv(model_args, [*threads, *self._worker_flags]), self._log)
            for worker in self.workers.values():
                wait_ready(worker, self._ready_timeout_s)
            env = orchestrator_env({name: worker.address for name, worker in self.workers.items()})
            argv = orchestrator_argv(self._orchestrator_flags)
            self.orchestrator = wait_ready(launch("orchestrator", argv, self._log, env), 60)
            if self._gateway_port is not None:
                argv = gateway_argv(self.orchestrator.address, self._gateway_port)
                self.gateway = wait_ready(launch("gateway", argv, self._log), 60)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def address(self) -> str:
        assert self.orchestrator is not None, "cluster not started"
        return self.orchestrator.address

    @property
    def gateway_url(self) -> str:
        """The OpenAI-compatible API's base URL, as OpenAI clients take it."""
        assert self.gateway is not None, "cluster started without a gateway"
        return f"http://{self.gateway.address}/v1"

    @property
    def processes(self) -> list[LocalProcess]:
        """Every process started, workers first."""
        servers = [self.orchestrator, self.gateway]
        return [*self.workers.values(), *(p for p in servers if p is not None)]

    def supervise(self, out: TextIO, poll_s: float = 0.5) -> NoReturn:
        """Keeps the cluster up until interrupted (KeyboardInterrupt: Ctrl-C, or SIGTERM through
        `signals_interrupt`): a server that dies is started again after its back-off, on the port it
        had, and `out` and the server log say what happened."""
        while True:
            self.heal(out)
            time.sleep(poll_s)

    def heal(self, out: TextIO) -> None:
        """One round of supervision: notices deaths, starts what is due, reports what came back."""
        now = time.monotonic()
        for server in self.processes:
            if server.process.poll() is None:
                if server.name in self._returning and server.ready.is_set():
                    died_at = self._returning.pop(server.name)
                    self._say(out, f"{server.name} is back on {server.address}, {now - died_at:.0f} s after it died")
                continue
            backoff = self._backoff.setdefault(server.name, Backoff())
            if backoff.due_at is None:
                delay = backoff.schedule(server.started_at, now)
                reason = exit_reason(server.process.returncode)
                self._say(out, f"{server.name} {reason}; starting it again in {delay:.0f} s on port {server.port}")
                self._returning.setdefault(server.name, now)
            elif now >= backoff.due_at:
                backoff.restarted()
                self._restart(server)

    def _restart(self, dead: LocalProcess) -> None:
        """A new process for a dead server, with its arguments and its port (argparse keeps the
        last --port given)."""
        started = launch(dead.name, [*dead.argv, "--port", str(dead.port)], self._log, dead.env)
        started.port = dead.port  # its address until its ready line says so again
        if self.workers.get(dead.name) is dead:
            self.workers[dead.name] = started
        elif self.orchestrator is dead:
            self.orchestrator = started
        else:
            self.gateway = started

    def _say(self, out: TextIO, message: str) -> None:
        print(f"coolfusion: {message}", file=out, flush=True)
        if self._log:
            self._log.write(f"[cluster] {message}\n")
            self._log.flush()

    def stop(self) -> None:
        stop_processes(self.processes)
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
