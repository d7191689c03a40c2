"""A real Prometheus scrapes a real server on the tiny model; every query the deploy files hold is run through it.

The server gets a short mixed load (base, single-adapter, composed and streaming requests). Prometheus runs
the repo's ``deploy/prometheus/prometheus.yml`` (target, intervals and rule paths rewritten for the test) with
the repo's rules. Then, through Prometheus's HTTP API:

- every ``targets[].expr`` of every panel of every ``deploy/grafana/dashboards/*.json`` must parse and return
  data, as an instant query at the end of the load and as a range query over the load's window, unless the
  panel (or target) says ``"loraplexExpectData": false``;
- every recording rule's expression must return data (the same two queries), and so must its recorded series;
- "data" means at least one finite sample (NaN, what a quantile or a ratio of nothing gives, does not count);
  and an expression of the traffic that was sent (latency quantiles, request and token rates) must be above
  zero, for each of ``base``, ``adapter`` and ``composed`` when it is by ``adapter_kind``;
- every alert's expression must parse (it is empty while the alert does not fire);
- every rule must evaluate without error.

Dashboards and rules are globbed at run time, so the test follows them as they change. Beside it,
``promtool check config``, ``check rules``, ``test rules`` and ``check metrics`` (on the live ``/metrics``).
Debian's ``prometheus`` package provides both binaries; ``make test`` installs it when missing.
"""

from __future__ import annotations

import glob
import json
import math
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers.server_process import free_port, running_server, wait_until_up
from tests.helpers.tiny import AdapterSpec, make_adapter
from tests.helpers.tiny_server import save_tiny_model

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARDS_DIR = REPO / "deploy" / "grafana" / "dashboards"
JOB = "loraplex"
ADAPTERS = (
    AdapterSpec("alpha", 8, 16, ("q_proj", "v_proj", "down_proj")),
    AdapterSpec("beta", 4, 8, ("q_proj", "o_proj", "gate_proj", "up_proj")),
    AdapterSpec("gamma", 16, 16, ("k_proj", "up_proj")),
)
LOAD_SECONDS = 12.0
# Grafana's built-in variables, at the values a one-minute view with 1 s scrapes would give.
BUILTINS = {
    "__rate_interval": "30s",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1m",
    "__range_s": "60",
    "__range_ms": "60000",
}
KINDS = ("base", "adapter", "composed")
# Expressions over the traffic the load sends: they must be above zero (not merely present). A selector with an
# ``outcome`` filter (errors, rejections) is not traffic of the load, so the expression is only required to exist.
TRAFFIC = re.compile(
    r"loraplex_(time_to_first_token|inter_token_latency|e2e_request_latency|request_prefill_time|request_queue_time)"
    r"_seconds_bucket|loraplex_(prompt|generation)_tokens_total|loraplex_requests_total"
    r"|adapter_kind(_outcome)?:loraplex_(time_to_first_token_seconds|inter_token_latency_seconds"
    r"|e2e_request_latency_seconds|requests|prompt_tokens|generation_tokens):"
    r"|job:loraplex_time_to_first_token_seconds:"
)
# promtool's lint refuses ':' in names, but vLLM's gauges are exported under vLLM's exact names on purpose.
ALLOWED_LINT = re.compile(r"^vllm:\w+ metric names should not contain ':'$")


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"`{binary}` is not installed: install Debian's `prometheus` package (`make test` does)")
    return path


# --- the queries the deploy files hold -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    where: str  # file and panel title or rule name, for failure messages
    kind: str  # "panel", "record" or "alert"
    expr: str
    expect_data: bool = True
    record: str | None = None

    @property
    def traffic(self) -> bool:
        """Whether the query measures the traffic sent, so must be above zero (see ``TRAFFIC``)."""
        return self.expect_data and bool(TRAFFIC.search(self.expr)) and "outcome=" not in self.expr

    @property
    def by_kind(self) -> bool:
        return bool(re.search(r"by \([^)]*\badapter_kind\b", self.expr)) or (self.record or "").startswith(
            "adapter_kind")


def _grafana_variables(dashboard: dict) -> dict[str, str]:
    """Each template variable at "All" (a regex matching everything), or at its current single value."""
    values = dict(BUILTINS)
    for var in dashboard.get("templating", {}).get("list", []):
        current = (var.get("current") or {}).get("value")
        if var.get("includeAll") or var.get("multi") or current in (None, "", "$__all") or isinstance(current, list):
            values[var["name"]] = var.get("allValue") or ".*"
        else:
            values[var["name"]] = str(current)
    return values


def _substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's ``$name``, ``${name}``, ``${name:format}`` and ``[[name]]``; unknown names are left as they are."""
    pattern = r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]"
    return re.sub(pattern, lambda m: values.get(m.group(1) or m.group(2) or m.group(3), m.group(0)), expr)


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a row's panels


def dashboard_queries(paths: list[Path]) -> list[Query]:
    queries = []
    for path in paths:
        dashboard = json.loads(path.read_text())
        values = _grafana_variables(dashboard)
        for panel in _panels(dashboard.get("panels", [])):
            for target in panel.get("targets", []):
                if not target.get("expr", "").strip():
                    continue
                where = f"{path.name}: panel {panel.get('title', '?')!r} (refId {target.get('refId', '?')})"
                expect = panel.get("loraplexExpectData", True) and target.get("loraplexExpectData", True)
                queries.append(Query(where, "panel", _substitute(target["expr"], values), bool(expect)))
    return queries


def rule_queries(paths: list[Path]) -> list[Query]:
    queries = []
    for path in paths:
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            for rule in group.get("rules", []):
                expect = str((rule.get("annotations") or {}).get("expect_data", "true")).lower() != "false"
                if "record" in rule:
                    where = f"{path.name}: record {rule['record']}"
                    queries.append(Query(where, "record", rule["expr"], expect, rule["record"]))
                else:
                    queries.append(Query(f"{path.name}: alert {rule['alert']}", "alert", rule["expr"], False))
    return queries


def rule_files(config: dict) -> list[Path]:
    """The files the config's ``rule_files`` globs name, relative to the config's folder."""
    files: set[Path] = set()
    for pattern in config.get("rule_files", []):
        files.update(Path(p) for p in glob.glob(str(PROMETHEUS_DIR / pattern)))
    return sorted(files)


# --- Prometheus ------------------------------------------------------------------------------------------------------


def scrape_config(config: dict, target: str, rules: list[Path], folder: Path) -> Path:
    """The repo's config scraping ``target`` every second, with the repo's rules evaluated every second."""
    config = dict(config)
    config["global"] = {**config.get("global", {}), "scrape_interval": "1s", "scrape_timeout": "1s",
                        "evaluation_interval": "1s"}
    jobs = [job for job in config.get("scrape_configs", []) if job.get("job_name") == JOB]
    assert len(jobs) == 1, f"prometheus.yml must have one scrape job named {JOB!r}"
    job = {k: v for k, v in jobs[0].items() if not k.endswith("_sd_configs")}
    labels = {k: v for static in job.get("static_configs", []) for k, v in static.get("labels", {}).items()}
    job.update(scrape_interval="1s", scrape_timeout="1s", static_configs=[{"targets": [target], "labels": labels}])
    config["scrape_configs"] = [job]
    config.pop("alerting", None)  # no Alertmanager here
    config["rule_files"] = [str(_every_second(path, folder)) for path in rules]
    out = folder / "prometheus.yml"
    out.write_text(yaml.safe_dump(config))
    return out


def _every_second(path: Path, folder: Path) -> Path:
    """``path`` itself, or a copy without the groups' own ``interval`` (so every group runs each second)."""
    rules = yaml.safe_load(path.read_text()) or {}
    if not any("interval" in group for group in rules.get("groups", [])):
        return path
    for group in rules["groups"]:
        group.pop("interval", None)
    copy = folder / f"rules-{path.name}"
    copy.write_text(yaml.safe_dump(rules))
    return copy


@contextmanager
def running_prometheus(config: Path, folder: Path, timeout: float = 30.0) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [_need("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    log_path = folder / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_up(proc, url + "/-/ready", log_path, timeout, poll=0.2)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def prom_get(prom: str, path: str, **params) -> dict:
    """A Prometheus API answer: ``status`` is ``success`` (with ``data``) or ``error`` (with ``error``)."""
    response = httpx.get(prom + path, params=params, timeout=10)
    try:
        return response.json()
    except ValueError:
        return {"status": "error", "error": f"HTTP {response.status_code}: {response.text[:200]}"}


def wait_for(prom: str, query: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = prom_get(prom, "/api/v1/query", query=query)
        if answer.get("status") == "success" and answer["data"]["result"]:
            return True
        time.sleep(0.5)
    return False


def _samples(answer: dict) -> list[tuple[dict, float]]:
    """(labels, value) of every sample of an instant (vector) or range (matrix) answer."""
    out = []
    for series in answer["data"]["result"]:
        points = series.get("values") or ([series["value"]] if "value" in series else [])
        out += [(series["metric"], float(v)) for _, v in points]
    return out


def _judge(query: Query, what: str, answer: dict) -> str | None:
    """What is wrong with the data of one successful answer, if anything."""
    samples = _samples(answer)
    finite = [(labels, v) for labels, v in samples if math.isfinite(v)]
    if not finite:
        return f"{what} returned no data" if not samples else f"{what} returned only NaN/Inf ({len(samples)} samples)"
    if not query.traffic:
        return None
    if query.by_kind:
        missing = [k for k in KINDS if not any(v > 0 for labels, v in finite if labels.get("adapter_kind") == k)]
        if missing:
            return f"{what} is never above zero for adapter_kind {missing}, though that traffic was sent"
    elif not any(v > 0 for _, v in finite):
        return f"{what} is never above zero, though traffic was sent"
    return None


def check(prom: str, query: Query, start: float, end: float) -> list[str]:
    """What is wrong with ``query`` (nothing: an empty list): an instant query at the end of the load, a range
    query over the load's window."""
    problems = []
    ranges = [("instant", "/api/v1/query", {"time": end}),
              ("range", "/api/v1/query_range", {"start": start, "end": end, "step": 1})]
    if query.kind == "alert":
        ranges = ranges[:1]
    for name, path, params in ranges:
        answer = prom_get(prom, path, query=query.expr, **params)
        if answer.get("status") != "success":
            problems.append(f"{query.where}: {name} query failed: {answer.get('error')}\n    {query.expr.strip()}")
        elif query.expect_data and (wrong := _judge(query, f"{name} query", answer)):
            problems.append(f"{query.where}: {wrong}\n    {query.expr.strip()}")
    if query.record and query.expect_data and not problems:
        answer = prom_get(prom, "/api/v1/query", query=query.record, time=end)
        wrong = _judge(query, "the recorded series", answer) if answer.get("status") == "success" else "error"
        if wrong:
            problems.append(f"{query.where}: {query.record}: {wrong}")
    return problems


# --- load ------------------------------------------------------------------------------------------------------------


def _requests() -> list[tuple[str, dict]]:
    """One round of the mix: base, each adapter, compositions, chat, and streaming ones."""
    prompt = {"prompt": "the quick brown fox", "max_tokens": 8}
    chat = {"messages": [{"role": "user", "content": "a multi adapter lora server"}], "max_tokens": 8}
    composed = [{"name": "alpha", "weight": 0.5}, {"name": "beta", "weight": 0.5}]
    return [
        ("/v1/completions", {"model": "", **prompt}),
        ("/v1/completions", {"model": "alpha", **prompt}),
        ("/v1/completions", {"model": "", "adapters": composed, **prompt}),
        ("/v1/chat/completions", {"model": "beta", **chat}),
        ("/v1/completions", {"model": "", "stream": True, **prompt}),
        ("/v1/chat/completions", {"model": "gamma", "stream": True, **chat}),
        ("/v1/completions", {"model": "", "adapters": [*composed, {"name": "gamma", "weight": -0.3}], **prompt}),
        ("/v1/completions", {"model": "beta", **prompt}),
    ]


def send_load(url: str, seconds: float, workers: int = 3) -> list[str]:
    """Requests from ``workers`` threads for ``seconds``; returns the unexpected answers."""
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def worker(offset: int) -> None:
        mix = _requests()
        i = offset
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.monotonic() < stop:
                path, body = mix[i % len(mix)]
                i += 1
                with client.stream("POST", path, json=body) as response:
                    response.read()
                    if response.status_code != 200:
                        errors.append(f"{path} {body.get('model')!r}: {response.status_code} {response.text[:200]}")
                time.sleep(0.05)

    threads = [threading.Thread(target=worker, args=(k * 3,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


# --- tests -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("live")
    model_dir, base, _ = save_tiny_model(folder / "tiny")
    store = folder / "store"
    store.mkdir()
    for seed, spec in enumerate(ADAPTERS, 1):
        make_adapter(base, spec, store, seed=seed)
    # No metrics flags but the vLLM gauges: the per-adapter panels must show data on a default install.
    args = ["--model", str(model_dir), "--adapters-dir", str(store), "--vllm-metrics", "on",
            "--max-lora-rank", "16", "--max-loras", "4", "--kv-cache-tokens", "4096"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # two cores: leave one for Prometheus and the load
        with running_server(args, folder / "server.log") as url:
            yield url


def test_every_dashboard_and_rule_query_has_data(server, tmp_path):
    _need("promtool")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    rules = rule_files(config)
    dashboards = sorted(DASHBOARDS_DIR.glob("*.json"))
    queries = dashboard_queries(dashboards) + rule_queries(rules)
    assert dashboards, f"no dashboards in {DASHBOARDS_DIR}"
    assert rules, f"prometheus.yml's rule_files name no files in {PROMETHEUS_DIR}"
    unresolved = [f"{q.where}: {q.expr}" for q in queries if re.search(r"\$\w|\$\{|\[\[", q.expr)]
    assert not unresolved, "unknown Grafana variables:\n" + "\n".join(unresolved)

    target = server.removeprefix("http://")
    with running_prometheus(scrape_config(config, target, rules, tmp_path), tmp_path) as prom:
        assert wait_for(prom, f'up{{job="{JOB}"}} == 1', 15), "Prometheus never scraped the server"
        load_start = time.time()
        errors = send_load(server, LOAD_SECONDS)
        load_end = time.time()
        assert not errors, "the load got unexpected answers:\n" + "\n".join(errors[:10])
        assert wait_for(prom, f'loraplex_requests_total{{job="{JOB}"}} > 0', 15), "no request was counted"
        # Prometheus's scrapes and rule evaluations up to the load's end are in (one-second intervals).
        assert wait_for(prom, f'time() - timestamp(up{{job="{JOB}"}}) < 60 and timestamp(up{{job="{JOB}"}}) > '
                              f'{load_end + 2}', 15), "no scrape after the load"
        time.sleep(2)
        problems = [problem for query in queries for problem in check(prom, query, load_start, load_end)]
        rule_state = prom_get(prom, "/api/v1/rules")["data"]["groups"]

    loaded = [rule for group in rule_state for rule in group["rules"]]
    problems += [f"rule {r['name']}: health {r['health']}: {r.get('lastError')}" for r in loaded
                 if r["health"] == "err" or r.get("lastError")]
    expected_rules = sum(q.kind in ("record", "alert") for q in queries)
    if len(loaded) != expected_rules:
        problems.append(f"Prometheus loaded {len(loaded)} rules, the rule files hold {expected_rules}")
    assert not problems, f"{len(problems)} problems in {len(queries)} queries:\n" + "\n".join(problems)


def test_promtool_checks_config_rules_and_live_metrics(server):
    promtool = _need("promtool")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    commands = [["check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
                ["check", "rules", *map(str, rule_files(config))]]
    commands += [["test", "rules", str(path)] for path in sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))]
    for command in commands:
        done = subprocess.run([promtool, *command], capture_output=True, text=True, cwd=PROMETHEUS_DIR)
        assert done.returncode == 0, f"promtool {' '.join(command)}:\n{done.stdout}{done.stderr}"

    # The metrics after some traffic, so every histogram and labelled series has samples.
    assert not send_load(server, 1.0, workers=2)
    metrics = httpx.get(server + "/metrics", timeout=10).text
    done = subprocess.run([promtool, "check", "metrics"], input=metrics, capture_output=True, text=True)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    problems = [line for line in lines if not ALLOWED_LINT.match(line)]
    # Exit 3 means lint problems only; it is fine when every one is an allowed exception.
    ok = done.returncode == 0 or (done.returncode == 3 and not problems)
    assert ok, f"promtool check metrics exited {done.returncode}:\n" + "\n".join(problems or lines)
