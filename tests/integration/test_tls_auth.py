"""TLS, mutual TLS and bearer tokens end to end: client -> (gateway ->) orchestrator -> worker processes.

Certificates are made at test time: one CA signs the orchestrator's certificate (localhost,
127.0.0.1), the worker's (only a Service name, so dialling it by IP needs the registry's
`server_name`) and the orchestrator's client certificate for the worker's mutual TLS.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

import grpc
import openai
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coolfusion.cli.cluster import gateway_argv, launch, orchestrator_argv, stop_processes, wait_ready, worker_argv
from coolfusion.client import CoolfusionError, FuseOptions, FusionClient, UnavailableError
from coolfusion.v1.orchestrator_pb2 import FuseResult

WORKER_SERVICE_NAME = "bpe.workers.svc.cluster.local"  # as in a cluster: pods are dialled by IP
CALLER_TOKEN = "caller-token-5f2d91"
WORKER_TOKENS = ("worker-token-old-a81c", "worker-token-new-3e07")  # mid-rotation: both accepted
IMPOSTOR_TOKEN = "impostor-token-c4d2"
SECRETS = (CALLER_TOKEN, *WORKER_TOKENS, IMPOSTOR_TOKEN)
PROMPT = "Tom has 3 apples and buys 4 more."


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    sans: list[x509.GeneralName] = (),
    usage: x509.ObjectIdentifier | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for `subject`, signed by `ca` (self-signed CA when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_cert, issuer_key = ca or (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write_pair(folder: Path, stem: str, pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert, key = pair
    (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (folder / f"{stem}.key").write_bytes(key_pem)


def make_certificates(folder: Path) -> Path:
    ca = _issue("coolfusion test CA", None)
    _write_pair(folder, "ca", ca)
    local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    _write_pair(folder, "orchestrator", _issue("orchestrator", ca, sans=local, usage=ExtendedKeyUsageOID.SERVER_AUTH))
    worker_sans = [x509.DNSName(WORKER_SERVICE_NAME)]
    _write_pair(folder, "worker", _issue("worker", ca, sans=worker_sans, usage=ExtendedKeyUsageOID.SERVER_AUTH))
    _write_pair(folder, "client", _issue("orchestrator-client", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH))
    return folder


@pytest.fixture(scope="module")
def secured(tiny_model_dirs, tmp_path_factory):
    """A worker (TLS, client certificates required, tokens) behind an orchestrator (TLS, token)."""
    folder = tmp_path_factory.mktemp("tls")
    certs = make_certificates(folder)
    (folder / "worker-tokens").write_text("\n".join(WORKER_TOKENS) + "\n")
    (folder / "new-token").write_text(WORKER_TOKENS[1] + "\n")
    (folder / "impostor-token").write_text(IMPOSTOR_TOKEN + "\n")
    (folder / "caller-tokens").write_text(CALLER_TOKEN + "\n")
    tls = [*("--tls-cert", str(certs / "worker.crt")), *("--tls-key", str(certs / "worker.key"))]
    worker_flags = [*tls, "--tls-client-ca", str(certs / "ca.crt"), "--auth-token-file", str(folder / "worker-tokens")]
    log = open(folder / "cluster.log", "a")  # noqa: SIM115 - closed below
    worker_args = worker_argv(["--model", str(tiny_model_dirs["bpe"])], ["--threads", "1", *worker_flags])
    worker = launch("worker", worker_args, log)
    processes = [worker]
    try:
        wait_ready(worker, 60)
        client_tls = {
            "ca_file": str(certs / "ca.crt"),
            "cert_file": str(certs / "client.crt"),
            "key_file": str(certs / "client.key"),
            "server_name": WORKER_SERVICE_NAME,
        }
        entries = [
            # A replica list dialled by IP: the certificate names the Service, hence server_name.
            {"name": "bpe", "address": worker.address, "replicas": "static", "tls": client_tls,
             "token_file": str(folder / "new-token")},
            {"name": "impostor", "address": worker.address, "tls": client_tls,
             "token_file": str(folder / "impostor-token")},
        ]  # fmt: skip
        (folder / "workers.yaml").write_text(yaml.safe_dump({"workers": entries}))
        orchestrator_flags = [
            *("--workers", str(folder / "workers.yaml")),
            *("--tls-cert", str(certs / "orchestrator.crt"), "--tls-key", str(certs / "orchestrator.key")),
            *("--auth-token-file", str(folder / "caller-tokens")),
        ]
        orchestrator = launch("orchestrator", orchestrator_argv(orchestrator_flags), log)
        processes.append(orchestrator)
        wait_ready(orchestrator, 30)
        yield {"worker": worker, "orchestrator": orchestrator, "certs": certs}
    finally:
        stop_processes(processes)
        log.close()


def client(secured, **options) -> FusionClient:
    return FusionClient(secured["orchestrator"].address, timeout_s=30, **options)


def ca(secured) -> bytes:
    return (secured["certs"] / "ca.crt").read_bytes()


def test_fuse_over_tls_with_tokens_at_both_hops(secured):
    with client(secured, root_certificates=ca(secured), token=CALLER_TOKEN) as c:
        result = c.fuse(PROMPT, FuseOptions(workers=("bpe",), max_new_tokens=8))
    assert result.text and not result.dropped


def test_orchestrator_refuses_a_missing_or_wrong_token(secured):
    for token in (None, IMPOSTOR_TOKEN):
        with client(secured, root_certificates=ca(secured), token=token) as c, pytest.raises(CoolfusionError) as error:
            c.fuse(PROMPT, FuseOptions(workers=("bpe",), max_new_tokens=8))
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert not any(secret in error.value.details for secret in SECRETS)


def test_health_needs_tls_but_no_token(secured):
    credentials = grpc.ssl_channel_credentials(ca(secured))
    with grpc.secure_channel(secured["orchestrator"].address, credentials) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_cannot_reach_a_tls_orchestrator(secured):
    with client(secured, token=CALLER_TOKEN) as c, pytest.raises(UnavailableError):
        c.list_workers(timeout_s=10)


def worker_health(secured, with_client_certificate: bool) -> int:
    certs = secured["certs"]
    pair = {
        "private_key": (certs / "client.key").read_bytes(),
        "certificate_chain": (certs / "client.crt").read_bytes(),
    }
    credentials = grpc.ssl_channel_credentials(ca(secured), **(pair if with_client_certificate else {}))
    options = [("grpc.ssl_target_name_override", WORKER_SERVICE_NAME)]
    with grpc.secure_channel(secured["worker"].address, credentials, options=options) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_worker_requires_a_client_certificate(secured):
    assert worker_health(secured, with_client_certificate=True) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as error:
        worker_health(secured, with_client_certificate=False)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no call is made


def test_a_worker_refusing_the_registry_token_is_dropped(secured):
    with client(secured, root_certificates=ca(secured), token=CALLER_TOKEN) as c:
        result = c.fuse(PROMPT, FuseOptions(workers=("bpe", "impostor"), max_new_tokens=8))
        assert result.text
        assert [d.worker for d in result.dropped] == ["impostor"]
        assert "UNAUTHENTICATED" in result.dropped[0].reason
        with pytest.raises(UnavailableError) as error:
            c.fuse(PROMPT, FuseOptions(workers=("impostor",), max_new_tokens=8))
    assert "UNAUTHENTICATED" in error.value.details
    assert not any(secret in error.value.details for secret in SECRETS)


def test_no_token_is_ever_logged(secured):
    logs = "".join(secured["worker"].log_lines + secured["orchestrator"].log_lines)
    assert "refused /coolfusion.v1.WorkerService/" in logs  # the impostor's calls were logged ...
    assert not any(secret in logs for secret in SECRETS)  # ... without a token


# ---- the OpenAI-compatible gateway in front of the secured orchestrator --------------------------

GATEWAY_TOKEN = "gateway-caller-token-77b1"  # what HTTP callers present to the gateway


@pytest.fixture(scope="module")
def gateways(secured):
    """An HTTPS gateway requiring client certificates and tokens, calling the orchestrator over TLS
    with its token; and a plain one whose orchestrator token is refused."""
    certs, folder = secured["certs"], secured["certs"]
    (folder / "gateway-tokens").write_text(GATEWAY_TOKEN + "\n")
    https = [
        *("--tls-cert", str(certs / "orchestrator.crt"), "--tls-key", str(certs / "orchestrator.key")),
        *("--tls-client-ca", str(certs / "ca.crt"), "--auth-token-file", str(folder / "gateway-tokens")),
    ]
    to_orchestrator = ["--orchestrator-ca", str(certs / "ca.crt"), "--orchestrator-token-file"]
    address = secured["orchestrator"].address
    processes = [
        launch("gateway", gateway_argv(address, extra=[*https, *to_orchestrator, str(folder / "caller-tokens")])),
        launch("impostor-gateway", gateway_argv(address, extra=[*to_orchestrator, str(folder / "impostor-token")])),
    ]
    try:
        yield [wait_ready(p, 60) for p in processes]
    finally:
        stop_processes(processes)


def openai_client(url: str, secured, with_client_certificate: bool = True, token: str = GATEWAY_TOKEN) -> openai.OpenAI:
    context = ssl.create_default_context(cafile=str(secured["certs"] / "ca.crt"))
    if with_client_certificate:
        context.load_cert_chain(secured["certs"] / "client.crt", secured["certs"] / "client.key")
    http = openai.DefaultHttpxClient(verify=context, trust_env=False)
    return openai.OpenAI(base_url=url, api_key=token, max_retries=0, timeout=60, http_client=http)


def test_the_openai_sdk_over_mutual_tls_with_tokens_at_every_hop(secured, gateways):
    with openai_client(f"https://{gateways[0].address}/v1", secured) as sdk:
        assert [m.id for m in sdk.models.list().data] == ["coolfusion", "bpe", "impostor"]
        completion = sdk.completions.create(model="bpe", prompt=PROMPT, max_tokens=8)
    with client(secured, root_certificates=ca(secured), token=CALLER_TOKEN) as c:
        assert completion.choices[0].text == c.fuse(PROMPT, FuseOptions(workers=("bpe",), max_new_tokens=8)).text


def test_the_gateway_requires_a_client_certificate(secured, gateways):
    url = f"https://{gateways[0].address}/v1"
    with openai_client(url, secured, with_client_certificate=False) as sdk, pytest.raises(openai.APIConnectionError):
        sdk.models.list()


def test_a_gateway_whose_token_the_orchestrator_refuses_says_so(secured, gateways):
    http = openai.DefaultHttpxClient(trust_env=False)
    url = f"http://{gateways[1].address}/v1"
    sdk = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, http_client=http)
    with sdk, pytest.raises(openai.AuthenticationError) as error:
        sdk.completions.create(model="coolfusion", prompt=PROMPT, max_tokens=4)
    assert "orchestrator refused the gateway's credentials" in error.value.message
    assert not any(secret in error.value.message for secret in SECRETS)


def test_the_gateway_never_logs_a_token(secured, gateways):
    logs = "".join(line for gateway in gateways for line in gateway.log_lines)
    assert "POST /v1/completions" in logs
    assert not any(secret in logs for secret in (*SECRETS, GATEWAY_TOKEN))


def replace_file(path: Path, text: str) -> None:
    """Writes a new file and renames it over `path`, as a Kubernetes Secret volume updates."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def fused_through(secured, token: str) -> FuseResult:
    with client(secured, root_certificates=ca(secured), token=token) as c:
        return c.fuse(PROMPT, FuseOptions(workers=("bpe",), max_new_tokens=4))


def test_token_files_are_read_again_when_they_change_on_every_server(secured, gateways):
    """A rotation with no restart: worker, orchestrator and gateway re-read their token files, and
    so do the callers that send a token from a file (the registry's token_file, the gateway's
    --orchestrator-token-file); a file left empty by a broken rotation keeps the tokens before."""
    folder = secured["certs"]
    rotated_worker, rotated_caller, rotated_gateway = "worker-token-9d1f", "caller-token-60ab", "gateway-token-e27c"
    originals = {name: (folder / name).read_text() for name in ("worker-tokens", "new-token", "caller-tokens")}
    originals["gateway-tokens"] = (folder / "gateway-tokens").read_text()
    try:
        # The worker: accept the new token beside the old, switch its caller, then drop the old.
        replace_file(folder / "worker-tokens", f"{WORKER_TOKENS[1]}\n{rotated_worker}\n")
        replace_file(folder / "new-token", rotated_worker + "\n")
        replace_file(folder / "worker-tokens", rotated_worker + "\n")
        assert not fused_through(secured, CALLER_TOKEN).dropped  # the orchestrator sends the new token
        # The orchestrator: only the rotated caller token gets in now.
        replace_file(folder / "caller-tokens", rotated_caller + "\n")
        assert fused_through(secured, rotated_caller).text
        with pytest.raises(CoolfusionError) as refused:
            fused_through(secured, CALLER_TOKEN)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        # The gateway: its callers' token rotates; it sends the orchestrator the rotated caller token.
        replace_file(folder / "gateway-tokens", rotated_gateway + "\n")
        url = f"https://{gateways[0].address}/v1"
        with openai_client(url, secured) as old, pytest.raises(openai.AuthenticationError):
            old.models.list()
        with openai_client(url, secured, token=rotated_gateway) as sdk:
            assert sdk.completions.create(model="bpe", prompt=PROMPT, max_tokens=4).choices[0].text
            replace_file(folder / "gateway-tokens", "\n")  # broken: no token at all
            assert sdk.models.list().data  # the tokens read before stay in use
    finally:
        for name, text in originals.items():
            replace_file(folder / name, text)
    assert fused_through(secured, CALLER_TOKEN).text  # restored
    logs = "".join(line for p in (*gateways, secured["orchestrator"], secured["worker"]) for line in p.log_lines)
    assert "holds no token; the tokens read before stay in use" in logs
    assert not any(t in logs for t in (rotated_worker, rotated_caller, rotated_gateway))
