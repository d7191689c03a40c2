"""The README's metrics table against the registry: every exported metric documented, nothing documented that
is not exported, with the right type and labels."""

from __future__ import annotations

import re
from pathlib import Path

from server.metrics import Metrics, MetricsConfig

README = Path(__file__).resolve().parents[2] / "README.md"
NAME = re.compile(r"`((?:loraplex_|vllm:)[A-Za-z0-9_:]+)`")


def _section() -> list[str]:
    lines = README.read_text().splitlines()
    start = lines.index("## Metrics")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start + 1 : end]


def _table() -> dict[str, tuple[str, set[str]]]:
    """Metric name -> (type, label names), from the rows whose first cell is a metric name."""
    rows: dict[str, tuple[str, set[str]]] = {}
    for line in _section():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 4:
            continue
        match = NAME.fullmatch(cells[0])
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} is documented twice"
            rows[match.group(1)] = (cells[1], set(re.findall(r"`([a-z_]+)`", cells[2])))
    return rows


def _exported() -> dict[str, tuple[str, set[str]]]:
    """Every metric of a registry with all options on, each written once so that labelled ones have series."""
    m = Metrics(MetricsConfig(adapter_top_k=5, vllm_compatible=True))
    m.model_name = "tiny"
    m.first_token("adapter", 0.02, 0.01, 7, "some-adapter")
    m.generated("adapter")
    m.finished("adapter", "stop", 0.2, 0.01, "some-adapter")
    m.engine_state(running=1, waiting=1, adapters_waiting=0, slots_used=1, slots_total=4, host_bytes=1,
                   host_limit=2, kv_usage=0.5)
    m.lora_requests({"some-adapter"}, set(), 4)
    m.prefix_cache(10, 4)
    m.preempted(1)
    out = {}
    for fam in m.registry.collect():
        name = fam.name + ("_total" if fam.type == "counter" else "")
        labels = {k for s in fam.samples for k in s.labels if k != "le"}
        out[name] = (fam.type, labels)
    return out


def test_every_exported_metric_is_in_the_readme_table():
    documented, exported = _table(), _exported()
    missing = sorted(set(exported) - set(documented))
    assert not missing, f"exported but not in the README's metrics table: {missing}"


def test_every_documented_metric_is_exported():
    documented, exported = _table(), _exported()
    stale = sorted(set(documented) - set(exported))
    assert not stale, f"in the README's metrics table but not exported: {stale}"
    mentioned = {n for line in _section() for n in NAME.findall(line)}
    assert not mentioned - set(exported), f"named in the Metrics section but not exported: {mentioned - set(exported)}"


def test_the_table_gives_each_metrics_type_and_labels():
    documented, exported = _table(), _exported()
    for name in sorted(set(documented) & set(exported)):
        assert documented[name] == exported[name], (name, "README:", documented[name], "exported:", exported[name])


def test_the_metrics_flags_are_documented():
    text = "\n".join(_section())
    for flag in ("--metrics", "--metrics-adapters", "--metrics-top-k", "--vllm-metrics"):
        assert f"| `{flag}` |" in text, flag
