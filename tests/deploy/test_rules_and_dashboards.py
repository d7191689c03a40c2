"""deploy/: Prometheus config, rules and their unit tests, and the Grafana dashboards, checked without a server.

promtool validates the config and rules and runs the rules' unit tests; the dashboards' JSON must be what
build_dashboards.py generates; and every metric a rule or panel names must be one server/metrics.py defines.
The live test (a real Prometheus scraping a real server) evaluates the same expressions for data.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.metrics import Metrics, MetricsConfig

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULES_TEST = PROMETHEUS / "tests" / "rules_test.yml"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if exe is None:
        pytest.fail("promtool not found: install Debian's prometheus package (apt-get install prometheus)")
    return subprocess.run([exe, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)}\n{result.stdout}\n{result.stderr}"


def rules() -> list[dict]:
    return [r for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def panels() -> list[tuple[str, dict]]:
    return [(path.name, p) for path in DASHBOARDS for p in json.loads(path.read_text())["panels"]]


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every rule and every dashboard query."""
    found = [(r.get("record") or r["alert"], r["expr"]) for r in rules()]
    found += [(f"{name}: {p['title']}", t["expr"]) for name, p in panels() for t in p.get("targets", [])]
    return found


def defined_series() -> set[str]:
    """Series names the server can export, with every optional metric on (adapter label, vLLM subset)."""
    registry = Metrics(MetricsConfig(adapter_top_k=5, vllm_compatible=True)).registry
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def referenced(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, recording-rule names) an expression reads; label values in strings are skipped."""
    metrics, records = set(), set()
    for name in IDENTIFIER.findall(STRING.sub('""', expr)):
        if name.startswith("vllm:") or (name.startswith("loraplex_") and ":" not in name):
            metrics.add(name)
        elif ":" in name:
            records.add(name)
    return metrics, records


def test_files_exist() -> None:
    assert [p.name for p in RULE_FILES] == ["alerts.yml", "recording.yml"]
    assert [p.name for p in DASHBOARDS] == ["loraplex-adapters.json", "loraplex-overview.json"]


def test_promtool_check_config() -> None:
    assert_ok(promtool("check", "config", PROMETHEUS / "prometheus.yml"))


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    assert_ok(promtool("check", "rules", path))


def test_promtool_rules_unit_tests() -> None:
    assert_ok(promtool("test", "rules", RULES_TEST))


def test_every_rule_is_unit_tested() -> None:
    """Each recording rule has an expression test; each alert a firing case and a silent one."""
    cases = yaml.safe_load(RULES_TEST.read_text())["tests"]
    tested_exprs = " ".join(t["expr"] for case in cases for t in case.get("promql_expr_test", []))
    alert_cases = [t for case in cases for t in case.get("alert_rule_test", [])]
    for rule in rules():
        if "record" in rule:
            assert re.search(rf"(?<![\w:]){re.escape(rule['record'])}(?![\w:])", tested_exprs), rule["record"]
        else:
            outcomes = {bool(t["exp_alerts"]) for t in alert_cases if t["alertname"] == rule["alert"]}
            assert outcomes == {True, False}, f"{rule['alert']}: needs a firing and a not-firing case"


def test_alerts_have_severity_and_annotations() -> None:
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]


def test_dashboards_are_current() -> None:
    result = subprocess.run([sys.executable, str(GRAFANA / "build_dashboards.py"), "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert_ok(result)


def test_named_metrics_exist() -> None:
    """No rule or panel names a metric server/metrics.py does not define, or a recording rule that does not exist."""
    defined, records = defined_series(), recorded_names()
    unknown, seen = [], set()
    for where, expr in expressions():
        metrics, recs = referenced(expr)
        assert metrics or recs, f"{where}: reads no loraplex metric: {expr}"
        seen |= metrics
        unknown += [f"{where}: {name}" for name in sorted(metrics - defined)]
        unknown += [f"{where}: recording rule {name}" for name in sorted(recs - records)]
    assert not unknown, "\n".join(unknown)
    assert {"loraplex_time_to_first_token_seconds_bucket", "loraplex_adapter_slots_capacity",
            "loraplex_adapter_cache_hits_total"} <= seen  # the parsing found what it should


def test_referenced_parses_names() -> None:
    metrics, records = referenced(
        'sum(rate(loraplex_requests_total{outcome="loraplex_not_a_metric"}[$__rate_interval])) '
        '/ adapter_kind:loraplex_requests:rate5m + vllm:num_requests_waiting'
    )
    assert metrics == {"loraplex_requests_total", "vllm:num_requests_waiting"}
    assert records == {"adapter_kind:loraplex_requests:rate5m"}


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every panel query (as a recording rule, with $__rate_interval set to 1m)."""
    queries = [t["expr"] for _, p in panels() for t in p.get("targets", [])]
    assert queries
    for q in queries:
        assert "$" not in q.replace("$__rate_interval", ""), f"Grafana variable in {q}"
    rules_file = tmp_path / "dashboards.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:query_{i}", "expr": q.replace("$__rate_interval", "1m")} for i, q in enumerate(queries)
    ]}]}))
    assert_ok(promtool("check", "rules", rules_file))


def test_dashboard_shape() -> None:
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] == path.stem
        assert 36 <= board["schemaVersion"] <= 41
        assert board["templating"]["list"] == []
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for p in board["panels"]:
            assert p["type"] in ("row", "timeseries", "stat"), p["title"]
            if p["type"] == "row":
                continue
            assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, p["title"]
            assert p["targets"] and all(t["datasource"]["uid"] == "prometheus" for t in p["targets"]), p["title"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
            assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]


def test_per_adapter_panels_are_marked() -> None:
    """Panels on the bounded ``adapter`` label say they need --metrics-adapters/--metrics-top-k."""
    for name, p in panels():
        exprs = " ".join(t["expr"] for t in p.get("targets", []))
        needs_label = re.search(r"loraplex_adapter_(requests|time_to_first|e2e|label_folded)", exprs)
        assert bool(needs_label) == (p.get("loraplexRequires") == "adapter_label"), f"{name}: {p['title']}"


def test_grafana_provisioning() -> None:
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [ds] = datasource["datasources"]
    assert (ds["uid"], ds["type"], ds["url"]) == ("prometheus", "prometheus", "http://prometheus:9090")
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "loraplex.yml").read_text())
    [p] = provider["providers"]
    assert (p["type"], p["options"]["path"]) == ("file", "/var/lib/grafana/dashboards")
