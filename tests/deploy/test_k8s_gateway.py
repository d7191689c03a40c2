"""deploy/k8s/overlays/gateway-inference: the InferencePool, the endpoint picker (EPP), the Gateway and HTTPRoute.

Custom resources have no schema in kubernetes-validate, so what must hold is checked by reference: the pool
selects the server pods on their port, the picker serves that pool and reads metrics the server really exports,
the route sends only generation requests to the pool, RBAC covers what the picker watches; and each check is
shown to fail on a broken render.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics, MetricsConfig
from tests.deploy.test_k8s import K8S, by_kind, check_custom_fields, render, selects

GIE = K8S / "overlays" / "gateway-inference"

# The metric flags of the EPP (GIE v1.0.1, cmd/epp/runner) and what each must read from the server's /metrics.
METRIC_FLAGS = ("total-queued-requests-metric", "kv-cache-usage-percentage-metric", "lora-info-metric")
LORA_INFO_LABELS = {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}  # vLLM's, parsed by the EPP
# The EPP's in-tree plugins (GIE v1.0.x runner) and the permissions its controllers need in the pool's namespace.
EPP_PLUGINS = {
    "lora-affinity-scorer",
    "queue-scorer",
    "kv-cache-utilization-scorer",
    "prefix-cache-scorer",
    "max-score-picker",
    "random-picker",
    "weighted-random-picker",
    "single-profile-handler",
}
WATCH = {"get", "list", "watch"}
GENERATION_ROUTES = {("POST", "/v1/completions"), ("POST", "/v1/chat/completions")}
WAITING, RUNNING, KV_USAGE, LORA = 3, 2, 0.25, ({"sql-expert"}, {"poet"}, 4)


def named(docs: list[dict], kind: str, name: str, namespace: str | None = None) -> dict:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    if namespace is not None:
        found = [d for d in found if d["metadata"].get("namespace") == namespace]
    assert len(found) == 1, f"{kind}/{name} in {namespace}: {len(found)} found"
    return found[0]


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def server_deployment(docs: list[dict]) -> dict:
    [server] = [d for d in by_kind(docs, "Deployment") if pod_labels(d).get("app.kubernetes.io/component") == "server"]
    return server


def flags(container: dict) -> dict[str, str]:
    """The container's ``--name=value`` arguments (every EPP flag is given in that form here)."""
    out = {}
    for arg in container["args"]:
        assert arg.startswith("--") and "=" in arg, f"give the EPP's flags as --name=value: {arg}"
        name, value = arg[2:].split("=", 1)
        assert name not in out, f"--{name} given twice"
        out[name] = value
    return out


def metric_spec(spec: str) -> tuple[str, dict[str, str]]:
    """An EPP metric flag's value, ``name`` or ``name{label=value,...}``, as (name, labels)."""
    found = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?", spec)
    assert found, f"not a metric spec: {spec!r}"
    pairs = [p.split("=", 1) for p in found[2].split(",")] if found[2] else []
    return found[1], {k.strip(): v.strip().strip('"') for k, v in pairs}


def epp(docs: list[dict]) -> tuple[dict, dict, dict]:
    """(pool, EPP Deployment, EPP container), following the pool's endpointPickerRef to a Service and its pods.

    Fails unless the reference names a Service of the render, one of its ports, whose target is the container's
    gRPC (ext-proc) port.
    """
    [pool] = by_kind(docs, "InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref.get("group", "") == "" and ref.get("kind", "Service") == "Service", ref
    service = named(docs, "Service", ref["name"], pool["metadata"]["namespace"])
    ports = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert len(ports) == 1, f"the picker's port {ref['port']['number']} is not a port of Service/{ref['name']}"
    [port] = ports
    assert port.get("appProtocol") == "http2"  # ext-proc is gRPC
    deployments = [d for d in by_kind(docs, "Deployment") if selects(service["spec"]["selector"], pod_labels(d))]
    assert len(deployments) == 1, f"Service/{ref['name']} selects {len(deployments)} Deployments"
    [deployment] = deployments
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    [target] = [p for p in container["ports"] if port["targetPort"] in (p.get("name"), p["containerPort"])]
    assert target["containerPort"] == int(flags(container).get("grpc-port", "9002")), "not the EPP's gRPC port"
    return pool, deployment, container


def check_pool(docs: list[dict]) -> None:
    """The pool selects exactly the server pods, on the server container's port, in the server's namespace."""
    [pool] = by_kind(docs, "InferencePool")
    server = server_deployment(docs)
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selects(selector, pod_labels(server)), f"{selector} does not select the server pods"
    others = [d for d in by_kind(docs, "Deployment") if d is not server]
    also = [d["metadata"]["name"] for d in others if selects(selector, pod_labels(d))]
    assert not also, f"{selector} also selects the pods of {also}"
    assert pool["metadata"]["namespace"] == server["metadata"]["namespace"]
    [container] = server["spec"]["template"]["spec"]["containers"]
    http = [p["containerPort"] for p in container["ports"] if p["name"] == "http"]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == http


def check_epp_args(docs: list[dict]) -> None:
    """The EPP serves our pool: its name, namespace and API group."""
    pool, _, container = epp(docs)
    args = flags(container)
    assert args["pool-name"] == pool["metadata"]["name"]
    assert args["pool-namespace"] == pool["metadata"]["namespace"]
    assert args.get("pool-group", "inference.networking.k8s.io") == pool["apiVersion"].split("/")[0]
    assert re.fullmatch(r"registry\.k8s\.io/gateway-api-inference-extension/epp:v1\.\d+\.\d+", container["image"])


def check_epp_metrics(docs: list[dict], scraped: dict) -> None:
    """Each metric flag is set explicitly, to a gauge the server exports with the meaning the EPP gives it."""
    _, _, container = epp(docs)
    args = flags(container)
    samples = {}
    for flag in METRIC_FLAGS:
        assert flag in args, f"--{flag} must be set explicitly (the EPP's default is vLLM's name)"
        name, labels = metric_spec(args[flag])
        assert name in scraped, f"--{flag}={args[flag]}: the server exports no {name}"
        assert scraped[name].type == "gauge", f"--{flag}: {name} is a {scraped[name].type}"
        found = [s for s in scraped[name].samples if labels.items() <= s.labels.items()]
        assert found, f"--{flag}={args[flag]}: no series has those labels"
        samples[flag] = found
    assert [s.value for s in samples["total-queued-requests-metric"]] == [WAITING], "not the waiting queue"
    assert [s.value for s in samples["kv-cache-usage-percentage-metric"]] == [KV_USAGE], "not the KV-cache use"
    [lora] = samples["lora-info-metric"]
    assert set(lora.labels) >= LORA_INFO_LABELS, f"{lora.name} lacks vLLM's LoRA labels"
    running, waiting, max_lora = LORA
    assert lora.labels["running_lora_adapters"] == ",".join(running)
    assert lora.labels["waiting_lora_adapters"] == ",".join(waiting)
    assert lora.labels["max_lora"] == str(max_lora)
    assert abs(lora.value - time.time()) < 600, "vLLM's LoRA info gauge holds the time of its update"


def check_route(docs: list[dict]) -> None:
    """The route hangs off our Gateway, sends only the generation routes, and only to our pool."""
    [pool] = by_kind(docs, "InferencePool")
    [route] = by_kind(docs, "HTTPRoute")
    namespace = route["metadata"]["namespace"]
    for parent in route["spec"]["parentRefs"]:
        assert parent.get("group", "gateway.networking.k8s.io") == "gateway.networking.k8s.io", parent
        assert parent.get("kind", "Gateway") == "Gateway", parent
        gateway = named(docs, "Gateway", parent["name"], parent.get("namespace", namespace))
        allowed = [
            listener.get("allowedRoutes", {}).get("namespaces", {}).get("from", "Same")
            for listener in gateway["spec"]["listeners"]
        ]
        assert "All" in allowed or ("Same" in allowed and gateway["metadata"]["namespace"] == namespace), allowed
    routes = set()
    for rule in route["spec"]["rules"]:
        for backend in rule["backendRefs"]:
            assert backend.get("group") == "inference.networking.k8s.io" and backend.get("kind") == "InferencePool"
            assert backend["name"] == pool["metadata"]["name"], backend
            assert backend.get("namespace", namespace) == pool["metadata"]["namespace"]
        for match in rule["matches"]:
            assert match["path"]["type"] == "Exact", f"{match}: a prefix would also route other paths"
            routes.add((match.get("method"), match["path"]["value"]))
    assert routes == GENERATION_ROUTES, routes  # so /admin and the per-replica load/unload routes stay off


def check_rbac(docs: list[dict]) -> None:
    """The EPP's service account may watch its pool, the pods and InferenceObjectives, and review scrape tokens."""
    pool, deployment, _ = epp(docs)
    namespace = deployment["metadata"]["namespace"]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    named(docs, "ServiceAccount", account, namespace)
    rules = []
    for binding in by_kind(docs, "RoleBinding") + by_kind(docs, "ClusterRoleBinding"):
        if binding["kind"] == "RoleBinding" and binding["metadata"]["namespace"] != namespace:
            continue
        subject = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
        if any(subject.items() <= s.items() for s in binding["subjects"]):
            ref = binding["roleRef"]
            scope = binding["metadata"]["namespace"] if ref["kind"] == "Role" else None
            rules += named(docs, ref["kind"], ref["name"], scope)["rules"]
    needed = [
        ("", "pods", WATCH),
        (pool["apiVersion"].split("/")[0], "inferencepools", WATCH),
        ("inference.networking.x-k8s.io", "inferenceobjectives", WATCH),
        ("authentication.k8s.io", "tokenreviews", {"create"}),
        ("authorization.k8s.io", "subjectaccessreviews", {"create"}),
    ]
    for group, resource, verbs in needed:
        granted = set()
        for rule in rules:
            if {group, "*"} & set(rule["apiGroups"]) and {resource, "*"} & set(rule["resources"]):
                granted |= set(rule["verbs"])
        assert "*" in granted or verbs <= granted, f"{resource}.{group or 'core'}: {sorted(verbs - granted)} missing"


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(K8S / "base")


@pytest.fixture(scope="module")
def gie() -> list[dict]:
    return render(GIE)


@pytest.fixture(scope="module")
def scraped() -> dict:
    """What the EPP reads from a server with LORAPLEX_VLLM_METRICS=on, in a known state: metric families by name."""
    metrics = Metrics(MetricsConfig(vllm_compatible=True))
    metrics.model_name = "base"
    metrics.engine_state(
        running=RUNNING,
        waiting=WAITING,
        adapters_waiting=1,
        slots_used=1,
        slots_total=4,
        host_bytes=0,
        host_limit=1,
        kv_usage=KV_USAGE,
    )
    metrics.lora_requests(*LORA)
    return {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}


def test_the_gateway_overlay_adds_the_pool_the_picker_and_the_route(gie, base):
    kinds = {d["kind"] for d in gie}
    assert kinds >= {d["kind"] for d in base} | {"InferencePool", "Gateway", "HTTPRoute", "Role", "ServiceAccount"}
    [env] = [e for e in server_deployment(gie)["spec"]["template"]["spec"]["containers"][0]["env"]
             if e["name"] == "LORAPLEX_VLLM_METRICS"]
    assert env["value"] == "on"  # what the picker reads


def test_the_pool_selects_the_server_pods_on_their_port(gie):
    check_pool(gie)


def test_the_pool_names_the_picker_service_and_its_grpc_port(gie):
    epp(gie)


def test_the_picker_serves_our_pool(gie):
    check_epp_args(gie)


def test_the_picker_reads_metrics_the_server_exports(gie, scraped):
    check_epp_metrics(gie, scraped)


def test_the_route_sends_only_generation_requests_to_the_pool(gie):
    check_route(gie)
    from server.api.routes import chat, completions  # the server's own routes (imports torch: a few seconds)

    served = {(m, r.path) for router in (chat.router, completions.router) for r in router.routes for m in r.methods}
    assert served >= GENERATION_ROUTES


def test_the_picker_may_read_what_it_watches(gie):
    check_rbac(gie)


def test_the_picker_config_is_mounted_and_scores_adapter_affinity(gie):
    _, deployment, container = epp(gie)
    path = Path(flags(container)["config-file"])
    [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    config_map = named(gie, "ConfigMap", volume["configMap"]["name"], deployment["metadata"]["namespace"])
    config = yaml.safe_load(config_map["data"][path.name])
    assert (config["apiVersion"], config["kind"]) == ("inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig")
    plugins = {p.get("name", p["type"]): p["type"] for p in config["plugins"]}
    assert set(plugins.values()) <= EPP_PLUGINS, set(plugins.values()) - EPP_PLUGINS
    [profile] = config["schedulingProfiles"]
    used = [plugins[p["pluginRef"]] for p in profile["plugins"]]  # KeyError: a reference to no plugin
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"} <= set(used)


def test_the_picker_pod_has_probes_resources_and_runs_as_non_root(gie):
    _, deployment, container = epp(gie)
    pod = deployment["spec"]["template"]["spec"]
    health = int(flags(container)["grpc-health-port"])
    assert container["readinessProbe"]["grpc"]["port"] == health == container["livenessProbe"]["grpc"]["port"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    server = server_deployment(gie)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= server["terminationGracePeriodSeconds"]


def _arg(docs: list[dict], flag: str, value: str) -> None:
    container = named(docs, "Deployment", "loraplex-epp")["spec"]["template"]["spec"]["containers"][0]
    container["args"] = [a for a in container["args"] if not a.startswith(f"--{flag}=")] + [f"--{flag}={value}"]


def _pool(docs: list[dict]) -> dict:
    return by_kind(docs, "InferencePool")[0]["spec"]


def _route(docs: list[dict]) -> dict:
    return by_kind(docs, "HTTPRoute")[0]["spec"]["rules"][0]


def _drop_rule(docs: list[dict], resource: str) -> None:
    role = named(docs, "Role", "loraplex-epp")
    role["rules"] = [r for r in role["rules"] if resource not in r["resources"]]


def _pre_ga_port(docs: list[dict]) -> None:
    ref = _pool(docs)["endpointPickerRef"]
    ref["portNumber"] = ref.pop("port")["number"]


# name: (a change to the render, the check that must then fail)
MUTATIONS: dict[str, tuple[Callable[[list[dict]], object], Callable[..., object]]] = {
    "kv-metric-vllm-old-name": (
        lambda d: _arg(d, "kv-cache-usage-percentage-metric", "vllm:gpu_cache_usage_perc"),
        check_epp_metrics,
    ),
    "queue-metric-is-the-running-gauge": (
        lambda d: _arg(d, "total-queued-requests-metric", "vllm:num_requests_running"),
        check_epp_metrics,
    ),
    "lora-metric-without-vllm-labels": (
        lambda d: _arg(d, "lora-info-metric", "loraplex_requests_waiting"),
        check_epp_metrics,
    ),
    "metric-flag-left-to-default": (
        lambda d: named(d, "Deployment", "loraplex-epp")["spec"]["template"]["spec"]["containers"][0]["args"].remove(
            "--lora-info-metric=vllm:lora_requests_info"
        ),
        check_epp_metrics,
    ),
    "selector-matches-nothing": (
        lambda d: _pool(d)["selector"]["matchLabels"].update({"app.kubernetes.io/component": "worker"}),
        check_pool,
    ),
    "selector-matches-the-picker-too": (
        lambda d: _pool(d)["selector"].update(matchLabels={"app.kubernetes.io/part-of": "loraplex"}),
        check_pool,
    ),
    "target-port-not-the-server-port": (lambda d: _pool(d).update(targetPorts=[{"number": 8080}]), check_pool),
    "picker-port-not-on-the-service": (lambda d: _pool(d)["endpointPickerRef"]["port"].update(number=9003), epp),
    "picker-service-not-in-the-render": (lambda d: _pool(d)["endpointPickerRef"].update(name="loraplex-picker"), epp),
    "pre-ga-port-field": (_pre_ga_port, check_custom_fields),
    "wrong-pool-namespace": (lambda d: _arg(d, "pool-namespace", "default"), check_epp_args),
    "wrong-pool-name": (lambda d: _arg(d, "pool-name", "vllm-llama3-8b-instruct"), check_epp_args),
    "route-to-another-pool": (lambda d: _route(d)["backendRefs"][0].update(name="other"), check_route),
    "admin-on-the-gateway": (
        lambda d: _route(d)["matches"].append({"path": {"type": "PathPrefix", "value": "/admin"}}),
        check_route,
    ),
    "route-on-another-gateway": (
        lambda d: by_kind(d, "HTTPRoute")[0]["spec"]["parentRefs"][0].update(name="other"),
        check_route,
    ),
    "rbac-without-inferenceobjectives": (lambda d: _drop_rule(d, "inferenceobjectives"), check_rbac),
    "rbac-without-pods": (lambda d: _drop_rule(d, "pods"), check_rbac),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=str)
def test_the_gateway_checks_fail_on_a_broken_render(gie, scraped, mutation):
    mutate, check = MUTATIONS[mutation]
    docs = copy.deepcopy(gie)
    mutate(docs)
    with pytest.raises(AssertionError):
        check(docs, scraped) if check is check_epp_metrics else check(docs)
