"""Bearer-token interceptor and security flags: who gets in, what errors and logs reveal."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coolfusion.orchestrator.__main__ import parse_settings as orchestrator_settings
from coolfusion.serving.lifecycle import add_health_and_reflection, set_serving
from coolfusion.serving.security import TlsServerSettings, TokenFile, read_tokens, security_interceptors
from coolfusion.worker.__main__ import parse_settings as worker_settings

OLD, NEW = "old-secret-token-4c1e", "new-secret-token-9b7a"  # two accepted tokens, as mid-rotation
WRONG = "wrong-secret-token-77d0"
SAY, COUNT = "/test.Echo/Say", "/test.Echo/Count"
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def echo_service(calls: list[str]) -> grpc.GenericRpcHandler:
    """A unary and a server-streaming method that record that they ran."""

    async def say(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        calls.append("say")
        return request

    async def count(request: bytes, context: grpc.aio.ServicerContext):
        calls.append("count")
        for i in range(3):
            yield bytes([i])

    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {"Say": grpc.unary_unary_rpc_method_handler(say), "Count": grpc.unary_stream_rpc_method_handler(count)},
    )


async def call_all(metadata: tuple[tuple[str, str], ...] | None) -> dict[str, object]:
    """Starts a server that accepts OLD and NEW and calls each method once; results or status codes."""
    calls: list[str] = []
    folder = tempfile.TemporaryDirectory()
    tokens = TokenFile(write(Path(folder.name) / "tokens", f"{OLD}\n{NEW}\n"))
    server = grpc.aio.server(interceptors=security_interceptors(tokens))
    server.add_generic_rpc_handlers([echo_service(calls)])
    health = add_health_and_reflection(server, ["test.Echo"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await set_serving(health, ["test.Echo"], serving=True)
    outcome: dict[str, object] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                outcome["say"] = await channel.unary_unary(SAY)(b"hi", metadata=metadata, timeout=5)
            except grpc.aio.AioRpcError as error:
                outcome["say"] = (error.code(), error.details())
            try:
                outcome["count"] = [r async for r in channel.unary_stream(COUNT)(b"", metadata=metadata, timeout=5)]
            except grpc.aio.AioRpcError as error:
                outcome["count"] = (error.code(), error.details())
            check = health_pb2_grpc.HealthStub(channel).Check
            outcome["health"] = (await check(health_pb2.HealthCheckRequest(), timeout=5)).status
    finally:
        await server.stop(None)
        folder.cleanup()
    outcome["ran"] = calls
    return outcome


@pytest.mark.parametrize("token", [OLD, NEW])
def test_either_accepted_token_gets_in(token):
    outcome = asyncio.run(call_all((("authorization", f"Bearer {token}"),)))
    assert outcome["say"] == b"hi"
    assert outcome["count"] == [b"\x00", b"\x01", b"\x02"]


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (("authorization", f"Bearer {WRONG}"),),
        (("authorization", f"Basic {OLD}"),),
        (("authorization", "Bearer "),),
    ],
    ids=["missing", "wrong", "other-scheme", "empty"],
)
def test_calls_without_an_accepted_token_are_refused_before_the_handler_runs(metadata, caplog):
    caplog.set_level(logging.DEBUG)
    outcome = asyncio.run(call_all(metadata))
    for method in ("say", "count"):
        code, details = outcome[method]
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert not any(secret in details for secret in (OLD, NEW, WRONG))
    assert outcome["ran"] == []
    assert "refused /test.Echo/Say" in caplog.text  # refusals are logged ...
    assert not any(secret in caplog.text for secret in (OLD, NEW, WRONG))  # ... without any token


def test_health_needs_no_token():
    outcome = asyncio.run(call_all(None))
    assert outcome["health"] == health_pb2.HealthCheckResponse.SERVING


def test_no_tokens_means_no_authentication():
    assert security_interceptors(None) == []


def test_token_file_takes_one_token_per_line(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{OLD}\n\n  {NEW}  \n")
    assert read_tokens(path) == (OLD, NEW)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def rotate(path: Path, text: str) -> None:
    """A new file renamed over the old one, as a Kubernetes Secret volume updates."""
    os.replace(write(path.with_name("rotating"), text), path)


def test_a_token_file_is_read_again_when_it_changes(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = write(tmp_path / "tokens", f"{OLD}\n")
    tokens = TokenFile(path)
    assert tokens.tokens() == (OLD,)
    rotate(path, f"{OLD}\n{NEW}\n")
    assert tokens.tokens() == (OLD, NEW)
    rotate(path, f"{NEW}\n")
    assert tokens.tokens() == (NEW,)
    path.write_text(f"{WRONG}\n")  # rewritten in place: size or modification time tells
    assert tokens.tokens() == (WRONG,)
    assert "re-read" in caplog.text and not any(t in caplog.text for t in (OLD, NEW, WRONG))
    assert OLD not in repr(tokens) and str(path) in repr(tokens)


@pytest.mark.parametrize("broken", ["", "a token with spaces\n", None], ids=["empty", "whitespace", "deleted"])
def test_a_broken_rotation_keeps_the_tokens_read_before(tmp_path, caplog, broken):
    path = write(tmp_path / "tokens", f"{OLD}\n{NEW}\n")
    tokens = TokenFile(path)
    if broken is None:
        path.unlink()
    else:
        rotate(path, broken)
    assert tokens.tokens() == (OLD, NEW)  # never every caller in, nor every caller out
    assert "the tokens read before stay in use" in caplog.text
    rotate(path, f"{NEW}\n")
    assert tokens.tokens() == (NEW,)


def registry(tmp_path: Path) -> list[str]:
    return ["--workers", str(write(tmp_path / "workers.yaml", "workers: [{name: a, address: 'localhost:1'}]\n"))]


def test_defaults_are_plaintext_without_authentication(tmp_path):
    settings = orchestrator_settings(registry(tmp_path))
    assert settings.tls is None and settings.auth_tokens is None
    settings = worker_settings(["--model", "m"])
    assert settings.tls is None and settings.auth_tokens is None


def test_flags_are_read_into_the_settings_without_revealing_secrets(tmp_path):
    key = "-----BEGIN PRIVATE KEY-----\nsecret-key-material\n-----END PRIVATE KEY-----\n"
    flags = [
        *("--tls-cert", str(write(tmp_path / "cert.pem", PEM))),
        *("--tls-key", str(write(tmp_path / "key.pem", key))),
        *("--tls-client-ca", str(write(tmp_path / "ca.pem", PEM))),
        *("--auth-token-file", str(write(tmp_path / "tokens", f"{OLD}\n{NEW}\n"))),
    ]
    for settings in (orchestrator_settings([*registry(tmp_path), *flags]), worker_settings(["--model", "m", *flags])):
        assert settings.tls == TlsServerSettings(PEM.encode(), key.encode(), PEM.encode())
        assert settings.tls.mutual
        assert settings.auth_tokens is not None and settings.auth_tokens.tokens() == (OLD, NEW)
        assert "secret-key-material" not in repr(settings) and OLD not in repr(settings)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tls-cert", "{missing}", "--tls-key", "{pem}"], "--tls-cert {missing}: cannot read it"),
        (["--tls-cert", "{pem}", "--tls-key", "{text}"], "--tls-key {text}: not a PEM file"),
        (["--tls-cert", "{pem}"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "{pem}"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--auth-token-file", "{missing}"], "--auth-token-file {missing}: cannot read it"),
        (["--auth-token-file", "{blank}"], "--auth-token-file {blank}: holds no token"),
    ],
    ids=["missing-cert", "key-not-pem", "cert-without-key", "ca-without-cert", "missing-tokens", "no-tokens"],
)
def test_bad_security_flags_end_start_up_with_a_usage_error(tmp_path, capsys, flags, message):
    files = {
        "missing": tmp_path / "absent.pem",
        "pem": write(tmp_path / "cert.pem", PEM),
        "text": write(tmp_path / "key.txt", "not a key"),
        "blank": write(tmp_path / "tokens", "\n \n"),
    }
    flags = [f.format(**files) for f in flags]
    for parse, argv in ((orchestrator_settings, registry(tmp_path)), (worker_settings, ["--model", "m"])):
        with pytest.raises(SystemExit) as exit_:
            parse([*argv, *flags])
        assert exit_.value.code == 2
        assert message.format(**files) in capsys.readouterr().err
