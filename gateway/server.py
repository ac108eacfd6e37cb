"""Runs the gateway: uvicorn serving the ASGI app, the Prometheus endpoint, and a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import ssl
from collections.abc import Iterator

import uvicorn
from prometheus_client import CollectorRegistry

from coolfusion.client import AsyncFusionClient
from coolfusion.gateway.app import build_app
from coolfusion.gateway.metrics import GatewayMetrics
from coolfusion.gateway.settings import GatewaySettings
from coolfusion.serving.metrics import start_metrics_endpoint
from coolfusion.serving.tracing import start_tracing

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, taking SIGTERM and SIGINT through the event loop like the gRPC servers:
    the first starts the drain, and neither is raised again once the drain is over."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


def uvicorn_config(settings: GatewaySettings, app: object) -> uvicorn.Config:
    """Plain HTTP or HTTPS on host:port; logging is left to coolfusion (JSON lines, request ids)."""
    https = settings.https
    return uvicorn.Config(
        app,  # type: ignore[arg-type]  # an ASGI callable; uvicorn's alias is narrower than Starlette's
        host=settings.host.strip("[]"),
        port=settings.port,
        log_config=None,
        access_log=False,  # RequestScope logs each request with its id instead
        lifespan="off",
        server_header=False,
        timeout_graceful_shutdown=math.ceil(settings.grace_s),
        ssl_certfile=https.cert_file if https else None,
        ssl_keyfile=https.key_file if https else None,
        ssl_ca_certs=https.client_ca_file if https else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if https and https.client_ca_file else ssl.CERT_NONE,
    )


async def serve(settings: GatewaySettings) -> None:
    """The gateway process: serve until SIGTERM, then let answers in flight finish for grace_s."""
    metrics = GatewayMetrics(CollectorRegistry())
    endpoint = None
    if settings.metrics_port is not None:
        endpoint = start_metrics_endpoint(metrics.registry, settings.host, settings.metrics_port)
    target = settings.orchestrator
    token = target.token
    client = AsyncFusionClient(
        target.address, timeout_s=settings.request_timeout_s, root_certificates=target.root_certificates,
        token=(lambda: token.tokens()[0]) if token is not None else None, client_certificate=target.client_certificate,
    )  # fmt: skip
    tracing = start_tracing(settings.tracing, "coolfusion-gateway")
    try:
        server = _Server(uvicorn_config(settings, build_app(settings, client, metrics, tracing.tracer)))
        running = asyncio.create_task(server.serve())
        while not server.started and not running.done():
            await asyncio.sleep(0.05)
        if server.started:
            _log_ready(settings, server.servers[0].sockets[0].getsockname()[1])
        await running
    finally:
        await client.close()
        await tracing.shutdown()  # exports the spans still buffered
        if endpoint is not None:
            await endpoint.stop()


def _log_ready(settings: GatewaySettings, port: int) -> None:
    host = settings.host.strip("[]")
    url = f"{'https' if settings.https else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"
    # `coolfusion up` reads the port from this line, as it does for the other servers.
    logger.info("gateway ready on %s", url)
    logger.info(
        "OpenAI-compatible API at %s/v1, fusing through the orchestrator at %s", url, settings.orchestrator.address
    )
