"""PNG plots of reports (matplotlib, Agg backend): latency CDFs of one run, and sweeps over several runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after matplotlib.use: the backend is chosen first
import numpy as np

CDF_METRICS = (
    ("ttft_ms", "time to first token (ms)"),
    ("tpot_ms", "time per output token (ms)"),
    ("e2el_ms", "end-to-end latency (ms)"),
)


def plot_latency_cdfs(report: dict[str, Any], path: Path, title: str = "") -> Path:
    """One panel per metric (TTFT, TPOT, e2e), one CDF line per adapter_kind, from the report's request rows."""
    rows = [r for r in report["requests"] if r["error"] is None]
    kinds = sorted({r["adapter_kind"] for r in rows})
    fig, axes = plt.subplots(1, len(CDF_METRICS), figsize=(15, 4.2))
    for ax, (key, label) in zip(axes, CDF_METRICS, strict=True):
        for kind in kinds:
            values = np.sort([r[key] for r in rows if r["adapter_kind"] == kind and r[key] is not None])
            if values.size:
                ax.step(
                    values, np.arange(1, values.size + 1) / values.size, where="post", label=f"{kind} (n={values.size})"
                )
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(loc="lower right")
    fig.suptitle(title or "latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(reports: Sequence[dict[str, Any]], x_key: str, x_label: str, path: Path, title: str = "") -> Path:
    """Throughput and p99 TTFT (overall and by adapter_kind) against ``report["workload"][x_key]``."""
    numeric = [r for r in reports if isinstance(r["workload"].get(x_key), (int, float))]  # "inf" rates are skipped
    ordered = sorted(numeric, key=lambda r: r["workload"][x_key])
    xs = [r["workload"][x_key] for r in ordered]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    left.plot(xs, [r["output_throughput"] for r in ordered], "o-", label="output tokens/s")
    left.plot(xs, [r["total_token_throughput"] for r in ordered], "s--", label="total tokens/s")
    left.set_ylabel("tokens/s")
    twin = left.twinx()
    twin.plot(xs, [r["request_throughput"] for r in ordered], "^:", color="gray", label="requests/s")
    twin.set_ylabel("requests/s")
    handles = [*left.get_legend_handles_labels()[0], *twin.get_legend_handles_labels()[0]]
    left.legend(handles=handles, loc="best")
    series = [("overall", ordered)]
    for kind in ("base", "adapter"):
        series.append((kind, [r["by_adapter_kind"].get(kind, {}) for r in ordered]))
    for name, rows in series:
        ys = [row.get("p99_ttft_ms") for row in rows]
        points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if points:
            right.plot(*zip(*points, strict=True), "o-", label=name)
    right.set_ylabel("p99 time to first token (ms)")
    right.legend()
    for ax in (left, right):
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"sweep over {x_label}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_rate_sweep(reports: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    return plot_sweep(reports, "rate", "request rate (requests/s)", path, title)


def plot_adapter_sweep(reports: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    return plot_sweep(reports, "num_adapters", "number of adapters", path, title)


def plot_series(
    series: dict[str, Sequence[dict[str, Any]]],
    x_key: str,
    x_label: str,
    path: Path,
    title: str = "",
    log_x: bool = False,
) -> Path:
    """Output throughput and p99 TTFT against ``report["workload"][x_key]``, one line per named series of runs."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, reports in series.items():
        ordered = sorted(reports, key=lambda r: r["workload"][x_key])
        xs = [r["workload"][x_key] for r in ordered]
        left.plot(xs, [r["output_throughput"] for r in ordered], "o-", label=name)
        right.plot(xs, [r["p99_ttft_ms"] for r in ordered], "o-", label=name)
    left.set_ylabel("output tokens/s")
    left.set_ylim(bottom=0)
    right.set_ylabel("p99 time to first token (ms)")
    for ax in (left, right):
        ax.set_xlabel(x_label)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
