"""Health, reflection and graceful shutdown, the same for every coolfusion server."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

logger = logging.getLogger(__name__)

# Set by client.cluster.launch to the launcher's pid: the server then exits along with it.
PARENT_PID_VARIABLE = "COOLFUSION_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def exit_with_parent() -> None:
    """Asks Linux to send SIGTERM when the launching process dies, so that a killed `coolfusion up`
    or test run never leaves model servers behind. A no-op unless launched by a local cluster."""
    expected = os.environ.get(PARENT_PID_VARIABLE)
    if not expected or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(expected):  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def add_health_and_reflection(server: grpc.aio.Server, service_names: list[str]) -> health.aio.HealthServicer:
    """Registers grpc.health.v1 (NOT_SERVING until the caller says otherwise) and reflection."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: list[str], serving: bool) -> None:
    """Marks the whole server and each named service SERVING or NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so that `main` can drain instead of dying mid-request."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def drain(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    service_names: list[str],
    grace_s: float,
) -> None:
    """Stops taking traffic (health NOT_SERVING first, so load balancers move away), then stops."""
    logger.info("draining for up to %.0f s", grace_s)
    await set_serving(health_servicer, service_names, serving=False)
    await server.stop(grace_s)
    logger.info("stopped")
