"""The containerized cluster check: the three images run as the Kubernetes manifests configure them.

It renders an overlay (`kubectl kustomize k8s/overlays/demo`) and starts every replica of every
Deployment as a podman container with what the pod template says: the image, command, arguments
and environment; the pod's user and group (runAsNonRoot: a non-zero runAsUser); a read-only
root filesystem and only the volumes the manifest mounts writable (emptyDir as a fresh folder per
pod, owned by fsGroup, as the kubelet makes it); ConfigMap and Secret files (subPath included);
no capabilities and no privilege escalation; the memory limit; the termination grace period. Init
containers run to completion first. Services become the names the cluster's DNS would answer
(each pod's /etc/hosts: the Service's short, namespaced and cluster.local names, one line per
selected pod). Secrets a manifest names but no manifest holds (they are never committed) are made
up for the run: a random token for a token file, certificates from a throwaway CA for `*.crt` and
`*.key` files.

The check then waits for every container's readiness probe (gRPC health or HTTP GET, run the way
the kubelet runs it, within the startup probe's budget), fuses one chat request through the
gateway (with a token where the gateway asks for one), reads every container's /metrics, runs
every probe again, notes each container's peak memory, and stops the containers with SIGTERM: each
must drain and exit with status 0 within its grace period. Several overlays run one after another.
Last it starts `coolfusion up` with the same presets in the registry's order, which loads the
calibrations that ship for them, sends it the same request, stops it with Ctrl-C (SIGINT), checks
that none of its processes is left, and compares: each overlay's answer must equal its.

What it does not run: the scheduler and replica controllers (each replica is started once and
never restarted), Services' virtual IPs (names resolve to the pods themselves), HPAs, PDBs and
NetworkPolicies (every container can reach every other), resource requests, emptyDir size limits
and topology spread; the probes are run by this check, not by a kubelet. A manifest field it does
not know fails the check, so that the manifests cannot outgrow what the check runs
(tests/unit/test_k8s.py plans the overlays without containers).

Why not `podman kube play`: Debian bookworm's podman 4.3 restarts a Deployment's init container
under the pod's restart policy, names emptyDir volumes after the manifest's volume name (so every
pod shares one `tmp`), and mounts a ConfigMap key with subPath as an empty folder.

Everything it makes carries the label coolfusion.check=<run id>: the network, the containers and
the scratch folder are removed at the end, whatever happened; only the images stay.

Usage: python scripts/cluster_check.py [--overlay overlays/demo ...] [--max-tokens 24] [--logs DIR]
"""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from images import ulimit_flags
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
LABEL = "coolfusion.check"
PROMPT = "What is the capital of Cambodia? Answer in one sentence."
DNS_SUFFIXES = ("", ".{ns}", ".{ns}.svc", ".{ns}.svc.cluster.local")
# Pod fields the check runs, and those it leaves to a real cluster (with why that is harmless here).
POD_FIELDS = {"containers", "initContainers", "volumes", "securityContext", "terminationGracePeriodSeconds"}
POD_FIELDS_LEFT = {
    "topologySpreadConstraints": "one machine",
    "tolerations": "no tainted nodes",
    "automountServiceAccountToken": "no API server (the manifests turn it off)",
    "enableServiceLinks": "no Service environment variables (the manifests turn them off)",
}
POD_SECURITY_FIELDS = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile"}
CONTAINER_FIELDS = {
    "name", "image", "imagePullPolicy", "command", "args", "env", "ports", "resources", "securityContext",
    "volumeMounts", "startupProbe", "readinessProbe", "livenessProbe",
}  # fmt: skip
CONTAINER_SECURITY_FIELDS = {"allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


class Unsupported(ValueError):
    """The manifests ask for something this check cannot run; the message names the field."""


class CheckFailed(RuntimeError):
    """The cluster in containers did not do what the manifests promise."""


# --- planning: rendered manifests -> containers ----------------------------------------------------


@dataclass
class Container:
    """One container to run: `podman run` arguments, and what the check needs to probe it."""

    name: str
    pod: str
    ip: str  # "" for an init container (it runs without a network)
    argv: list[str]  # after `podman run`
    ports: dict[str, int]  # by name
    probes: dict[str, dict]  # startupProbe, readinessProbe, livenessProbe as the manifest has them
    args: list[str]  # the container's own arguments, as the manifest gives them
    files: dict[str, Path]  # mount path -> the file on this machine (ConfigMap and Secret files)
    grace_s: int
    image: str
    metrics_path: str = "/metrics"


@dataclass
class Plan:
    """The containers of a rendered overlay, in start order, and the names their network answers."""

    namespace: str
    init: list[Container] = field(default_factory=list)
    main: list[Container] = field(default_factory=list)
    registry: list[dict] = field(default_factory=list)  # the orchestrator's workers.yaml entries
    pem: dict[str, str] = field(default_factory=dict)  # certificates made up for Secrets, if any
    workers: dict[str, Container] = field(default_factory=dict)  # by Service name
    gateways: list[Container] = field(default_factory=list)


def render(overlay: str) -> list[dict]:
    text = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "k8s" / overlay)], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(text) if d]


def plan(docs: list[dict], network: ipaddress.IPv4Network, scratch: Path, check_id: str) -> Plan:
    """What to run for the rendered `docs`: each Deployment's replicas as containers on `network`
    (addresses from .10 on), their volume files written under `scratch`."""
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    if not deployments:
        raise Unsupported("the render holds no Deployment")
    namespace = deployments[0]["metadata"].get("namespace", "default")
    addresses = iter(network.hosts())
    for _ in range(9):
        next(addresses)
    pods = [
        (f"{d['metadata']['name']}-{i}", str(next(addresses)), d)
        for d in deployments
        for i in range(d["spec"].get("replicas", 1))
    ]
    hosts = service_hosts(docs, namespace, pods)
    result = Plan(namespace)
    material = SecretMaterial([name for name, _ in hosts])
    for pod, ip, deployment in pods:
        template = deployment["spec"]["template"]
        spec = template["spec"]
        _refuse_unknown(pod, spec, POD_FIELDS | POD_FIELDS_LEFT.keys())
        volumes = pod_volumes(pod, spec, docs, scratch / pod, material)
        common = pod_flags(pod, spec, check_id)
        for container in spec.get("initContainers", []):
            result.init.append(_container(pod, "", container, common + ["--network", "none"], volumes, spec))
        if len(spec["containers"]) != 1:
            raise Unsupported(f"{pod}: {len(spec['containers'])} containers; the check runs pods of one")
        network_flags = ["--ip", ip, "--hostname", pod, *(f"--add-host={name}:{addr}" for name, addr in hosts)]
        main = _container(pod, ip, spec["containers"][0], common + network_flags, volumes, spec)
        main.metrics_path = template["metadata"].get("annotations", {}).get("prometheus.io/path", "/metrics")
        result.main.append(main)
        component = template["metadata"]["labels"].get("app.kubernetes.io/component")
        if component == "gateway":
            result.gateways.append(main)
        elif component == "worker":
            result.workers[deployment["metadata"]["name"]] = main
    result.registry = _registry(docs, result.main)
    result.pem = material.pem
    return result


def service_hosts(docs: list[dict], namespace: str, pods: list[tuple[str, str, dict]]) -> list[tuple[str, str]]:
    """(name, address) lines for /etc/hosts: every name the cluster DNS gives a Service, once per
    pod its selector picks (a headless Service's records; a ClusterIP one's virtual IP is left out)."""
    lines = []
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"].get("selector", {})
        for _, ip, deployment in pods:
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            if selector and all(labels.get(k) == v for k, v in selector.items()):
                name = service["metadata"]["name"]
                lines += [(name + suffix.format(ns=namespace), ip) for suffix in DNS_SUFFIXES]
    return lines


def pod_flags(pod: str, spec: dict, check_id: str) -> list[str]:
    """`podman run` flags every container of the pod shares: user, group, limits, the label."""
    security = spec.get("securityContext", {})
    _refuse_unknown(f"{pod} securityContext", security, POD_SECURITY_FIELDS)
    if security.get("seccompProfile", {"type": "RuntimeDefault"})["type"] != "RuntimeDefault":
        raise Unsupported(f"{pod}: seccompProfile other than RuntimeDefault")  # podman's default profile
    for name, reason in POD_FIELDS_LEFT.items():
        if name in ("automountServiceAccountToken", "enableServiceLinks") and spec.get(name, False):
            raise Unsupported(f"{pod}: {name}: true ({reason})")
    flags = ["--label", f"{LABEL}={check_id}", "--log-driver", "k8s-file"]
    if security.get("runAsNonRoot") and not security.get("runAsUser"):
        raise Unsupported(f"{pod}: runAsNonRoot without a non-zero runAsUser (the check does not read image users)")
    if "runAsUser" in security:
        flags += ["--user", f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"]
    if "fsGroup" in security:
        flags += ["--group-add", str(security["fsGroup"])]
    flags += ["--stop-timeout", str(spec.get("terminationGracePeriodSeconds", 30))]
    return flags


def pod_volumes(pod: str, spec: dict, docs: list[dict], folder: Path, material: SecretMaterial) -> dict[str, Path]:
    """Each volume of the pod as a path on this machine: a folder for emptyDir, a folder of files
    for a ConfigMap or a Secret."""
    security = spec.get("securityContext", {})
    uid, group = security.get("runAsUser", 0), security.get("fsGroup", security.get("runAsGroup", 0))
    paths = {}
    for volume in spec.get("volumes", []):
        path = folder / volume["name"]
        path.mkdir(parents=True)
        if "emptyDir" in volume:
            if volume["emptyDir"].get("medium"):
                raise Unsupported(f"{pod}: emptyDir medium {volume['emptyDir']['medium']}")
            os.chown(path, uid, group)
            path.chmod(0o2777)  # the kubelet's emptyDir: world-writable, the fsGroup kept by new files
        elif "configMap" in volume:
            source = volume["configMap"]
            found = _object(docs, "ConfigMap", source["name"])
            if found is None:
                raise Unsupported(f"{pod}: ConfigMap {source['name']} is not in the render")
            _write_files(path, _items(source, found["data"]), group, source.get("defaultMode", 0o644))
        elif "secret" in volume:
            source = volume["secret"]
            data = material.files(source["secretName"], _object(docs, "Secret", source["secretName"]), source)
            _write_files(path, _items(source, data), group, source.get("defaultMode", 0o644))
        else:
            raise Unsupported(f"{pod}: volume {volume['name']} is neither emptyDir, configMap nor secret")
        paths[volume["name"]] = path
    return paths


def _items(source: dict, data: dict[str, str]) -> dict[str, str]:
    """The files a ConfigMap or Secret volume shows: every key, or the `items` it lists under their paths."""
    if "items" not in source:
        return data
    return {item["path"]: data[item["key"]] for item in source["items"]}


def _write_files(folder: Path, data: dict[str, str], group: int, mode: int) -> None:
    for key, text in data.items():
        path = folder / key
        path.write_text(text)
        os.chown(path, 0, group)  # the kubelet gives projected files the fsGroup
        path.chmod(mode)


def _object(docs: list[dict], kind: str, name: str) -> dict | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def _container(pod: str, ip: str, container: dict, flags: list[str], volumes: dict[str, Path], spec: dict) -> Container:
    name = f"{pod}-{container['name']}"
    _refuse_unknown(name, container, CONTAINER_FIELDS)
    argv = ["--name", name, *flags, *_security_flags(name, container.get("securityContext", {}))]
    for variable in container.get("env", []):
        if set(variable) != {"name", "value"}:
            raise Unsupported(f"{name}: env {variable['name']} is not a plain value")
        argv += ["--env", f"{variable['name']}={variable['value']}"]
    limits = container.get("resources", {}).get("limits", {})
    if set(limits) - {"memory"}:
        raise Unsupported(f"{name}: limits {sorted(set(limits) - {'memory'})}")
    if "memory" in limits:
        argv += ["--memory", str(memory_bytes(limits["memory"]))]
    files = {}
    for mount in container.get("volumeMounts", []):
        source = volumes[mount["name"]] / mount.get("subPath", "")
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        read_only = mount.get("readOnly", False) or "emptyDir" not in volume  # the kubelet mounts these read-only
        argv += ["--mount", f"type=bind,src={source},dst={mount['mountPath']}" + (",ro=true" if read_only else "")]
        if source.is_file():
            files[mount["mountPath"]] = source
        elif "emptyDir" not in volume:
            files.update({f"{mount['mountPath']}/{p.name}": p for p in source.iterdir()})
    if "command" in container:
        argv += ["--entrypoint", json.dumps(container["command"])]
    args = [str(a) for a in container.get("args", [])]
    argv += [container["image"], *args]
    ports = {p.get("name", str(p["containerPort"])): p["containerPort"] for p in container.get("ports", [])}
    probes = {kind: container[kind] for kind in PROBES if kind in container}
    grace_s = spec.get("terminationGracePeriodSeconds", 30)
    return Container(name, pod, ip, argv, ports, probes, args, files, grace_s, container["image"])


def _security_flags(name: str, security: dict) -> list[str]:
    _refuse_unknown(f"{name} securityContext", security, CONTAINER_SECURITY_FIELDS)
    flags = []
    if security.get("readOnlyRootFilesystem"):
        # podman would add its own writable /tmp, /var/tmp and /run; a pod gets only its volumes.
        flags += ["--read-only", "--read-only-tmpfs=false"]
    if security.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    capabilities = security.get("capabilities", {})
    flags += [f"--cap-drop={c.lower()}" for c in capabilities.get("drop", [])]
    flags += [f"--cap-add={c.lower()}" for c in capabilities.get("add", [])]
    return flags


def _refuse_unknown(where: str, fields: dict, known: set[str]) -> None:
    if unknown := sorted(set(fields) - known):
        raise Unsupported(f"{where}: the check cannot run {', '.join(unknown)}")


def _registry(docs: list[dict], containers: list[Container]) -> list[dict]:
    """The workers.yaml the orchestrator reads (the file mounted at its --workers path)."""
    for container in containers:
        if "--workers" in container.args:
            path = container.args[container.args.index("--workers") + 1]
            return yaml.safe_load(container.files[path].read_text())["workers"]
    raise Unsupported("no container runs with --workers: no orchestrator in the render")


_QUANTITY = re.compile(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?")
_UNITS = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def memory_bytes(quantity: str) -> int:
    match = _QUANTITY.fullmatch(str(quantity))
    if not match:
        raise Unsupported(f"memory quantity {quantity!r}")
    return int(match[1]) * _UNITS[match[2]]


class SecretMaterial:
    """The files of Secrets no manifest holds (they are never committed), made up for one run from
    the keys the volume lists under `items`: for a key ending in .crt or .key, a certificate for every
    Service name (or its key), signed by a throwaway CA (`ca.crt`); for any other key, a random
    token. A Secret mounted by several pods gives them all the same files."""

    def __init__(self, names: list[str]):
        self._names = sorted(set(names))
        self._made: dict[str, dict[str, str]] = {}
        self.pem: dict[str, str] = {}  # the CA and server certificate, once a Secret needed them

    def files(self, name: str, found: dict | None, source: dict) -> dict[str, str]:
        if found is not None:
            decoded = {k: base64.b64decode(v).decode() for k, v in found.get("data", {}).items()}
            return {**decoded, **found.get("stringData", {})}
        if "items" not in source:
            raise Unsupported(f"Secret {name} is not in the render and its volume lists no items (keys)")
        made = self._made.setdefault(name, {})
        for key in (item["key"] for item in source["items"]):
            made.setdefault(key, self._make(key))
        return made

    def _make(self, key: str) -> str:
        if not key.endswith((".crt", ".key")):
            return secrets.token_urlsafe(32) + "\n"
        self.pem = self.pem or _certificates(self._names)
        return self.pem[key if key == "ca.crt" else "tls.key" if key.endswith(".key") else "tls.crt"]


def _certificates(names: list[str]) -> dict[str, str]:
    """A CA and one server certificate for `names`, as PEM text."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coolfusion check CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    server = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return {
        "ca.crt": ca.public_bytes(pem).decode(),
        "tls.crt": server.public_bytes(pem).decode(),
        "tls.key": key_pem.decode(),
    }


# --- running ---------------------------------------------------------------------------------------


def podman(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise CheckFailed(f"podman {' '.join(args[:3])} ... failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@contextmanager
def containers_network(check_id: str) -> Iterator[tuple[str, ipaddress.IPv4Network]]:
    """A podman network of its own for one run, with the addresses podman picked for it."""
    name = f"coolfusion-check-{check_id}"
    podman("network", "create", "--label", f"{LABEL}={check_id}", name)
    try:
        [info] = json.loads(podman("network", "inspect", name))
        yield name, ipaddress.IPv4Network(info["subnets"][0]["subnet"])
    finally:
        podman("network", "rm", "--force", name, check=False)


def left_behind(check_id: str) -> str:
    """Nothing of the run may remain: no container, no network (the scratch folder is gone too)."""
    containers = podman("ps", "--all", "--quiet", "--filter", f"label={LABEL}={check_id}").split()
    networks = podman("network", "ls", "--quiet", "--filter", f"label={LABEL}={check_id}").split()
    if containers or networks:
        raise CheckFailed(f"left behind: containers {containers}, networks {networks}")
    return "no container or network of the run is left"


def remove_containers(check_id: str) -> None:
    """Every container of the run, whatever state it is in."""
    ids = podman("ps", "--all", "--quiet", "--filter", f"label={LABEL}={check_id}").split()
    if ids:
        podman("rm", "--force", "--time", "0", *ids, check=False)


def image_lines(plan: Plan) -> list[str]:
    """The images the containers run, each with its id and build time; a missing one fails the check."""
    lines = []
    for image in sorted({c.image for c in plan.init + plan.main}):
        found = podman("image", "inspect", "--format", "{{.Id}} {{.Created}}", image, check=False).split()
        if not found:
            raise CheckFailed(f"image {image} is missing: build the images first (make images)")
        lines.append(f"{image}: {found[0][:12]}, built {' '.join(found[1:3])}")
    return lines


def start(plan: Plan, network: str) -> None:
    """Runs every init container to completion, then starts every container (all at once, as a
    cluster starts a fresh deployment), within the limits this machine allows."""
    limits = ulimit_flags()
    for container in plan.init:
        started = time.monotonic()
        argv = ["podman", "run", "--rm", *limits, *container.argv]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise CheckFailed(f"init container {container.name} exited with {proc.returncode}: {proc.stderr[-2000:]}")
        print(f"  init {container.name}: done in {time.monotonic() - started:.0f} s", flush=True)
    for container in plan.main:
        podman("run", "--detach", "--network", network, *limits, *container.argv)


def wait_ready(plan: Plan) -> None:
    """Until every container passes its readiness probe, within its startup probe's budget; a
    container that exits meanwhile fails the check with its log's tail."""
    started = time.monotonic()
    waiting = {c.name: c for c in plan.main}
    while waiting:
        for name, container in list(waiting.items()):
            startup = container.probes.get("startupProbe", {})
            budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
            if probe_passes(container, container.probes["readinessProbe"]):
                print(f"  {name}: ready after {time.monotonic() - started:.0f} s", flush=True)
                del waiting[name]
            elif not running(name) or time.monotonic() - started > budget:
                raise CheckFailed(f"{name} did not become ready in {budget} s:\n{logs(name)[-3000:]}")
        time.sleep(2.0)


def running(name: str) -> bool:
    return podman("inspect", "--format", "{{.State.Running}}", name).strip() == "true"


def logs(name: str) -> str:
    """What the container wrote, stdout and stderr interleaved."""
    proc = subprocess.run(
        ["podman", "logs", name], check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return proc.stdout


def probe_passes(container: Container, probe: dict) -> bool:
    """One try of a probe, as the kubelet makes it: gRPC health of the whole server, or an HTTP GET
    answered with 2xx/3xx (HTTPS without verifying the certificate)."""
    timeout = probe.get("timeoutSeconds", 1)
    if "grpc" in probe:
        with grpc.insecure_channel(f"{container.ip}:{_port(container, probe['grpc']['port'])}") as channel:
            request = health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", ""))
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    if "httpGet" in probe:
        get = probe["httpGet"]
        scheme = get.get("scheme", "HTTP").lower()
        url = f"{scheme}://{container.ip}:{_port(container, get['port'])}{get.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=ssl._create_unverified_context()) as reply:
                return 200 <= reply.status < 400
        except (urllib.error.URLError, OSError):
            return False
    raise Unsupported(f"{container.name}: a probe that is neither grpc nor httpGet")


def _port(container: Container, port: int | str) -> int:
    return container.ports[port] if isinstance(port, str) else port


def chat_request(max_tokens: int) -> dict:
    return {"model": "coolfusion", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens}


def post_chat(base_url: str, body: dict, token: str | None = None, ca_pem: str | None = None) -> dict:
    """One chat completion through an OpenAI-compatible gateway; the whole response body."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(f"{base_url}/chat/completions", json.dumps(body).encode(), headers)
    context = None
    if ca_pem:  # the gateway is called by address: the run's CA vouches for it, not the name
        context = ssl.create_default_context(cadata=ca_pem)
        context.check_hostname = False
    with urllib.request.urlopen(request, timeout=900, context=context) as reply:
        return json.load(reply)


def gateway_call(plan: Plan, container: Container) -> tuple[str, str | None, str | None]:
    """The gateway's base URL, the token it wants (from its --auth-token-file) and the CA for HTTPS."""
    args = container.args
    https = "--tls-cert" in args
    token = None
    if "--auth-token-file" in args:
        token = container.files[args[args.index("--auth-token-file") + 1]].read_text().split()[0]
    url = f"{'https' if https else 'http'}://{container.ip}:{container.ports['http']}/v1"
    return url, token, plan.pem.get("ca.crt") if https else None


def check_metrics(plan: Plan) -> list[str]:
    """Every container's metrics endpoint answers with coolfusion's families; one line each."""
    lines = []
    for container in plan.main:
        url = f"http://{container.ip}:{container.ports['metrics']}{container.metrics_path}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
        ours = sorted(name for name in families if name.startswith("coolfusion_"))
        if not ours:
            raise CheckFailed(f"{container.name}: {url} has no coolfusion_ metrics")
        counted = families.get("coolfusion_grpc_server_handled") or families.get("coolfusion_gateway_requests")
        calls = sum(s.value for s in counted.samples if s.name.endswith("_total")) if counted else 0
        lines.append(f"{container.name}: {len(ours)} coolfusion_ families, {calls:.0f} calls answered")
    return lines


def peak_memory_lines(plan: Plan) -> list[str]:
    """Each container's peak memory so far, from its cgroup, beside the limit its manifest sets."""
    lines = []
    for container in plan.main:
        pid = podman("inspect", "--format", "{{.State.Pid}}", container.name).strip()
        peak = _cgroup_peak_bytes(int(pid))
        limit = container.argv[container.argv.index("--memory") + 1] if "--memory" in container.argv else None
        shown = f"{peak / 2**30:.2f} GiB" if peak is not None else "unknown"
        lines.append(
            f"{container.name}: peak memory {shown}" + (f" (limit {int(limit) / 2**30:.2f} GiB)" if limit else "")
        )
    return lines


def _cgroup_peak_bytes(pid: int) -> int | None:
    """The memory high-water mark of a process's cgroup (cgroup v1 or v2); None where neither shows one."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":
            candidate = Path(f"/sys/fs/cgroup/memory{path}/memory.max_usage_in_bytes")
        elif controllers == "":
            candidate = Path(f"/sys/fs/cgroup{path}/memory.peak")
        else:
            continue
        if candidate.is_file():
            return int(candidate.read_text())
    return None


def check_probes(plan: Plan) -> None:
    """Every probe of every container passes now (health after the request)."""
    for container in plan.main:
        for kind, probe in container.probes.items():
            if not probe_passes(container, probe):
                raise CheckFailed(f"{container.name}: {kind} fails after the request")


def stop(plan: Plan, logs_dir: Path | None) -> list[str]:
    """SIGTERM to every container at once; each must exit 0 within its grace period. Their logs go
    to `logs_dir`, if given."""
    names = [c.name for c in plan.main]
    started = time.monotonic()
    podman("stop", "--time", str(max(c.grace_s for c in plan.main)), *names)
    took = time.monotonic() - started
    failed = []
    if logs_dir is not None:
        logs_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        if logs_dir is not None:
            (logs_dir / f"{name}.log").write_text(logs(name))
        code = int(podman("inspect", "--format", "{{.State.ExitCode}}", name).strip())
        if code != 0:
            failed.append(f"{name} exited with {code}:\n{logs(name)[-1500:]}")
    if failed:
        raise CheckFailed("not a clean shutdown:\n" + "\n".join(failed))
    return [f"{len(names)} containers stopped with SIGTERM, all exited 0, in {took:.0f} s"]


# --- the same request to `coolfusion up` ------------------------------------------------------------


def registry_presets(plan: Plan) -> list[str]:
    """The presets the registered workers serve, in the registry's order (the fusion's order)."""
    presets = []
    for entry in plan.registry:
        service = entry["address"].removeprefix("dns:///").split(".")[0].split(":")[0]
        args = plan.workers[service].args
        if "--preset" not in args:
            raise Unsupported(f"worker {entry['name']} serves no preset; `coolfusion up` could not start it")
        presets.append(args[args.index("--preset") + 1])
    return presets


def default_calibration(plan: Plan) -> str | None:
    """The orchestrators' --default-calibration, which must be the same for all of them."""
    found = {c.args[c.args.index("--default-calibration") + 1] if "--default-calibration" in c.args else None
             for c in plan.main if "--workers" in c.args}  # fmt: skip
    if len(found) != 1:
        raise Unsupported(f"the orchestrators disagree on the default calibration: {found}")
    return found.pop()


def coolfusion_up_answer(presets: list[str], body: dict, log: Path, ready_timeout_s: float = 900) -> tuple[dict, str]:
    """Starts `coolfusion up` with `presets`, sends it `body`, stops it with SIGINT (Ctrl-C); the
    response and the calibration it chose by default. Every process it started must be gone after."""
    import psutil  # the worker's dependencies bring it; only this comparison needs it

    command = [str(Path(sys.executable).parent / "coolfusion"), "up", "--presets", ",".join(presets), "--log", str(log)]
    up = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert up.stdout is not None
    url, calibration, deadline = "", "", time.monotonic() + ready_timeout_s
    try:
        for line in up.stdout:  # `coolfusion up` prints its addresses, then "ready: ..."
            print(f"  up: {line.rstrip()}", flush=True)
            if match := re.search(r"default strategy: calibration (\S+)", line):
                calibration = match[1]
            if match := re.search(r"OpenAI-compatible API: (\S+)", line):
                url = match[1]
            if line.startswith("ready:") or time.monotonic() > deadline:
                break
        if not url:
            raise CheckFailed(f"`coolfusion up` did not start its gateway (see {log})")
        children = psutil.Process(up.pid).children(recursive=True)
        answer = post_chat(url, body)
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(120)
    if code != 0:
        raise CheckFailed(f"`coolfusion up` exited with {code} on Ctrl-C")
    if alive := [p.pid for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        raise CheckFailed(f"`coolfusion up` left processes behind: {alive}")
    return answer, calibration


# --- the whole check -------------------------------------------------------------------------------


@dataclass
class Contained:
    """What one overlay's containers answered, and under which default calibration."""

    overlay: str
    presets: list[str]
    calibration: str | None
    answer: dict


def run_overlay(overlay: str, body: dict, logs_dir: Path | None) -> Contained:
    """One overlay in containers, from start to a clean stop; the gateway's answer to `body`."""
    check_id = f"{os.getpid()}-{overlay.replace('/', '-')}"
    docs = render(overlay)
    scratch = Path(tempfile.mkdtemp(prefix=f"coolfusion-check-{check_id}-"))
    report: list[str] = []
    try:
        with containers_network(check_id) as (network, subnet):
            the_plan = plan(docs, subnet, scratch, check_id)
            presets, calibration = registry_presets(the_plan), default_calibration(the_plan)
            print(f"k8s/{overlay}: {len(the_plan.main)} containers ({len(the_plan.init)} init) on {subnet}", flush=True)
            report += image_lines(the_plan)
            try:
                started = time.monotonic()
                start(the_plan, network)
                wait_ready(the_plan)
                report.append(f"containers ready in {time.monotonic() - started:.0f} s")
                started = time.monotonic()
                url, token, ca_pem = gateway_call(the_plan, the_plan.gateways[0])
                answer = post_chat(url, body, token, ca_pem)
                report.append(f"fused through the gateway ({url}) in {time.monotonic() - started:.0f} s")
                report += check_metrics(the_plan)
                report += peak_memory_lines(the_plan)
                check_probes(the_plan)
                report += stop(the_plan, logs_dir / overlay.replace("/", "-") if logs_dir else None)
            finally:
                remove_containers(check_id)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.append(left_behind(check_id))
    print("\n".join(f"  {line}" for line in report), flush=True)
    return Contained(overlay, presets, calibration, answer)


def run(overlays: list[str], max_tokens: int, logs_dir: Path | None) -> int:
    """Each overlay in containers in turn, then `coolfusion up` once; every answer compared with its."""
    body = chat_request(max_tokens)
    contained = [run_overlay(overlay, body, logs_dir) for overlay in overlays]
    if len({tuple(c.presets) for c in contained}) != 1:
        raise Unsupported(f"the overlays serve different presets: {[c.presets for c in contained]}")
    presets = contained[0].presets
    print(f"coolfusion up --presets {','.join(presets)}", flush=True)
    log = (logs_dir or Path(tempfile.gettempdir())) / "coolfusion-up.log"
    local, local_calibration = coolfusion_up_answer(presets, body, log)
    return max(compare(c, local, local_calibration) for c in contained)


def compare(contained: Contained, local: dict, local_calibration: str) -> int:
    """Prints both answers; 0 when the texts are equal, no worker was dropped and both ran the same
    default calibration."""
    texts = [r["choices"][0]["message"]["content"] for r in (contained.answer, local)]
    print(f"k8s/{contained.overlay}: {texts[0]!r}\n  {json.dumps(contained.answer['coolfusion'])}")
    print(f"coolfusion up: {texts[1]!r}\n  {json.dumps(local['coolfusion'])}")
    problems = []
    if (contained.calibration or "") != local_calibration:
        problems.append(
            f"default calibration: {contained.calibration} in the manifests, {local_calibration or None} under up"
        )
    if texts[0] != texts[1]:
        problems.append("the answers differ")
    for where, answer in ((f"k8s/{contained.overlay}", contained.answer), ("coolfusion up", local)):
        if answer["coolfusion"]["dropped"]:
            problems.append(f"dropped by {where}: {answer['coolfusion']['dropped']}")
    print("\n".join(f"FAILED: {p}" for p in problems) or "OK: the same answer, every worker fused")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--overlay", action="append", help="a kustomization under k8s/ to run (repeatable; default: overlays/demo)"
    )
    parser.add_argument("--max-tokens", type=int, default=24, help="the answer's length (the first worker's tokens)")
    parser.add_argument("--logs", type=Path, help="keep every container's log and `coolfusion up`'s here")
    args = parser.parse_args(argv)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    try:
        return run(args.overlay or ["overlays/demo"], args.max_tokens, args.logs)
    except (CheckFailed, Unsupported) as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
