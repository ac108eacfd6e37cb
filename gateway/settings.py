"""The gateway's settings, built once in __main__ from flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from coolfusion.serving.security import TokenFile
from coolfusion.serving.tracing import TracingSettings


@dataclass(frozen=True)
class HttpsFiles:
    """The PEM files uvicorn serves HTTPS with; a client CA turns on mutual TLS."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


@dataclass(frozen=True)
class OrchestratorTarget:
    """How the gateway reaches the orchestrator: its gRPC target, TLS and bearer token."""

    address: str = "127.0.0.1:50050"
    root_certificates: bytes | None = None  # PEM; set: TLS
    client_certificate: tuple[bytes, bytes] | None = field(default=None, repr=False)  # (chain, key) PEM
    token: TokenFile | None = None  # its first token is sent, read again when the file changes


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway process needs."""

    orchestrator: OrchestratorTarget = field(default_factory=OrchestratorTarget)
    host: str = "127.0.0.1"
    port: int = 8000  # the port vLLM and most OpenAI-compatible servers default to
    # The fusion of all registered workers; each worker is also served under its own name.
    model_name: str = "coolfusion"
    # Well above the orchestrator's largest prompt (65,536 characters, up to 6 JSON bytes each).
    max_body_bytes: int = 1 << 20
    # A fusion's deadline, like the orchestrator's own --request-timeout-s.
    request_timeout_s: float = 900.0
    # How long a ListWorkers answer is trusted when a request names a worker as its model.
    models_ttl_s: float = 5.0
    # /health/ready asks the orchestrator's health service with this timeout.
    ready_timeout_s: float = 2.0
    grace_s: float = 20.0  # on SIGTERM: how long answers in flight may take to finish
    log_json: bool | None = None
    # Prometheus endpoint on `host` (0: any free port); None serves none, as for the other servers.
    metrics_port: int | None = None
    https: HttpsFiles | None = None  # None: plain HTTP, for loopback or a mesh that encrypts
    tracing: TracingSettings = field(default_factory=TracingSettings)  # from the OTEL_* variables; off by default
    # Tokens callers must send as `Authorization: Bearer`, re-read when their file changes; None: no authentication.
    auth_tokens: TokenFile | None = field(default=None, repr=False)
