"""deploy/k8s/: every kustomization renders (kubectl kustomize) and its objects pass kubernetes-validate --strict.

Kinds without a schema there (ServiceMonitor) are checked here against what they must point at; and the
objects must agree with each other and with the server: probes on /ready and /health, selectors that
match the pods, an HPA on a metric the server exports and prometheus-adapter serves.
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
    for doc in render(folder):
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unknown.append(doc["kind"])
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{folder.relative_to(K8S)}: {doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert set(unknown) <= {"ServiceMonitor"}, unknown  # custom resources, checked below


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
