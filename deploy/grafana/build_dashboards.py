"""Builds loraplex's Grafana dashboards (``dashboards/*.json``) from code.

    python deploy/grafana/build_dashboards.py          # regenerate the JSON
    python deploy/grafana/build_dashboards.py --check  # exit 1 if the committed JSON is not current

Standard library only. Every query is plain PromQL on the names in ``server/metrics.py``;
the only Grafana variable is ``$__rate_interval``. Two panel keys are ours, for the live
test that evaluates every query against a real Prometheus:

- ``loraplexExpectData: false``: the query is empty until something goes wrong;
- ``loraplexRequires: "adapter_label"``: the metric exists only while the server's bounded
  ``adapter`` label is on (the default, top 10; ``--metrics-top-k 0`` turns it off).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
RATE = "$__rate_interval"
KINDS_NOTE = "base: no adapter; adapter: one LoRA adapter; composed: several adapters weighted in one request."
ADAPTER_LABEL_NOTE = ("The bounded `adapter` label: the server's 10 busiest adapters by default (--metrics-top-k K), "
                      "or its --metrics-adapters list; empty with --metrics-top-k 0.")
FAILED = 'loraplex_requests_total{outcome=~"error|rejected"}'
UNSUCCESSFUL = 'loraplex_requests_total{outcome=~"abort|error|rejected"}'
ADAPTER_UNSUCCESSFUL = 'loraplex_adapter_requests_total{outcome=~"abort|error"}'
DEVICE_HITS = 'loraplex_adapter_cache_hits_total{tier="device"}'
DEVICE_LOOKUPS = 'loraplex_adapter_cache_lookups_total{tier="device"}'
DISK_HITS = 'loraplex_adapter_cache_hits_total{tier="disk"}'
MEMORY_TIERS = '{tier=~"device|host"}'


def rate(selector: str) -> str:
    return f"rate({selector}[{RATE}])"


def quantile(q: float, histogram: str, by: str = "", matchers: str = "") -> str:
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(f'{histogram}_bucket{matchers}')}))"


def mean(histogram: str) -> str:
    return ratio(f"sum({rate(f'{histogram}_sum')})", f"sum({rate(f'{histogram}_count')})")


def ratio(numerator: str, denominator: str) -> str:
    """``numerator / denominator``, empty (not NaN) while the denominator is 0."""
    return f"{numerator} / ({denominator} > 0)"


def target(expr: str, legend: str) -> dict:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": True}


def timeseries(
    title: str,
    targets: list[dict],
    unit: str,
    description: str,
    width: int = 12,
    *,
    max_value: float | None = None,
    expect_data: bool = True,
    requires: str | None = None,
) -> dict:
    defaults: dict = {
        "unit": unit,
        "min": 0,
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                   "spanNulls": False},
    }
    if max_value is not None:
        defaults["max"] = max_value
    panel = {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": 8},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True, "calcs": ["mean", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets,
    }
    return _mark(panel, expect_data, requires)


def stat(title: str, expr: str, unit: str, description: str, width: int = 4) -> dict:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": 4},
        "fieldConfig": {"defaults": {"unit": unit, "decimals": 2}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        },
        "targets": [target(expr, "")],
    }


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"w": 24, "h": 1}, "panels": []}


def _mark(panel: dict, expect_data: bool, requires: str | None) -> dict:
    if not expect_data:
        panel["loraplexExpectData"] = False
    if requires:
        panel["loraplexRequires"] = requires
    return panel


def dashboard(uid: str, title: str, description: str, panels: list[dict]) -> dict:
    """Numbers the panels and lays them out left to right, wrapping at Grafana's 24 columns."""
    x = y = line_height = 0
    for number, panel in enumerate(panels, start=1):
        pos = panel["gridPos"]
        if x + pos["w"] > 24 or panel["type"] == "row":
            x, y, line_height = 0, y + line_height, 0
        pos["x"], pos["y"] = x, y
        x += pos["w"]
        line_height = max(line_height, pos["h"])
        panel["id"] = number
        for i, t in enumerate(panel.get("targets", [])):
            t["refId"] = chr(ord("A") + i)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["loraplex"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "fiscalYearStartMonth": 0,
        "templating": {"list": []},
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "links": [{"title": "loraplex", "type": "dashboards", "tags": ["loraplex"], "asDropdown": False,
                   "includeVars": False, "keepTime": True}],
        "panels": panels,
    }


LATENCIES = (
    ("Time to first token", "loraplex_time_to_first_token_seconds", "Arrival to the first output token."),
    ("Inter-token latency", "loraplex_inter_token_latency_seconds", "Time between two output tokens."),
    ("End-to-end latency", "loraplex_e2e_request_latency_seconds",
     "Arrival to the end of the request, completed requests only (stop, length)."),
)


def overview() -> dict:
    panels = [
        row("Now"),
        stat("Requests/s", f"sum({rate('loraplex_requests_total')})", "reqps",
             "Finished and rejected requests per second, every kind."),
        stat("Generated tokens/s", f"sum({rate('loraplex_generation_tokens_total')})", "short",
             "Output tokens per second, every kind."),
        stat("Running", "sum(loraplex_requests_running)", "short", "Requests in the running batch."),
        stat("Waiting", "sum(loraplex_requests_waiting)", "short", "Requests waiting to run."),
        stat("KV cache used", "max(loraplex_kv_cache_usage_ratio)", "percentunit",
             "Share of KV-cache blocks in use (the fullest replica)."),
        stat("Failed share", ratio(f"sum({rate(FAILED)})", f"sum({rate('loraplex_requests_total')})"), "percentunit",
             "Requests that ended in an error or were rejected, as a share of all requests (empty when idle)."),
        row("Traffic"),
        timeseries("Request rate by adapter kind", [
            target(f"sum by (adapter_kind) ({rate('loraplex_requests_total')})", "{{adapter_kind}}"),
        ], "reqps", f"Finished and rejected requests per second. {KINDS_NOTE}"),
        timeseries("Tokens/s by adapter kind", [
            target(f"sum by (adapter_kind) ({rate('loraplex_prompt_tokens_total')})", "prompt {{adapter_kind}}"),
            target(f"sum by (adapter_kind) ({rate('loraplex_generation_tokens_total')})",
                   "generated {{adapter_kind}}"),
        ], "short", "Prompt tokens (counted when the prompt is processed) and generated tokens (as they are "
                    "produced) per second."),
    ]
    for title, metric, what in LATENCIES:
        panels.append(row(f"{title}: base, adapter and composed side by side"))
        for q in (0.5, 0.95, 0.99):
            panels.append(timeseries(f"{title} p{round(q * 100)}", [
                target(quantile(q, metric, "adapter_kind"), "{{adapter_kind}}"),
            ], "s", f"{what} {KINDS_NOTE}", width=8))
    panels += [
        row("Queue and engine"),
        timeseries("Queue depth", [
            target("sum(loraplex_requests_running)", "running"),
            target("sum(loraplex_requests_waiting)", "waiting"),
        ], "short", "Requests in the running batch and waiting to run.", width=8),
        timeseries("Queue time p95", [
            target(quantile(0.95, "loraplex_request_queue_time_seconds", "adapter_kind"), "{{adapter_kind}}"),
        ], "s", f"Arrival to admission into the running batch. {KINDS_NOTE}", width=8),
        timeseries("Prefill time p95", [
            target(quantile(0.95, "loraplex_request_prefill_time_seconds", "adapter_kind"), "{{adapter_kind}}"),
        ], "s", f"Admission to the first output token (the prompt's forward passes). {KINDS_NOTE}", width=8),
        timeseries("Time per output token p95", [
            target(quantile(0.95, "loraplex_time_per_output_token_seconds", "adapter_kind"), "{{adapter_kind}}"),
        ], "s", "Per completed request: (last token - first token) / (output tokens - 1).", width=8),
        timeseries("Errors by outcome", [
            target(f"sum by (outcome, adapter_kind) ({rate(UNSUCCESSFUL)})", "{{outcome}} {{adapter_kind}}"),
        ], "reqps", "Requests aborted (client gone, timeout), failed in the engine, or rejected before it "
                    "(429 queue full, 503 shutting down). Zero when all is well.", width=8),
        timeseries("KV cache usage", [
            target("loraplex_kv_cache_usage_ratio", "{{instance}}"),
        ], "percentunit", "Share of KV-cache blocks in use.", width=8, max_value=1),
        timeseries("Batch size", [
            target(mean("loraplex_batch_size_sequences"), "sequences (mean)"),
            target(quantile(0.95, "loraplex_batch_size_sequences"), "sequences (p95)"),
            target(mean("loraplex_batch_size_tokens"), "tokens (mean)"),
            target(quantile(0.95, "loraplex_batch_size_tokens"), "tokens (p95)"),
        ], "short", "Sequences and tokens (prefill chunks plus decode tokens) per engine step.", width=8),
        timeseries("Engine step time p95 by phase", [
            target(quantile(0.95, "loraplex_engine_step_seconds", "phase"), "{{phase}}"),
        ], "s", "Time of each phase of an engine step (schedule, forward, sample, emit).", width=16),
    ]
    return dashboard("loraplex-overview", "loraplex / Overview",
                     "Traffic, latency with and without adapters, queue and engine.", panels)


def adapters() -> dict:
    hit_ratio = ratio(f"sum by (tier) ({rate('loraplex_adapter_cache_hits_total' + MEMORY_TIERS)})",
                      f"sum by (tier) ({rate('loraplex_adapter_cache_lookups_total' + MEMORY_TIERS)})")
    from_memory = "1 - " + ratio(f"sum({rate(DISK_HITS)})", f"sum({rate(DEVICE_LOOKUPS)})")
    panels = [
        row("Now"),
        stat("Adapters stored", "max(loraplex_adapters_stored)", "short", "Adapters in the store."),
        stat("Slots used", "sum(loraplex_adapter_slots_used)", "short", "Device adapter slots held."),
        stat("Slots capacity", "sum(loraplex_adapter_slots_capacity)", "short", "Device adapter slots (--max-loras)."),
        stat("Adapters waiting for a slot", "sum(loraplex_adapters_waiting_for_slot)", "short",
             "Distinct adapters of waiting requests loaded in host memory but on no device slot."),
        stat("Host cache", "sum(loraplex_adapter_host_cache_bytes)", "bytes", "Adapter bytes in host memory."),
        stat("Device hit ratio", ratio(f"sum({rate(DEVICE_HITS)})", f"sum({rate(DEVICE_LOOKUPS)})"), "percentunit",
             "Adapter requests whose adapter was already on a device slot (empty without adapter traffic)."),
        row("Adapter cache"),
        timeseries("Cache hit ratio by tier", [target(hit_ratio, "{{tier}}")], "percentunit",
                   "Of the lookups that reached a tier (device, then host), the share that found the adapter "
                   "there. No line for a tier that no lookup reached. Disk is left out: a lookup that reaches "
                   "it always hits.", width=8, max_value=1),
        timeseries("Served from memory", [target(from_memory, "served from memory")], "percentunit",
                   "Adapter lookups served from a device slot or host memory rather than read from disk "
                   "(empty without adapter traffic).", width=8, max_value=1),
        timeseries("Lookups/s by tier", [
            target(f"sum by (tier) ({rate('loraplex_adapter_cache_lookups_total')})", "{{tier}}"),
        ], "ops", "Adapter lookups at request arrival reaching each tier (a miss in one tier looks in the next).",
            width=8),
        timeseries("Loads/s by tier and result", [
            target(f"sum by (tier, result) ({rate('loraplex_adapter_loads_total')})", "{{tier}} {{result}}"),
        ], "ops", "Adapter loads: host = read from the store, device = copied into a slot.", width=8),
        timeseries("Evictions/s by tier and reason", [
            target(f"sum by (tier, reason) ({rate('loraplex_adapter_evictions_total')})", "{{tier}} {{reason}}"),
        ], "ops", "Adapters dropped from a tier: lru (room needed), admin (evict call), delete, replaced.", width=8),
        timeseries("Load time by tier", [
            target(quantile(q, "loraplex_adapter_load_seconds", "tier"), f"p{round(q * 100)} {{{{tier}}}}")
            for q in (0.5, 0.95, 0.99)
        ], "s", "Time to load an adapter into a tier (successful loads).", width=8),
        row("Device slots and host memory"),
        timeseries("Slots used vs capacity", [
            target("loraplex_adapter_slots_used", "used {{instance}}"),
            target("loraplex_adapter_slots_capacity", "capacity {{instance}}"),
        ], "short", "Device adapter slots held (by running requests or pinned) and available.", width=8),
        timeseries("Adapters waiting for a slot", [
            target("loraplex_adapters_waiting_for_slot", "{{instance}}"),
        ], "short", "Distinct adapters of waiting requests loaded in host memory but on no device slot. "
                    "Non-zero with every slot used means requests queue for slots.", width=8),
        timeseries("Slot waits/s", [
            target(f"sum by (instance) ({rate('loraplex_adapter_slot_waits_total')})", "{{instance}}"),
        ], "ops", "Times per second a waiting request's adapter, already in host memory, found no free device "
                  "slot (once per engine step it waits). Sustained, with slots full: slot starvation.", width=8),
        timeseries("Distinct adapters per batch", [
            target(mean("loraplex_batch_distinct_adapters"), "mean"),
            target(quantile(0.95, "loraplex_batch_distinct_adapters"), "p95"),
        ], "short", "Distinct adapter slots used by one engine step.", width=8),
        timeseries("Host cache bytes vs limit", [
            target("loraplex_adapter_host_cache_bytes", "used {{instance}}"),
            target("loraplex_adapter_host_cache_limit_bytes", "limit {{instance}}"),
        ], "bytes", "Adapter bytes parsed into host memory, and the bound of that LRU.", width=16),
        row("Per adapter (the top 10 adapters by default; --metrics-top-k, --metrics-adapters)"),
        timeseries("Request rate by adapter", [
            target(f"sum by (adapter) ({rate('loraplex_adapter_requests_total')})", "{{adapter}}"),
        ], "reqps", f"Finished requests per adapter; adapters outside the top set are 'other'. {ADAPTER_LABEL_NOTE}",
            width=8, requires="adapter_label"),
        timeseries("Time to first token p95 by adapter", [
            target(quantile(0.95, "loraplex_adapter_time_to_first_token_seconds", "adapter"), "{{adapter}}"),
        ], "s", ADAPTER_LABEL_NOTE, width=8, requires="adapter_label"),
        timeseries("End-to-end latency p95 by adapter", [
            target(quantile(0.95, "loraplex_adapter_e2e_request_latency_seconds", "adapter"), "{{adapter}}"),
        ], "s", ADAPTER_LABEL_NOTE, width=8, requires="adapter_label"),
        timeseries("Errors by adapter", [
            target(f"sum by (adapter, outcome) ({rate(ADAPTER_UNSUCCESSFUL)})", "{{adapter}} {{outcome}}"),
        ], "reqps", f"Aborted or failed requests per adapter; no series until one happens. {ADAPTER_LABEL_NOTE}",
            expect_data=False, requires="adapter_label"),
        timeseries("Requests folded into 'other'", [
            target(f"sum({rate('loraplex_adapter_label_folded_total')})", "folded"),
        ], "reqps", f"Requests whose adapter is outside the labelled set. {ADAPTER_LABEL_NOTE}",
            requires="adapter_label"),
    ]
    return dashboard("loraplex-adapters", "loraplex / Adapters",
                     "Adapter cache tiers, device slots, host memory, and per-adapter traffic.", panels)


def render() -> dict[Path, str]:
    return {OUT / f"{d['uid']}.json": json.dumps(d, indent=2) + "\n" for d in (overview(), adapters())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is not current")
    args = parser.parse_args(argv)
    stale = []
    for path, text in render().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(path.name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            sys.stdout.write(f"wrote {path}\n")
    if stale:
        sys.stderr.write(f"stale: {', '.join(stale)}; run python deploy/grafana/build_dashboards.py\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
