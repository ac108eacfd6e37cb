"""Offline checks of the deployment artefacts: k8s/ (kustomize) and the two Dockerfiles.

Every overlay (and the external-worker example) is rendered with `kubectl kustomize`,
schema-validated with `kubernetes-validate --strict`, then checked for the properties the
runtime relies on: native gRPC probes, headless worker Services, a registry that names
Services which really exist, drain time below terminationGracePeriodSeconds, GPU limits
only where intended and a NetworkPolicy that lets only the orchestrator reach workers.
Render tests skip only when kubectl is absent; the Dockerfile checks always run.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from coolfusion.orchestrator.registry import parse_registry

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"

# Schemas bundled with kubernetes-validate==1.37.0 go from 1.25 to 1.37. 1.32 matches the
# kubectl/kustomize used here and is a version every current managed offering runs.
K8S_VERSION = "1.32.0"

NAMESPACE = "coolfusion"
WORKER_PORT = 50051
ORCH_PORT = 50050
DEFAULT_GRACE_S = 20  # the CLIs' --grace-s default
REGISTRY_PATH = "/etc/coolfusion/workers.yaml"
GPU = "nvidia.com/gpu"

RENDERS = ["overlays/demo", "overlays/gpu", "examples/external-worker"]
# Every kustomization directory that must be rendered (each one renders on its own).
KUSTOMIZATIONS = sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl is not installed: it is needed to render k8s/ offline (kubectl kustomize)",
)


# --------------------------------------------------------------------------- helpers


@functools.cache
def _render_text(rel: str) -> str:
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / rel)], check=False, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kubectl kustomize k8s/{rel} failed:\n{proc.stderr}"
    return proc.stdout


def render(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(_render_text(rel)) if d]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def by_name(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in of_kind(docs, kind)}


def pod_labels(deploy: dict) -> dict:
    return deploy["spec"]["template"]["metadata"]["labels"]


def matches(selector: dict, labels: dict) -> bool:
    """matchLabels-style selector (or a Service's plain selector dict) vs labels."""
    assert "matchExpressions" not in selector, "only matchLabels selectors are used here"
    wanted = selector.get("matchLabels", selector)
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def is_worker(deploy: dict) -> bool:
    return pod_labels(deploy).get("app.kubernetes.io/component") == "worker"


def is_orchestrator(deploy: dict) -> bool:
    return pod_labels(deploy).get("app.kubernetes.io/component") == "orchestrator"


def workers(docs) -> list[dict]:
    return [d for d in of_kind(docs, "Deployment") if is_worker(d)]


def orchestrator(docs) -> dict:
    found = [d for d in of_kind(docs, "Deployment") if is_orchestrator(d)]
    assert len(found) == 1, "expected exactly one orchestrator Deployment"
    return found[0]


def main_container(deploy: dict) -> dict:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{deploy['metadata']['name']}: expected one container"
    return containers[0]


def grpc_port(container: dict) -> int:
    ports = [p for p in container.get("ports", []) if p.get("name") == "grpc"]
    assert len(ports) == 1, f"container {container['name']} needs one port named grpc"
    return ports[0]["containerPort"]


def arg_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def registry(docs) -> tuple[dict, list[dict]]:
    cms = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("coolfusion-workers")]
    assert len(cms) == 1, "expected exactly one coolfusion-workers ConfigMap"
    data = yaml.safe_load(cms[0]["data"]["workers.yaml"])
    assert isinstance(data, dict) and isinstance(data.get("workers"), list) and data["workers"]
    return cms[0], data["workers"]


ADDRESS = re.compile(r"^(?:dns:///)?(?P<host>[a-z0-9.-]+):(?P<port>\d+)$")


# --------------------------------------------------------------------------- renders


@needs_kubectl
@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_every_kustomization_renders(rel):
    docs = render(rel)
    kind = yaml.safe_load((K8S / rel / "kustomization.yaml").read_text()).get("kind")
    if kind != "Component":  # a Component alone only carries patches
        assert docs, f"k8s/{rel} rendered nothing"


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_render_is_schema_valid(rel, tmp_path):
    out = tmp_path / "render.yaml"
    out.write_text(_render_text(rel))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
            K8S_VERSION,
            "--quiet",
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"k8s/{rel} is not valid for {K8S_VERSION}:\n{proc.stdout}{proc.stderr}"


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_everything_in_namespace(rel):
    docs = render(rel)
    assert NAMESPACE in by_name(docs, "Namespace")
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, d["metadata"]["name"]


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_probes_are_native_grpc_on_the_grpc_port(rel):
    docs = render(rel)
    deploys = of_kind(docs, "Deployment")
    assert deploys
    for d in deploys:
        for c in d["spec"]["template"]["spec"]["containers"]:
            port = grpc_port(c)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c.get(probe)
                assert p, f"{d['metadata']['name']}/{c['name']}: missing {probe}"
                handlers = {"grpc", "httpGet", "tcpSocket", "exec"} & set(p)
                assert handlers == {"grpc"}, f"{d['metadata']['name']}: {probe} is not native grpc"
                assert p["grpc"]["port"] == port, f"{d['metadata']['name']}: {probe} port"
                assert not p["grpc"].get("service"), "probe the server's overall health"


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_worker_startup_probe_is_generous(rel):
    for d in workers(render(rel)):
        p = main_container(d)["startupProbe"]
        budget = p.get("periodSeconds", 10) * p.get("failureThreshold", 3)
        assert budget >= 300, f"{d['metadata']['name']}: model load needs >= 5 min, got {budget}s"


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_grace_period_exceeds_drain(rel):
    for d in of_kind(render(rel), "Deployment"):
        c = main_container(d)
        grace = int(arg_value(c.get("args", []), "--grace-s") or DEFAULT_GRACE_S)
        tgps = d["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        assert tgps > grace, f"{d['metadata']['name']}: {tgps}s <= --grace-s {grace}"


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_pods_run_non_root_read_only(rel):
    for d in of_kind(render(rel), "Deployment"):
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"].get("runAsUser", 0) != 0
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert c.get("resources", {}).get("requests"), f"{c['name']}: no resource requests"


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_worker_services_are_headless_and_cover_every_worker(rel):
    docs = render(rel)
    services = by_name(docs, "Service")
    ws = workers(docs)
    assert len(ws) >= 2, "the overlays deploy the default pair"
    for d in ws:
        name = d["metadata"]["name"]
        svc = services.get(name)
        assert svc is not None, f"no Service named like worker Deployment {name}"
        assert name.startswith("coolfusion-worker-")
        assert svc["spec"].get("clusterIP") == "None", f"{name} must be headless"
        assert matches(svc["spec"]["selector"], pod_labels(d))
        # The selector must pick this model's pods only.
        for other in ws:
            if other is not d:
                assert not matches(svc["spec"]["selector"], pod_labels(other))
        [port] = svc["spec"]["ports"]
        assert port["name"] == "grpc" and port["port"] == WORKER_PORT
        assert port["targetPort"] in ("grpc", grpc_port(main_container(d)))
        assert grpc_port(main_container(d)) == WORKER_PORT
        args = main_container(d)["args"]
        assert arg_value(args, "--port") == str(WORKER_PORT)
        assert arg_value(args, "--preset") or arg_value(args, "--model")


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_registry_matches_rendered_worker_services(rel):
    docs = render(rel)
    cm, entries = registry(docs)
    services = by_name(docs, "Service")
    orch = orchestrator(docs)
    container = main_container(orch)
    mounts = container.get("volumeMounts", [])

    # The ConfigMap (hash-suffixed name) is what the orchestrator mounts at REGISTRY_PATH.
    assert arg_value(container["args"], "--workers") == REGISTRY_PATH
    volumes = {v["name"]: v for v in orch["spec"]["template"]["spec"]["volumes"]}
    [mount] = [m for m in mounts if m["mountPath"] == REGISTRY_PATH]
    assert volumes[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    assert mount.get("subPath") == "workers.yaml"

    parse_registry({"workers": entries})  # the orchestrator's own parser accepts the ConfigMap
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), "worker names must be unique"
    registered = set()
    for e in entries:
        assert re.fullmatch(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?", e["name"]), e["name"]
        m = ADDRESS.match(e["address"])
        assert m, f"unexpected address {e['address']!r}"
        host, port = m["host"], int(m["port"])
        labels = host.split(".")
        in_namespace = len(labels) == 1 or labels[1] == NAMESPACE
        if in_namespace:
            svc = services.get(labels[0])
            assert svc is not None, f"{e['name']}: no Service {labels[0]} in the render"
            assert port in [p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"]
            assert svc["spec"].get("clusterIP") == "None"
            assert e.get("replicas") == "dns", (
                f"{e['name']}: per-pod affinity behind a headless Service needs replicas: dns"
            )
            registered.add(labels[0])
        else:
            # A worker in someone else's namespace: everything it needs must be mounted.
            files = [e.get("token_file")] + list((e.get("tls") or {}).values())
            for f in filter(None, files):
                if f.startswith("/"):
                    assert any(f.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), (
                        f"{e['name']}: {f} is not on a volume of the orchestrator"
                    )
    worker_services = {
        n for n, s in services.items() if s["spec"].get("selector", {}).get("app.kubernetes.io/component") == "worker"
    }
    assert registered == worker_services, "every rendered worker must be registered"


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_network_policy_only_orchestrator_reaches_workers(rel):
    docs = render(rel)
    pols = of_kind(docs, "NetworkPolicy")
    orch_labels = pod_labels(orchestrator(docs))
    for d in workers(docs):
        labels = pod_labels(d)
        selecting = [p for p in pols if matches(p["spec"]["podSelector"], labels)]
        assert selecting, f"no NetworkPolicy selects {d['metadata']['name']}"
        for p in selecting:
            assert "Ingress" in p["spec"]["policyTypes"]
            rules = p["spec"].get("ingress", [])
            assert rules, "worker ingress must be allowed from the orchestrator"
            for rule in rules:
                assert rule.get("from"), "a rule without `from` admits every source"
                for peer in rule["from"]:
                    assert set(peer) == {"podSelector"}, f"unexpected peer {peer}"
                    assert matches(peer["podSelector"], orch_labels)
                    assert not matches(peer["podSelector"], labels)
                assert rule.get("ports") == [{"protocol": "TCP", "port": WORKER_PORT}]

    selecting = [p for p in pols if matches(p["spec"]["podSelector"], orch_labels)]
    assert selecting, "no NetworkPolicy selects the orchestrator"
    for p in selecting:
        for rule in p["spec"].get("ingress", []):
            assert [port["port"] for port in rule["ports"]] == [ORCH_PORT]


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_orchestrator_service_hpa_pdb(rel):
    docs = render(rel)
    orch = orchestrator(docs)
    name = orch["metadata"]["name"]
    assert orch["spec"]["replicas"] == 2
    assert grpc_port(main_container(orch)) == ORCH_PORT
    assert "torch" not in main_container(orch)["image"]

    svc = by_name(docs, "Service")[name]
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert svc["spec"].get("clusterIP") != "None"
    assert matches(svc["spec"]["selector"], pod_labels(orch))
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("grpc", ORCH_PORT)]

    [hpa] = of_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert hpa["spec"]["minReplicas"] >= 2
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])

    [pdb] = of_kind(docs, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"], pod_labels(orch))


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_metrics_port_flag_matches_the_metrics_container_port(rel):
    for d in of_kind(render(rel), "Deployment"):
        name, c = d["metadata"]["name"], main_container(d)
        ports = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == "metrics"]
        assert len(ports) == 1, f"{name}: needs one container port named metrics"
        assert arg_value(c["args"], "--metrics-port") == str(ports[0]), f"{name}: --metrics-port"
        assert ports[0] != grpc_port(c)
        annotations = d["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/port") == str(ports[0]), f"{name}: prometheus.io/port"


def _gpu_quantities(deploy: dict) -> list:
    spec = deploy["spec"]["template"]["spec"]
    found = []
    for c in spec["containers"] + spec.get("initContainers", []):
        for section in ("limits", "requests"):
            if GPU in c.get("resources", {}).get(section, {}):
                found.append((c["name"], section, c["resources"][section][GPU]))
    return found


@needs_kubectl
def test_gpu_overlay_workers_get_one_gpu():
    docs = render("overlays/gpu")
    for d in workers(docs):
        c = main_container(d)
        assert str(c["resources"]["limits"][GPU]) == "1", d["metadata"]["name"]
        assert arg_value(c["args"], "--device") == "cuda"
        assert arg_value(c["args"], "--dtype") == "bfloat16"
        tol = d["spec"]["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == GPU and t["operator"] == "Exists" for t in tol)
        # Only the worker container holds the GPU.
        assert _gpu_quantities(d) == [("worker", "limits", 1)]
    assert not _gpu_quantities(orchestrator(docs))


@needs_kubectl
@pytest.mark.parametrize("rel", ["overlays/demo", "examples/external-worker"])
def test_cpu_renders_request_no_gpu(rel):
    docs = render(rel)
    assert GPU not in _render_text(rel)
    for d in of_kind(docs, "Deployment"):
        assert not _gpu_quantities(d), d["metadata"]["name"]
    for d in workers(docs):
        assert arg_value(main_container(d)["args"], "--device") == "cpu"


# --------------------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuations joined, heredoc
    bodies (RUN <<'EOF' ... EOF) skipped."""
    out: list[tuple[str, str]] = []
    lines = iter(path.read_text().splitlines())
    pending = ""
    for raw in lines:
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instr, _, rest = full.partition(" ")
        out.append((instr.upper(), rest.strip()))
        heredoc = re.search(r"<<-?\s*['\"]?([A-Za-z_][A-Za-z0-9_]*)['\"]?", rest)
        if instr.upper() in ("RUN", "COPY") and heredoc:
            end = heredoc.group(1)
            for body in lines:
                if body.strip() == end:
                    break
    return out


DOCKERFILES = {
    # image -> (Dockerfile, console script, port, manifest holding its Deployment)
    "worker": (REPO / "worker/Dockerfile", "coolfusion-worker", WORKER_PORT, K8S / "worker/deployment.yaml"),
    "orchestrator": (
        REPO / "orchestrator/Dockerfile",
        "coolfusion-orchestrator",
        ORCH_PORT,
        K8S / "base/orchestrator-deployment.yaml",
    ),
}


def _instr(name: str, kind: str) -> list[str]:
    return [args for i, args in dockerfile_instructions(DOCKERFILES[name][0]) if i == kind]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_entrypoint_is_a_console_script(name):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    [entry] = _instr(name, "ENTRYPOINT")
    argv = json.loads(entry)  # exec form, so SIGTERM reaches the Python process
    assert argv == [DOCKERFILES[name][1]]
    assert argv[0] in scripts


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_expose_matches_manifest(name):
    _, _, port, manifest = DOCKERFILES[name]
    exposed = [int(p.split("/")[0]) for e in _instr(name, "EXPOSE") for p in e.split()]
    assert exposed == [port]
    deploy = yaml.safe_load(manifest.read_text())
    container = main_container(deploy)
    assert grpc_port(container) == port
    assert arg_value(container["args"], "--port") == str(port)
    assert container["image"].split(":")[0].endswith(f"coolfusion-{name}")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_as_non_root_and_stops_with_sigterm(name):
    users = _instr(name, "USER")
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    deploy = yaml.safe_load(DOCKERFILES[name][3].read_text())
    if user.isdigit():  # runAsNonRoot can only verify a numeric UID
        assert deploy["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user)
    assert _instr(name, "STOPSIGNAL") == ["SIGTERM"]


def test_worker_dockerfile_keeps_base_torch():
    [base] = _instr("worker", "FROM")
    image, _, tag = base.partition(":")
    assert image == "pytorch/pytorch" and "cuda" in tag and tag.endswith("-runtime"), base
    runs = " ".join(_instr("worker", "RUN"))
    assert re.search(r"pip install [^&]*\[worker\]", runs), "installs the worker extra"
    assert "--constraint" in runs, "pin torch to the base image's build"
    assert "PRESET" in " ".join(_instr("worker", "ARG"))


def test_orchestrator_dockerfile_is_slim_and_torch_free():
    [base] = _instr("orchestrator", "FROM")
    assert base.startswith("python:3.11-slim"), base
    runs = " ".join(_instr("orchestrator", "RUN"))
    assert re.search(r"pip install (\.|/src)(\s|$)", runs), "installs the base package"
    assert "[worker]" not in runs
    assert "torch" not in runs.replace('! python -c "import torch"', "")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_has_no_secrets(name):
    for kind in ("ENV", "ARG"):
        for args in _instr(name, kind):
            assert not re.search(r"(TOKEN|PASSWORD|SECRET|API_KEY)", args, re.IGNORECASE), args


def test_dockerignore_keeps_context_small():
    patterns = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".venv", ".git", "node_modules", "**/__pycache__"):
        assert needed in patterns, needed
