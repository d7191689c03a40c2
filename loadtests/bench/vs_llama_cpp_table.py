"""The rows of ``loadtests.bench.vs_llama_cpp``: loraplex against llama.cpp per workload, a markdown table, a plot."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from loadtests.bench.vs_llama_cpp_plan import Phase, System, Workload

ROW_KEYS = ("output_throughput", "decode_tok_s", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms")


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def rows(phases: list[Phase], runs: list[dict]) -> list[dict]:
    """One row per (workload, loraplex system, llama.cpp system): medians over rounds and loraplex / llama ratios."""

    def pick(workload: Workload, system: System) -> list[dict]:
        return [
            r for r in runs if r["workload"] == workload.name and r["system"] == system.label and "skipped" not in r
        ]

    def skipped(workload: Workload, system: System) -> str | None:
        return next(
            (
                r["skipped"]
                for r in runs
                if r["workload"] == workload.name and r["system"] == system.label and "skipped" in r
            ),
            None,
        )

    out = []
    for phase in phases:
        for workload, lp, peer in phase.comparisons():
            row: dict[str, Any] = {"workload": workload.name, "loraplex": lp.label, "llama_cpp": peer.label}
            for side, system in (("loraplex", lp), ("llama_cpp", peer)):
                got = pick(workload, system)
                for key in ROW_KEYS:
                    row[f"{side}_{key}"] = _median([r.get(key) for r in got])
                row[f"{side}_mean_prompt_tokens"] = _median(
                    [r["total_input_tokens"] / r["completed"] for r in got if r.get("completed")]
                )
                row[f"{side}_completed_failed"] = [
                    sum(r.get("completed", 0) for r in got),
                    sum(r.get("failed", 0) for r in got),
                ]
                row[f"{side}_skipped"] = None if got else skipped(workload, system)
                row[f"{side}_served"] = got[0].get("served") if got else None
            row["ratio_output_throughput"] = _ratio(
                row["loraplex_output_throughput"], row["llama_cpp_output_throughput"]
            )
            row["ratio_decode_tok_s"] = _ratio(row["loraplex_decode_tok_s"], row["llama_cpp_decode_tok_s"])
            row["ratio_median_ttft"] = _ratio(row["loraplex_median_ttft_ms"], row["llama_cpp_median_ttft_ms"])
            out.append(row)
    return out


def markdown(table: list[dict]) -> str:
    cols = (
        "workload",
        "loraplex",
        "llama.cpp",
        "out tok/s loraplex",
        "out tok/s llama.cpp",
        "loraplex / llama.cpp",
        "TTFT p50 ms loraplex",
        "TTFT p50 ms llama.cpp",
        "TPOT p50 ms loraplex",
        "TPOT p50 ms llama.cpp",
    )

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in table:
        lp = r["loraplex"] + (" (skipped)" if r["loraplex_skipped"] else "")
        peer = r["llama_cpp"] + (" (skipped)" if r["llama_cpp_skipped"] else "")
        cells = [r["workload"], lp, peer, fmt(r["loraplex_output_throughput"]), fmt(r["llama_cpp_output_throughput"])]
        cells.append("-" if r["ratio_output_throughput"] is None else f"{r['ratio_output_throughput']:.2f}x")
        cells += [fmt(r[f"{s}_{k}"]) for k in ("median_ttft_ms", "median_tpot_ms") for s in ("loraplex", "llama_cpp")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['workload']}\n{r['loraplex']} vs {r['llama_cpp']}" for r in table]
    fig, axes = plt.subplots(1, 2, figsize=(14, 1.0 + 0.9 * len(table)), squeeze=False)
    for ax, key, xlabel, fmt in (
        (axes[0][0], "output_throughput", "output tokens/s (higher is better)", "%.1f"),
        (axes[0][1], "median_ttft_ms", "median time to first token, ms (lower is better)", "%.0f"),
    ):
        ys = range(len(table))
        for side, color, shift in (("loraplex", "tab:blue", -0.2), ("llama_cpp", "tab:gray", 0.2)):
            values = [r[f"{side}_{key}"] or 0.0 for r in table]
            label = "loraplex" if side == "loraplex" else "llama.cpp"
            bars = ax.barh([y + shift for y in ys], values, height=0.4, color=color, label=label)
            ax.bar_label(bars, fmt=fmt, fontsize=8, padding=2)
        ax.set_yticks(list(ys), labels if key == "output_throughput" else [""] * len(table), fontsize=8)
        ax.invert_yaxis()
        ax.margins(x=0.12)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper right", ncols=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
