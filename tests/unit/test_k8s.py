"""Offline checks of the deployment artefacts: k8s/ (kustomize), the Dockerfiles, and the plan of the
containerized cluster check.

Every overlay and example is rendered with `kubectl kustomize`,
schema-validated with `kubernetes-validate --strict`, then checked for the properties the
runtime relies on: native gRPC probes (HTTP ones for the gateway), headless worker Services,
a registry that names Services which really exist, drain time below
terminationGracePeriodSeconds, GPU limits only where intended, NetworkPolicies that let only
the orchestrator reach workers and Prometheus in the monitoring namespace reach every metrics
port, the demo's trio under its pooled calibration. The container check (scripts/cluster_check.py)
plans the overlays it runs here without starting anything, so a manifest field it cannot run fails
`make test` rather than the next container run. Render tests skip only when kubectl is absent; the
Dockerfile checks always run.
"""

from __future__ import annotations

import functools
import importlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from coolfusion.calibration import load_calibration
from coolfusion.orchestrator.registry import parse_registry
from coolfusion.worker.model_files import PRESETS

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"

# Schemas bundled with kubernetes-validate==1.37.0 go from 1.25 to 1.37. 1.32 matches the
# kubectl/kustomize used here and is a version every current managed offering runs.
K8S_VERSION = "1.32.0"

NAMESPACE = "coolfusion"
WORKER_PORT = 50051
ORCH_PORT = 50050
GATEWAY_PORT = 8000
MONITORING = "monitoring"  # the namespace whose Prometheus may scrape every metrics port
DEFAULT_GRACE_S = 20  # the CLIs' --grace-s default
REGISTRY_PATH = "/etc/coolfusion/workers.yaml"
GPU = "nvidia.com/gpu"

RENDERS = [
    "overlays/demo",
    "overlays/gpu",
    "overlays/gpu-vllm",
    "examples/external-worker",
    "examples/large-model",
    "examples/secure-demo",
]
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
    """A label selector (matchLabels and `In` matchExpressions, or a Service's plain selector
    dict) vs labels; an empty selector matches nothing here, so a typo cannot open everything."""
    expressions = selector.get("matchExpressions", [])
    assert all(e["operator"] == "In" for e in expressions), "only In expressions are used here"
    wanted = selector.get("matchLabels", {} if expressions else selector)
    if not (wanted or expressions):
        return False
    return all(labels.get(k) == v for k, v in wanted.items()) and all(
        labels.get(e["key"]) in e["values"] for e in expressions
    )


def is_worker(deploy: dict) -> bool:
    return pod_labels(deploy).get("app.kubernetes.io/component") == "worker"


def is_orchestrator(deploy: dict) -> bool:
    return pod_labels(deploy).get("app.kubernetes.io/component") == "orchestrator"


def is_gateway(deploy: dict) -> bool:
    return pod_labels(deploy).get("app.kubernetes.io/component") == "gateway"


def workers(docs) -> list[dict]:
    return [d for d in of_kind(docs, "Deployment") if is_worker(d)]


def orchestrator(docs) -> dict:
    found = [d for d in of_kind(docs, "Deployment") if is_orchestrator(d)]
    assert len(found) == 1, "expected exactly one orchestrator Deployment"
    return found[0]


def gateway(docs) -> dict:
    found = [d for d in of_kind(docs, "Deployment") if is_gateway(d)]
    assert len(found) == 1, "expected exactly one gateway Deployment"
    return found[0]


def main_container(deploy: dict) -> dict:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{deploy['metadata']['name']}: expected one container"
    return containers[0]


def named_port(container: dict, name: str) -> int:
    ports = [p for p in container.get("ports", []) if p.get("name") == name]
    assert len(ports) == 1, f"container {container['name']} needs one port named {name}"
    return ports[0]["containerPort"]


def grpc_port(container: dict) -> int:
    return named_port(container, "grpc")


def serving_port(container: dict) -> int:
    """The port callers use: grpc for the gRPC servers, http for the gateway."""
    names = {p.get("name") for p in container.get("ports", [])}
    return named_port(container, "http" if "http" in names else "grpc")


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
    deploys = [d for d in of_kind(docs, "Deployment") if not is_gateway(d)]
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
def test_gateway_probes_are_http_on_the_http_port(rel):
    container = main_container(gateway(render(rel)))
    paths = {"startupProbe": "/health", "readinessProbe": "/health/ready", "livenessProbe": "/health"}
    for probe, path in paths.items():
        handler = container[probe]
        assert {"grpc", "httpGet", "tcpSocket", "exec"} & set(handler) == {"httpGet"}, probe
        assert handler["httpGet"]["path"] == path and handler["httpGet"]["port"] in ("http", GATEWAY_PORT), probe
    # The readiness check waits up to 2 s for the orchestrator: the probe must wait longer.
    assert container["readinessProbe"]["timeoutSeconds"] > 2


def policies_selecting(docs: list[dict], deploy: dict) -> list[dict]:
    selecting = [p for p in of_kind(docs, "NetworkPolicy") if matches(p["spec"]["podSelector"], pod_labels(deploy))]
    assert selecting, f"no NetworkPolicy selects {deploy['metadata']['name']}"
    assert all("Ingress" in p["spec"]["policyTypes"] for p in selecting)
    return selecting


def is_metrics_rule(rule: dict) -> bool:
    """Prometheus's rule: from the monitoring namespace only, to the `metrics` port only."""
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": MONITORING}}}
    return rule.get("from") == [monitoring] and rule.get("ports") == [{"protocol": "TCP", "port": "metrics"}]


def serving_rules(docs: list[dict], deploy: dict) -> list[dict]:
    """The ingress rules of the policies selecting `deploy`, Prometheus's aside."""
    rules = [r for p in policies_selecting(docs, deploy) for r in p["spec"].get("ingress", [])]
    return [r for r in rules if not is_metrics_rule(r)]


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_network_policy_only_orchestrator_reaches_workers(rel):
    docs = render(rel)
    orch_labels = pod_labels(orchestrator(docs))
    for d in workers(docs):
        labels = pod_labels(d)
        rules = serving_rules(docs, d)
        assert rules, "worker ingress must be allowed from the orchestrator"
        for rule in rules:
            assert rule.get("from"), "a rule without `from` admits every source"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"unexpected peer {peer}"
                assert matches(peer["podSelector"], orch_labels)
                assert not matches(peer["podSelector"], labels)
            assert rule.get("ports") == [{"protocol": "TCP", "port": WORKER_PORT}]

    for rule in serving_rules(docs, orchestrator(docs)):
        assert [port["port"] for port in rule["ports"]] == [ORCH_PORT]


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_network_policy_opens_the_gateway_on_its_http_port_only(rel):
    docs = render(rel)
    rules = serving_rules(docs, gateway(docs))
    assert rules and all([port["port"] for port in rule["ports"]] == [GATEWAY_PORT] for rule in rules)
    assert serving_port(main_container(gateway(docs))) == GATEWAY_PORT


def scrape_namespaces(docs: list[dict], deploy: dict) -> set[str]:
    """Namespaces (by name) whose pods the policies selecting `deploy` admit to its metrics port."""
    port = named_port(main_container(deploy), "metrics")
    admitted = set()
    for policy in policies_selecting(docs, deploy):
        for rule in policy["spec"].get("ingress", []):
            if not any(p.get("port") in ("metrics", port) and p.get("protocol", "TCP") == "TCP" for p in rule["ports"]):
                continue
            for peer in rule.get("from", []):
                # A namespaceSelector without a podSelector admits every pod of those namespaces.
                if set(peer) == {"namespaceSelector"}:
                    admitted.add(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
    return admitted


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_prometheus_in_the_monitoring_namespace_may_scrape_every_metrics_port(rel):
    docs = render(rel)
    deploys = of_kind(docs, "Deployment")
    assert {pod_labels(d)["app.kubernetes.io/component"] for d in deploys} == {"worker", "orchestrator", "gateway"}
    for d in deploys:
        assert scrape_namespaces(docs, d) == {MONITORING}, d["metadata"]["name"]


@needs_kubectl
def test_the_monitoring_namespace_is_one_patch_away(tmp_path):
    # The patch docs/deployment.md documents, on top of an overlay.
    overlay = os.path.relpath(K8S / "overlays/demo", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"""
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [{overlay}]
patches:
  - target: {{kind: NetworkPolicy, name: coolfusion-metrics-ingress}}
    patch: |-
      - op: replace
        path: /spec/ingress/0/from/0/namespaceSelector/matchLabels/kubernetes.io~1metadata.name
        value: prometheus
""")
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(tmp_path)], check=True, capture_output=True, text=True, timeout=120
    )
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    for d in of_kind(docs, "Deployment"):
        assert scrape_namespaces(docs, d) == {"prometheus"}, d["metadata"]["name"]


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
@pytest.mark.parametrize(("component", "port"), [("orchestrator", ORCH_PORT), ("gateway", GATEWAY_PORT)])
def test_stateless_tiers_have_service_hpa_pdb(rel, component, port):
    docs = render(rel)
    deploy = orchestrator(docs) if component == "orchestrator" else gateway(docs)
    name = deploy["metadata"]["name"]
    assert deploy["spec"]["replicas"] == 2
    container = main_container(deploy)
    assert serving_port(container) == port
    assert "torch" not in container["image"]

    svc = by_name(docs, "Service")[name]
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert svc["spec"].get("clusterIP") != "None"
    assert matches(svc["spec"]["selector"], pod_labels(deploy))
    port_name = "grpc" if component == "orchestrator" else "http"
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [(port_name, port)]

    hpa = by_name(docs, "HorizontalPodAutoscaler")[name]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert hpa["spec"]["minReplicas"] >= 2
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])

    pdb = by_name(docs, "PodDisruptionBudget")[name]
    assert matches(pdb["spec"]["selector"], pod_labels(deploy))
    others = [d for d in of_kind(docs, "Deployment") if d is not deploy]
    assert not any(matches(pdb["spec"]["selector"], pod_labels(d)) for d in others)


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_the_gateway_calls_every_orchestrator_pod_through_a_headless_service(rel):
    docs = render(rel)
    target = arg_value(main_container(gateway(docs))["args"], "--orchestrator")
    assert target.startswith("dns:///")  # resolved by the gateway itself, one address per pod
    host, _, port = target.removeprefix("dns:///").rpartition(":")
    service = by_name(docs, "Service")[host.split(".")[0]]
    assert service["spec"].get("clusterIP") == "None"
    assert matches(service["spec"]["selector"], pod_labels(orchestrator(docs)))
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_metrics_port_flag_matches_the_metrics_container_port(rel):
    for d in of_kind(render(rel), "Deployment"):
        name, c = d["metadata"]["name"], main_container(d)
        ports = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == "metrics"]
        assert len(ports) == 1, f"{name}: needs one container port named metrics"
        assert arg_value(c["args"], "--metrics-port") == str(ports[0]), f"{name}: --metrics-port"
        assert ports[0] != serving_port(c)
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
@pytest.mark.parametrize("rel", ["overlays/gpu", "overlays/gpu-vllm"])
def test_gpu_overlay_workers_get_one_gpu(rel):
    docs = render(rel)
    for d in workers(docs):
        c = main_container(d)
        assert str(c["resources"]["limits"][GPU]) == "1", d["metadata"]["name"]
        assert arg_value(c["args"], "--device") == "cuda"
        assert arg_value(c["args"], "--dtype") == "bfloat16"
        tol = d["spec"]["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == GPU and t["operator"] == "Exists" for t in tol)
        # Only the worker container holds the GPU.
        assert _gpu_quantities(d) == [("worker", "limits", 1)]
    assert not _gpu_quantities(orchestrator(docs)) and not _gpu_quantities(gateway(docs))


@needs_kubectl
@pytest.mark.parametrize("rel", ["overlays/demo", "examples/external-worker", "examples/secure-demo"])
def test_cpu_renders_request_no_gpu(rel):
    docs = render(rel)
    assert GPU not in _render_text(rel)
    for d in of_kind(docs, "Deployment"):
        assert not _gpu_quantities(d), d["metadata"]["name"]
    for d in workers(docs):
        assert arg_value(main_container(d)["args"], "--device") == "cpu"


# Beside the weights --max-memory lets it keep in CPU memory, a large-model worker's pod needs room
# for the process itself: the Python runtime, CUDA's host-side state and the buffers of loading.
LARGE_MODEL_POD_OVERHEAD = 16 * 2**30
_QUANTITY = re.compile(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?")
_QUANTITY_UNITS = {
    None: 1,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}


def memory_bytes(quantity: str) -> int:
    match = _QUANTITY.fullmatch(str(quantity))
    assert match, f"unexpected memory quantity {quantity!r}"
    return int(match[1]) * _QUANTITY_UNITS[match[2]]


@needs_kubectl
def test_large_model_pod_holds_its_gpus_and_the_cpu_weights_max_memory_allows():
    from coolfusion.worker.__main__ import parse_settings  # torch-free: flag parsing only

    docs = render("examples/large-model")
    [large] = [d for d in workers(docs) if arg_value(main_container(d)["args"], "--device-map")]
    container = main_container(large)
    settings = parse_settings(container["args"])  # the worker's own parser accepts the rendered flags
    assert settings.device_map == "auto" and settings.model
    limits = dict(settings.max_memory)
    gpus = sorted(device for device in limits if device.startswith("cuda:"))
    assert len(gpus) > 1 and gpus == [f"cuda:{i}" for i in range(len(gpus))], "cuda entries must be 0..N-1"
    assert _gpu_quantities(large) == [("worker", "limits", len(gpus))], "one GPU per cuda entry of --max-memory"
    resources = container["resources"]
    memory_limit = memory_bytes(resources["limits"]["memory"])
    assert memory_limit >= limits["cpu"] + LARGE_MODEL_POD_OVERHEAD, "the pod must fit --max-memory's cpu entry"
    assert memory_bytes(resources["requests"]["memory"]) <= memory_limit
    spec = large["spec"]["template"]["spec"]
    assert any(t["key"] == GPU and t["operator"] == "Exists" for t in spec["tolerations"])
    assert large["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a rollout must not need more GPUs"
    # The default pair beside it keeps one GPU each.
    others = [d for d in workers(docs) if d is not large and "--engine" not in main_container(d)["args"]]
    assert len(others) == 2 and all(_gpu_quantities(d) == [("worker", "limits", 1)] for d in others)


@needs_kubectl
@pytest.mark.parametrize("rel", ["overlays/gpu-vllm", "examples/large-model"])
def test_vllm_workers_run_the_vllm_image_with_a_gpu_per_tensor_parallel_rank(rel):
    from coolfusion.worker.__main__ import parse_settings  # torch-free: flag parsing only

    vllm_workers = [d for d in workers(render(rel)) if arg_value(main_container(d)["args"], "--engine") == "vllm"]
    assert vllm_workers, f"{rel} runs no vLLM worker"
    for d in vllm_workers:
        container = main_container(d)
        settings = parse_settings(container["args"])  # the worker's own parser accepts the rendered flags
        assert container["image"].startswith("coolfusion-worker-vllm:"), d["metadata"]["name"]
        assert _gpu_quantities(d) == [("worker", "limits", settings.vllm.tensor_parallel_size)]
        # The init container seeds the model cache from the transformers image, which converts presets.
        [seed] = d["spec"]["template"]["spec"]["initContainers"]
        assert seed["image"].startswith("coolfusion-worker:")


# Flags that name a file the server reads at start-up (or again when it changes).
FILE_FLAGS = (
    "--workers", "--tls-cert", "--tls-key", "--tls-client-ca", "--auth-token-file",
    "--orchestrator-ca", "--orchestrator-cert", "--orchestrator-key", "--orchestrator-token-file",
)  # fmt: skip


def mounted(container: dict, path: str) -> bool:
    return any(
        path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
        for m in container.get("volumeMounts", [])
    )


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_every_file_a_server_reads_is_on_a_volume_of_its_container(rel):
    docs = render(rel)
    for d in of_kind(docs, "Deployment"):
        container = main_container(d)
        for flag in FILE_FLAGS:
            if path := arg_value(container["args"], flag):
                assert mounted(container, path), f"{d['metadata']['name']}: {flag} {path} is on no volume"
    # The registry's credentials are read by the orchestrator.
    container = main_container(orchestrator(docs))
    for entry in registry(docs)[1]:
        for path in filter(None, [entry.get("token_file"), *(entry.get("tls") or {}).values()]):
            if path.startswith("/"):
                assert mounted(container, path), f"{entry['name']}: {path} is not on a volume of the orchestrator"


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_the_gateway_probes_use_https_exactly_when_it_serves_it(rel):
    container = main_container(gateway(render(rel)))
    https = arg_value(container["args"], "--tls-cert") is not None
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"].get("scheme", "HTTP") == ("HTTPS" if https else "HTTP"), probe


def worker_presets(docs) -> dict[str, str]:
    """Worker Service name -> the preset its Deployment serves (None for a --model worker)."""
    return {d["metadata"]["name"]: arg_value(main_container(d)["args"], "--preset") for d in workers(docs)}


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_every_preset_the_manifests_serve_is_one_the_worker_image_can_bake(rel):
    for name, preset in worker_presets(render(rel)).items():
        assert preset is None or preset in PRESETS, f"{name}: unknown preset {preset}"


@needs_kubectl
def test_the_demo_serves_the_trio_under_the_calibration_fitted_for_it():
    docs = render("overlays/demo")
    _, entries = registry(docs)
    presets = worker_presets(docs)
    served = {e["name"]: presets[ADDRESS.match(e["address"])["host"].split(".")[0]] for e in entries}
    assert set(served.values()) == set(PRESETS), "the demo serves every preset (the trio)"

    args = main_container(orchestrator(docs))["args"]
    path = Path(arg_value(args, "--calibration"))
    # The orchestrator image shows calibration/fitted/ at /opt/coolfusion/calibrations (its Dockerfile).
    assert path.parent == Path("/opt/coolfusion/calibrations")
    calibration = load_calibration(REPO / "calibration" / "fitted" / path.name)
    assert arg_value(args, "--default-calibration") == calibration.name == "pooled-smollm2-gemma3-qwen"
    # Fitted for these workers, in the registry's order (the fusion's), serving these models.
    assert calibration.worker_names == tuple(served)
    assert {w.name: w.model_id for w in calibration.workers} == served


def _load_script(name: str):
    """A module of scripts/ (they import each other by file name, as when run)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "scripts"))


@needs_kubectl
def test_the_container_check_runs_the_demo_as_its_manifests_configure_it(tmp_path, monkeypatch):
    cluster_check = _load_script("cluster_check")
    # Recorded rather than done: giving files away needs root, which the check has and `make test` may not.
    owners = {}
    monkeypatch.setattr(
        cluster_check.os, "chown", lambda path, uid, gid: owners.setdefault(Path(path).name, (uid, gid))
    )
    plan = cluster_check.plan(render("overlays/demo"), ipaddress.IPv4Network("10.89.200.0/24"), tmp_path, "test")

    deployments = of_kind(render("overlays/demo"), "Deployment")
    assert len(plan.main) == sum(d["spec"]["replicas"] for d in deployments)
    for container in plan.init + plan.main:
        argv = container.argv
        assert {"--read-only", "--read-only-tmpfs=false", "--cap-drop=all", "no-new-privileges"} <= set(argv)
        assert argv[argv.index("--user") + 1] == "10001:10001"
    # Only the volumes the manifests mount are writable: each pod's emptyDirs, owned as fsGroup makes them.
    assert owners["model-cache"] == owners["tmp"] == (10001, 10001)
    # The orchestrator reads the overlay's registry, and reaches the workers by their Services' names.
    assert [e["name"] for e in plan.registry] == ["smollm2", "gemma3", "qwen"]
    assert cluster_check.registry_presets(plan) == list(PRESETS)
    assert cluster_check.default_calibration(plan) == "pooled-smollm2-gemma3-qwen"
    [orchestrator_argv, *_] = [c.argv for c in plan.main if "--workers" in c.args]
    for entry in plan.registry:
        host = ADDRESS.match(entry["address"])["host"]
        assert any(a.startswith(f"--add-host={host}:10.89.200.") for a in orchestrator_argv), host


@needs_kubectl
def test_the_container_check_makes_up_the_secrets_the_secure_demo_names(tmp_path, monkeypatch):
    cluster_check = _load_script("cluster_check")
    monkeypatch.setattr(cluster_check.os, "chown", lambda path, uid, gid: None)  # root's to do (see above)
    plan = cluster_check.plan(render("examples/secure-demo"), ipaddress.IPv4Network("10.89.200.0/24"), tmp_path, "t")
    url, token, ca_pem = cluster_check.gateway_call(plan, plan.gateways[0])
    assert url.startswith("https://10.89.200.") and token and "BEGIN CERTIFICATE" in ca_pem
    # The token the orchestrator accepts is the one the gateway sends; the workers' is another.
    gateway_files = plan.gateways[0].files
    orchestrator_files = next(c for c in plan.main if "--workers" in c.args).files
    sent = gateway_files["/var/run/secrets/coolfusion/orchestrator/token"].read_text()
    assert sent == orchestrator_files["/var/run/secrets/coolfusion/orchestrator/token"].read_text()
    assert sent != orchestrator_files["/var/run/secrets/coolfusion/worker/token"].read_text()
    assert oct(gateway_files["/etc/coolfusion/tls/gateway/tls.key"].stat().st_mode & 0o777) == "0o440"


def test_the_container_check_refuses_what_it_cannot_run(tmp_path):
    cluster_check = _load_script("cluster_check")
    deployment = yaml.safe_load((K8S / "base/gateway-deployment.yaml").read_text())
    deployment["metadata"]["namespace"] = NAMESPACE
    deployment["spec"]["template"]["spec"]["hostNetwork"] = True
    with pytest.raises(cluster_check.Unsupported, match="hostNetwork"):
        cluster_check.plan([deployment], ipaddress.IPv4Network("10.89.200.0/24"), tmp_path, "test")


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
    "worker-vllm": (REPO / "worker/vllm/Dockerfile", "coolfusion-worker", WORKER_PORT, K8S / "worker/deployment.yaml"),
    "orchestrator": (
        REPO / "orchestrator/Dockerfile",
        "coolfusion-orchestrator",
        ORCH_PORT,
        K8S / "base/orchestrator-deployment.yaml",
    ),
    "gateway": (REPO / "gateway/Dockerfile", "coolfusion-gateway", GATEWAY_PORT, K8S / "base/gateway-deployment.yaml"),
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
    assert serving_port(container) == port
    assert arg_value(container["args"], "--port") == str(port)
    # The vLLM worker shares the worker's manifest; components/vllm swaps its image (checked above).
    assert container["image"].split(":")[0].endswith(f"coolfusion-{name.removesuffix('-vllm')}")


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


def base_image(name: str) -> str:
    """The image a Dockerfile builds FROM, its build argument's default filled in."""
    instructions = dockerfile_instructions(DOCKERFILES[name][0])
    defaults = dict(arg.partition("=")[::2] for i, arg in instructions if i == "ARG")
    [base] = [args for i, args in instructions if i == "FROM"]
    return re.sub(r"\$\{(\w+)\}", lambda m: defaults[m[1]].strip('"'), base)


# The images install wheels only, from the folder scripts/images.py fills (no index, no network).
WHEEL_INSTALL = re.compile(
    r"pip install --no-index --find-links /src/build/wheelhouse --constraint /src/constraints.txt (?P<what>\S+)"
)


def installs(name: str) -> list[str]:
    return [m["what"].strip('"') for m in WHEEL_INSTALL.finditer(" ".join(_instr(name, "RUN")))]


@pytest.mark.parametrize("name", ["worker", "orchestrator", "gateway"])
def test_images_build_from_a_public_base_given_as_a_build_argument(name):
    # A machine without registry access builds the same Dockerfile on a stand-in (scripts/images.py).
    assert _instr(name, "FROM") == ["${BASE_IMAGE}"]
    assert base_image(name) == "python:3.11-slim-bookworm"


def test_worker_image_installs_the_worker_extra_and_checks_the_torch_variant():
    assert installs("worker") == ["coolfusion[worker]"]
    runs = " ".join(_instr("worker", "RUN"))
    assert "torch.version.cuda" in runs and "$TORCH_VARIANT" in runs, "the torch build is the variant asked for"
    assert "TORCH_VARIANT=cpu" in _instr("worker", "ARG")


def test_worker_image_bakes_the_presets_the_code_knows():
    assert 'PRESETS=""' in _instr("worker", "ARG")
    runs = " ".join(_instr("worker", "RUN"))
    assert "scripts/bake_presets.py bake --wheels /src/build/wheelhouse $PRESETS" in runs
    # The list of presets and their packages come from PRESETS, not from a copy in the Dockerfile
    # (its comments may name some in an example).
    instructions = " ".join(args for _, args in dockerfile_instructions(DOCKERFILES["worker"][0]))
    for preset in PRESETS.values():
        packages = [word.split("==")[0] for word in preset.pip_command.split()[2:] if not word.startswith("-")]
        assert not [name for name in (preset.name, *packages) if name in instructions], preset.name


def test_orchestrator_image_is_slim_and_torch_free():
    assert installs("orchestrator") == ["coolfusion"]
    runs = " ".join(_instr("orchestrator", "RUN"))
    assert "[worker]" not in runs
    assert "torch" not in runs.replace('! python3 -c "import torch"', "")


def test_orchestrator_image_shows_the_shipped_calibrations_where_the_demo_names_them():
    runs = " ".join(_instr("orchestrator", "RUN"))
    assert "/opt/coolfusion/calibrations" in runs and "coolfusion.calibration" in runs


def test_gateway_image_is_slim_and_torch_free():
    assert installs("gateway") == ["coolfusion[gateway]"]
    runs = " ".join(_instr("gateway", "RUN"))
    assert "[worker]" not in runs and "[dev]" not in runs
    assert "torch" not in runs.replace('! python3 -c "import torch"', "")


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
    for needed in (".venv", ".git", "node_modules", "**/__pycache__", "build/*"):
        assert needed in patterns, needed
    # The one build output the images read (RUN --mount=type=bind of the context).
    assert "!build/wheelhouse" in patterns


@needs_kubectl
@pytest.mark.parametrize("rel", RENDERS)
def test_every_image_is_tagged_with_the_package_version(rel):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for d in of_kind(render(rel), "Deployment"):
        spec = d["spec"]["template"]["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            name, _, tag = container["image"].rpartition(":")
            if name.rsplit("/", 1)[-1].startswith("coolfusion-"):
                assert tag == version, f"{d['metadata']['name']}: {container['image']}"
