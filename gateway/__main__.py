"""`coolfusion-gateway`: the OpenAI-compatible HTTP API in front of an orchestrator."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from coolfusion.gateway.server import serve
from coolfusion.gateway.settings import GatewaySettings, HttpsFiles, OrchestratorTarget
from coolfusion.serving.lifecycle import exit_with_parent
from coolfusion.serving.logs import configure_logging
from coolfusion.serving.security import TokenFile, add_security_flags, security_from_args
from coolfusion.serving.tracing import tracing_from_environment

DEFAULT_ORCHESTRATOR = "127.0.0.1:50050"


def parse_settings(argv: list[str] | None = None) -> GatewaySettings:
    defaults = GatewaySettings()
    parser = argparse.ArgumentParser(prog="coolfusion-gateway", description=__doc__)
    parser.add_argument(
        "--orchestrator",
        metavar="ADDR",
        help=f"gRPC target (default: $COOLFUSION_ORCHESTRATOR or {DEFAULT_ORCHESTRATOR})",
    )
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port")
    parser.add_argument("--model-name", default=defaults.model_name, help="the fusion's model name")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="larger bodies get 413")
    parser.add_argument("--request-timeout-s", type=float, default=defaults.request_timeout_s, help="one fusion")
    parser.add_argument("--models-ttl-s", type=float, default=defaults.models_ttl_s, help="ListWorkers cache")
    parser.add_argument("--grace-s", type=float, default=defaults.grace_s, help="drain time on SIGTERM")
    parser.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics on --host (0 picks a port); default: off")
    add_security_flags(parser)
    client = parser.add_argument_group("reaching the orchestrator (default: plaintext, no token)")
    client.add_argument("--orchestrator-ca", type=Path, help="PEM CA bundle: call the orchestrator over TLS")
    client.add_argument("--orchestrator-cert", type=Path, help="PEM client certificate chain, for mutual TLS")
    client.add_argument("--orchestrator-key", type=Path, help="PEM private key of --orchestrator-cert")
    client.add_argument(
        "--orchestrator-token-file",
        type=Path,
        help="bearer token to send to the orchestrator (its first line), re-read when it changes",
    )
    args = parser.parse_args(argv)
    tls, auth_tokens = security_from_args(parser, args)  # validates the files; uvicorn reads them by path
    try:
        tracing = tracing_from_environment(os.environ)
    except ValueError as error:
        parser.error(str(error))
    try:
        orchestrator = _orchestrator_target(args)
    except ValueError as error:
        parser.error(str(error))
    return GatewaySettings(
        orchestrator=orchestrator,
        host=args.host,
        port=args.port,
        model_name=args.model_name,
        max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout_s,
        models_ttl_s=args.models_ttl_s,
        grace_s=args.grace_s,
        log_json=args.log_json,
        metrics_port=args.metrics_port,
        https=HttpsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if tls else None,
        auth_tokens=auth_tokens,
        tracing=tracing,
    )


def _orchestrator_target(args: argparse.Namespace) -> OrchestratorTarget:
    """The orchestrator's address and the gateway's credentials for it; files are read once, here."""
    if bool(args.orchestrator_cert) != bool(args.orchestrator_key):
        raise ValueError("--orchestrator-cert and --orchestrator-key go together")
    certificate = None
    if args.orchestrator_cert:
        certificate = (
            _read(args.orchestrator_cert, "--orchestrator-cert"),
            _read(args.orchestrator_key, "--orchestrator-key"),
        )
    token = (
        TokenFile(args.orchestrator_token_file, "--orchestrator-token-file") if args.orchestrator_token_file else None
    )
    return OrchestratorTarget(
        address=args.orchestrator or os.environ.get("COOLFUSION_ORCHESTRATOR") or DEFAULT_ORCHESTRATOR,
        root_certificates=_read(args.orchestrator_ca, "--orchestrator-ca") if args.orchestrator_ca else None,
        client_certificate=certificate,
        token=token,
    )


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None


def main(argv: list[str] | None = None) -> None:
    exit_with_parent()
    settings = parse_settings(argv)
    configure_logging(settings.log_json)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
