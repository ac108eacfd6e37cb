"""Server-side TLS (optionally mutual) and bearer-token authentication, the same for every coolfusion server."""

from __future__ import annotations

import argparse
import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)

# Probes (kubelet, load balancers) and tooling (grpcurl) call these without credentials, and they
# reveal nothing a caller could abuse: health status and the public .proto schema.
_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_MISSING = "missing bearer token: send 'authorization: Bearer <token>' metadata"
_INVALID = "invalid bearer token"
_HANDLER_KINDS = {  # (request_streaming, response_streaming) -> handler builder
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


@dataclass(frozen=True)
class TlsServerSettings:
    """The server's certificate chain and key (PEM); a client CA turns on mutual TLS."""

    certificate_chain: bytes
    private_key: bytes = field(repr=False)  # never printed with the settings
    client_ca: bytes | None = None  # when set, clients must present a certificate it signed

    @classmethod
    def from_files(cls, cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> TlsServerSettings:
        """Reads the PEM files once; ValueError names the file that is missing or not PEM."""
        return cls(
            certificate_chain=_read_pem(cert_file, "--tls-cert"),
            private_key=_read_pem(key_file, "--tls-key"),
            client_ca=_read_pem(client_ca_file, "--tls-client-ca") if client_ca_file else None,
        )

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.mutual,
        )


def _read_pem(path: Path, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None
    # gRPC reports a malformed PEM file only as an opaque failure to bind the port.
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag} {path}: not a PEM file")
    return data


def read_tokens(path: Path, flag: str = "--auth-token-file") -> tuple[str, ...]:
    """The tokens in a file, one per line (several during a rotation); blank lines are ignored."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{flag} {path}: cannot read it ({error})") from None
    tokens = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not tokens:
        raise ValueError(f"{flag} {path}: holds no token")
    if any(" " in t or "\t" in t for t in tokens):
        raise ValueError(f"{flag} {path}: a token contains whitespace")
    return tokens


class TokenFile:
    """Bearer tokens read from a file, one per line, and read again whenever the file changes
    (another inode, size or modification time), so that rotating a token needs no restart. A
    change that leaves the file unreadable or without a token keeps the tokens read before, and
    is logged: a broken rotation never lets every caller in, nor locks every caller out. Neither
    the tokens nor their count appear in its repr or in logs."""

    def __init__(self, path: Path, flag: str = "--auth-token-file"):
        """Reads the file now; ValueError names what is wrong with it (a usage error at start-up)."""
        self.path = Path(path)
        self._flag = flag
        self._seen = _signature(self.path)  # taken first: a change made while reading is seen next time
        self._tokens = read_tokens(self.path, flag)

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r})"

    def tokens(self) -> tuple[str, ...]:
        """The file's tokens now; one stat per call, a read only after a change."""
        signature = _signature(self.path)
        if signature != self._seen:
            self._seen = signature
            try:
                self._tokens = read_tokens(self.path, self._flag)
            except ValueError as error:
                logger.error("%s; the tokens read before stay in use", error)
            else:
                logger.info("%s %s changed: re-read", self._flag, self.path)
        return self._tokens


def _signature(path: Path) -> tuple[int, ...] | None:
    try:
        stat = os.stat(path)  # follows links: a Kubernetes Secret volume swaps a symlink to rotate
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def accepts(token_file: TokenFile, presented: bytes) -> bool:
    """Whether `presented` is one of the file's tokens; every token is compared (no early exit),
    so timing does not reveal which one came close."""
    matches = [hmac.compare_digest(presented, token.encode()) for token in token_file.tokens()]
    return any(matches)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` naming an accepted token (UNAUTHENTICATED).

    Health and reflection stay open. Neither the presented nor an accepted token ever appears in a
    status message or a log line.
    """

    def __init__(self, tokens: TokenFile):
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_EXEMPT_PREFIXES):
            return handler
        problem = self._problem(handler_call_details.invocation_metadata or ())
        if problem is None:
            return handler
        logger.warning("refused %s: %s", method, problem)
        return _refusal(handler, problem)

    def _problem(self, metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
        """Why the call is refused, or None when it carries an accepted token."""
        values = [v for k, v in metadata if k == "authorization"]
        if len(values) != 1 or not isinstance(values[0], str):
            return _MISSING
        scheme, _, presented = values[0].partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return _MISSING
        return None if accepts(self._tokens, presented.strip().encode()) else _INVALID


def _refusal(handler: grpc.RpcMethodHandler, problem: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only aborts, so the service's code never runs."""

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    build = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    return build(
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def security_interceptors(tokens: TokenFile | None) -> list[grpc.aio.ServerInterceptor]:
    """The token check when a token file is configured; none (plaintext, open) by default."""
    return [BearerTokenInterceptor(tokens)] if tokens is not None else []


def bind(server: grpc.aio.Server, address: str, tls: TlsServerSettings | None) -> int:
    """Adds the listening port, with TLS when configured; returns the port (0 in `address` picks one)."""
    if tls is None:
        return server.add_insecure_port(address)
    port = server.add_secure_port(address, tls.credentials())
    logger.info("TLS on port %d (%s)", port, "client certificates required" if tls.mutual else "server only")
    return port


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    """--tls-cert/--tls-key/--tls-client-ca and --auth-token-file, the same on every server."""
    group = parser.add_argument_group("security (default: plaintext, no authentication)")
    group.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS")
    group.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    group.add_argument("--tls-client-ca", type=Path, help="PEM CA bundle: require client certificates it signed")
    group.add_argument(
        "--auth-token-file",
        type=Path,
        help="accepted bearer tokens, one per line, re-read when the file changes; needed by all RPCs but health, reflection",
    )


def security_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[TlsServerSettings | None, TokenFile | None]:
    """Reads the TLS files and the tokens; a bad flag or file ends start-up with a usage error."""
    try:
        tls = _tls_from_args(args)
        tokens = TokenFile(args.auth_token_file) if args.auth_token_file else None
    except ValueError as error:
        parser.error(str(error))
    return tls, tokens


def _tls_from_args(args: argparse.Namespace) -> TlsServerSettings | None:
    if not args.tls_cert and not args.tls_key:
        if args.tls_client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    return TlsServerSettings.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)
