"""deploy/k8s/: every kustomization renders (kubectl kustomize) and its objects pass kubernetes-validate --strict.

Kinds without a schema there (ServiceMonitor; the Gateway API and inference-extension objects of the
gateway-inference overlay, whose CRD schemas no PyPI package ships) are checked here against the fields their
API defines, and against what they must point at in test_k8s_gateway.py; and the objects must agree with each
other and with the server: probes on /ready and /health, selectors that match the pods, an HPA on a metric the
server exports and prometheus-adapter serves.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.metrics import Metrics, MetricsConfig
from tests.helpers.dev_tools import tool

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
K8S_VERSION = "1.32"
# Custom resources: kubernetes-validate has no schema for them (checked below, field by field and by reference).
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}


def render(folder: Path) -> list[dict]:
    result = subprocess.run([tool("kubectl"), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(K8S / "base")


def test_there_is_a_base(base):
    assert K8S / "base" in KUSTOMIZATIONS and {d["kind"] for d in base} >= {
        "Deployment",
        "Service",
        "ServiceMonitor",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
    }


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_every_kustomization_renders_and_validates_strictly(folder):
    unknown = []
    docs = render(folder)
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unknown.append((doc["apiVersion"], doc["kind"]))
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{folder.relative_to(K8S)}: {doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert set(unknown) <= CUSTOM_KINDS, unknown  # custom resources, checked below
    check_custom_fields(docs)


def test_strict_validation_does_refuse_an_unknown_field(base):
    deployment = by_kind(base, "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_probes_resources_and_volumes(base):
    pod = by_kind(base, "Deployment")[0]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == {"/var/cache/loraplex", "/data/adapters"} and set(mounts.values()) <= set(volumes)
    claim = volumes[mounts["/data/adapters"]]["persistentVolumeClaim"]["claimName"]
    [pvc] = [p for p in by_kind(base, "PersistentVolumeClaim") if p["metadata"]["name"] == claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every replica reads the same store
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001  # the image's user


def test_selectors_match_the_pods(base):
    deployment = by_kind(base, "Deployment")[0]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = by_kind(base, "Service")[0]
    assert selects(service["spec"]["selector"], pod_labels)
    assert selects(by_kind(base, "PodDisruptionBudget")[0]["spec"]["selector"]["matchLabels"], pod_labels)
    monitor = by_kind(base, "ServiceMonitor")[0]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert all(e["port"] in port_names and e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in container["ports"]}


def test_the_hpa_scales_the_deployment_on_a_metric_the_server_exports_and_the_adapter_serves(base):
    hpa = by_kind(base, "HorizontalPodAutoscaler")[0]
    deployment = by_kind(base, "Deployment")[0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    [metric] = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    exported = {m.name for m in Metrics(MetricsConfig()).registry.collect()}
    assert name in exported
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())["rules"]
    assert any(r["name"]["as"] == name and name in r["seriesQuery"] for r in rules)
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


# -- the gateway-inference overlay (GIE v1.0.1: InferencePool, endpoint picker, Gateway, HTTPRoute) -------------

# The fields the Gateway API inference extension's InferencePool v1 (GIE v1.0.x API reference) and the Gateway API v1
# Gateway and HTTPRoute define, as far as this overlay may use them: a key outside them is a typo or a field of
# another version (such as the pre-GA endpointPickerRef.portNumber), which the API server would refuse. A dict maps
# field names (or "*", any name) to their shape, a one-element list is a list of that shape, a set an enum, a type a
# leaf; `object` is a sub-tree left unchecked.
META = {"name": str, "namespace": str, "labels": {"*": str}, "annotations": {"*": str}}
PORT = {"number": int}
ROUTE_MATCH = {
    "path": {"type": {"Exact", "PathPrefix", "RegularExpression"}, "value": str},
    "headers": object,
    "queryParams": object,
    "method": {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"},
}
SHAPES = {
    ("inference.networking.k8s.io/v1", "InferencePool"): {
        "apiVersion": str,
        "kind": str,
        "metadata": META,
        "spec": {
            "selector": {"matchLabels": {"*": str}},
            "targetPorts": [PORT],
            "endpointPickerRef": {
                "group": str,
                "kind": str,
                "name": str,
                "port": PORT,
                "failureMode": {"FailOpen", "FailClose"},
            },
        },
    },
    ("gateway.networking.k8s.io/v1", "Gateway"): {
        "apiVersion": str,
        "kind": str,
        "metadata": META,
        "spec": {
            "gatewayClassName": str,
            "addresses": object,
            "infrastructure": object,
            "listeners": [
                {
                    "name": str,
                    "hostname": str,
                    "port": int,
                    "protocol": str,
                    "tls": object,
                    "allowedRoutes": {
                        "namespaces": {"from": {"All", "Same", "Selector"}, "selector": object},
                        "kinds": [{"group": str, "kind": str}],
                    },
                }
            ],
        },
    },
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): {
        "apiVersion": str,
        "kind": str,
        "metadata": META,
        "spec": {
            "parentRefs": [{"group": str, "kind": str, "namespace": str, "name": str, "sectionName": str, "port": int}],
            "hostnames": [str],
            "rules": [
                {
                    "name": str,
                    "matches": [ROUTE_MATCH],
                    "filters": object,
                    "backendRefs": [
                        {
                            "group": str,
                            "kind": str,
                            "name": str,
                            "namespace": str,
                            "port": int,
                            "weight": int,
                            "filters": object,
                        }
                    ],
                    "timeouts": {"request": str, "backendRequest": str},
                    "retry": object,
                    "sessionPersistence": object,
                }
            ],
        },
    },
}

def check_fields(value, shape, where: str) -> None:
    """Fail on a field that ``shape`` (see SHAPES) does not define, or a value of the wrong type."""
    if shape is object:
        return
    if isinstance(shape, dict):
        assert isinstance(value, dict), f"{where}: a mapping expected"
        for key, item in value.items():
            assert key in shape or "*" in shape, f"{where}.{key}: no such field"
            check_fields(item, shape.get(key, shape.get("*")), f"{where}.{key}")
    elif isinstance(shape, list):
        assert isinstance(value, list), f"{where}: a list expected"
        for i, item in enumerate(value):
            check_fields(item, shape[0], f"{where}[{i}]")
    elif isinstance(shape, set):
        assert value in shape, f"{where}: {value!r} is not one of {sorted(shape)}"
    else:
        assert isinstance(value, shape) and not isinstance(value, bool), f"{where}: {shape.__name__} expected"


def check_custom_fields(docs: list[dict]) -> None:
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in SHAPES:
            check_fields(doc, SHAPES[doc["apiVersion"], doc["kind"]], doc["kind"])
