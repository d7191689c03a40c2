"""The full load-test run on the default model: the peer comparison, the sweeps and the goals, in one command.

    python -m loadtests.suite --out loadtests/results/full

Every part starts its own servers on 127.0.0.1 and stops them. Requests are exact-length (32-word prompts,
32 new tokens, EOS ignored) and adapters are rank-16 on all seven projections unless said otherwise;
"all at once" means every request is sent at t = 0, the saturation throughput.

- ``peers``: 64 adapters, skewed popularity (alpha 0.3), all at once: loraplex against PEFT with one
  active adapter at a time (a) and PEFT's mixed-adapter batch (b).
- ``merged``: the same with 8 adapters, adding merged copies, one model per adapter (c).
- ``rates``: loraplex, 64 adapters, half the requests base-only, in steady state (every adapter has been
  used once before). Saturation first (all at once), then Poisson arrivals at fractions of it, each run
  with its own seed; p99 TTFT of adapter vs base requests at 70%.
- ``adapters``: loraplex with 1, 8, 64 and 512 adapters, skewed (alpha 0.3) and uniform (alpha 1), all at
  once, on one server over a 512-adapter store.
- ``adapters_in_memory``: the same sweep (all seven projections) with the host cache sized for every
  adapter and each used once first: S-LoRA's setting, all adapters in host memory.
- ``ranks``: loraplex, 64 adapters, all rank 16 against ranks 8/16/32/64 in turn (slots sized for 64).

Each measured run follows a warm-up pass (the same workload with the next seed; its figures are kept in
the report as ``warmup``). Writes ``<out>/<part>/...`` (reports, CDFs, sweep plots), ``<out>/suite.json``
(every summary, the goals, the command) and ``<out>/summary.md`` (the tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from loadtests.compare import (
    RunSettings,
    compare_systems,
    loraplex_args,
    markdown,
    measure,
    plot_summary,
    summarize,
    touch_adapters,
)
from loadtests.machine import machine
from loadtests.plots import plot_rate_sweep, plot_series
from loadtests.run import ints, log_to_stderr, names
from loadtests.servers import running
from loadtests.stores import TARGETS, make_store
from loadtests.workload import WorkloadSpec

log = logging.getLogger("loadtests.suite")

PARTS = ("peers", "merged", "rates", "adapters", "adapters_in_memory", "ranks")
RATE_FRACTIONS = (0.25, 0.5, 0.7, 0.85, 1.0, 1.2)
TTFT_FRACTION = 0.7
QV = ("q_proj", "v_proj")
# adapter-count sweeps: label -> (alpha, target projections); the first is the goal's
ADAPTER_SERIES = {
    "skewed (alpha 0.3)": (0.3, TARGETS),
    "uniform (alpha 1)": (1.0, TARGETS),
    "skewed, q/v adapters": (0.3, QV),
}
SUMMARY_DROP = ("requests", "by_adapter_cache_rows")


def _summary(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in SUMMARY_DROP}


@dataclasses.dataclass
class Suite:
    out: Path
    stores: Path
    requests: int
    settings: RunSettings
    max_loras: int
    rate_seconds: float
    adapter_counts: list[int]

    def spec(self, **changes: Any) -> WorkloadSpec:
        base = WorkloadSpec(
            num_adapters=64,
            alpha=0.3,
            rate=math.inf,
            num_requests=self.requests,
            prompt_len=(32, 32),
            output_len=(32, 32),
            seed=0,
        )
        return dataclasses.replace(base, **changes)

    def store(self, count: int, ranks: tuple[int, ...] = (16,), targets: tuple[str, ...] = TARGETS) -> Path:
        """Adapters ``lora-0..count-1``; smaller stores are hard links into the largest one of their kind."""

        def path(n: int) -> Path:
            name = f"r{'-'.join(map(str, ranks))}x{n}" + ("" if targets == TARGETS else "-" + "-".join(targets))
            return (self.stores / name).resolve()

        top = max(count, *self.adapter_counts) if ranks == (16,) else count  # the adapter sweep's stores are rank 16
        source = make_store(path(top), top, "lora-", 0, ranks, targets) if top > count else None
        return make_store(path(count), count, "lora-", 0, ranks, targets, source=source)

    # -- parts ----------------------------------------------------------------------------------------------

    def peers(self, count: int, systems: list[str], part: str) -> dict:
        lp_args = loraplex_args([16], self.max_loras, None)
        reports = compare_systems(
            systems, self.store(count), self.spec(num_adapters=count), self.settings, self.out / part, lp_args
        )
        rows = summarize(reports)
        plot_summary(
            rows, self.out / part / "summary.png", f"{count} adapters, {self.requests} requests at once, alpha 0.3"
        )
        return {"loraplex_args": lp_args, "systems": rows, "workload": _workload(reports[systems[0]])}

    def rates(self) -> dict:
        folder = self.out / "rates"
        spec = self.spec(base_share=0.5)
        lp_args = loraplex_args([16], self.max_loras, None)
        with running("loraplex", self.store(64), folder / "server.log", self.settings.start_timeout, lp_args) as url:
            touch_adapters(url, spec.adapter_names)  # steady state: no run pays an adapter's first-ever load
            saturation = measure(url, spec, self.settings, folder / "rate_inf", "all at once")
            sat = saturation["request_throughput"]
            no_warmup = dataclasses.replace(self.settings, warmup=False)
            reports = [saturation]
            for i, fraction in enumerate(RATE_FRACTIONS):
                seconds = self.rate_seconds * (2 if fraction == TTFT_FRACTION else 1)  # more samples for its p99
                run = dataclasses.replace(
                    spec, rate=round(sat * fraction, 3), num_requests=None, duration=seconds, seed=10 + i
                )
                report = measure(url, run, no_warmup, folder / f"rate_{fraction:g}x", f"{fraction:g}x saturation")
                report["saturation_fraction"] = fraction
                reports.append(report)
        plot_rate_sweep(reports, folder / "sweep_rate.png", "loraplex: 64 adapters (alpha 0.3), half base-only")
        return {"loraplex_args": lp_args, "saturation_request_throughput": sat, "runs": [_summary(r) for r in reports]}

    def adapters(self, in_memory: bool = False) -> dict:
        """The adapter-count sweeps; ``in_memory``: every adapter in host memory first (S-LoRA's setting)."""
        part = "adapters_in_memory" if in_memory else "adapters"
        folder = self.out / part
        top = max(self.adapter_counts)
        series: dict[str, list[dict]] = {}
        for targets in dict.fromkeys(t for _, t in ADAPTER_SERIES.values()):  # one server per store
            if in_memory and targets != TARGETS:
                continue
            sub = folder / ("all7" if targets == TARGETS else "-".join(targets))
            store = self.store(top, targets=targets)
            host = f"{_store_bytes(store) * 11 // 10}" if in_memory else None
            lp_args = loraplex_args([16], self.max_loras, host)
            with running("loraplex", store, sub / "server.log", self.settings.start_timeout, lp_args) as url:
                if in_memory:
                    touch_adapters(url, [f"lora-{i}" for i in range(top)])
                for label, (alpha, t) in ADAPTER_SERIES.items():
                    if t != targets:
                        continue
                    series[label] = [
                        measure(
                            url,
                            self.spec(num_adapters=n, alpha=alpha),
                            self.settings,
                            sub / f"alpha_{alpha:g}" / f"adapters_{n}",
                            f"{n} adapters, {label}",
                        )
                        for n in self.adapter_counts
                    ]
        plot_series(
            series,
            "num_adapters",
            "number of adapters",
            folder / "sweep_adapters.png",
            f"loraplex: {self.requests} requests at once, rank 16"
            + (", every adapter in host memory" if in_memory else ""),
            log_x=True,
        )
        return {
            "loraplex_args": lp_args,
            "series": {label: [_summary(r) for r in reports] for label, reports in series.items()},
        }

    def ranks(self) -> dict:
        folder = self.out / "ranks"
        lp_args = loraplex_args([8, 16, 32, 64], self.max_loras, None)
        reports: dict[str, dict] = {}
        for ranks in ((16,), (8, 16, 32, 64)):
            label = "all rank 16" if ranks == (16,) else "ranks 8/16/32/64"
            store = self.store(64, ranks)
            sub = folder / ("r16" if ranks == (16,) else "mixed")
            with running("loraplex", store, sub / "server.log", self.settings.start_timeout, lp_args) as url:
                reports[label] = measure(url, self.spec(), self.settings, sub, label)
        rows = {label: summarize({"loraplex": r})["loraplex"] for label, r in reports.items()}
        plot_summary(rows, folder / "summary.png", "loraplex: 64 adapters, alpha 0.3, rank mix")
        return {"loraplex_args": lp_args, "systems": rows}


def _store_bytes(store: Path) -> int:
    return sum(f.stat().st_size for f in store.glob("*/adapter_model.safetensors"))


def _workload(report: dict) -> dict:
    return {k: v for k, v in report.get("workload", {}).items() if k != "url"}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def goals(parts: dict[str, Any]) -> list[dict]:
    """The issue's goals, each with the measured value, the bound and whether it was met (None: not run)."""
    out: list[dict] = []

    def goal(name: str, value: float | None, bound: float, higher_is_better: bool) -> None:
        met = None if value is None else (value >= bound if higher_is_better else value <= bound)
        out.append({"goal": name, "value": value, "bound": bound, "met": met})

    peers = parts.get("peers", {}).get("systems", {})
    lp = peers.get("loraplex", {}).get("output_throughput")
    for system, bound in (("peft_swap", 4.0), ("peft_mixed", 2.0)):
        other = peers.get(system, {}).get("output_throughput")
        goal(f"64 adapters, skewed, saturation: loraplex / {system} output tokens/s", _ratio(lp, other), bound, True)

    for part, where in (
        ("adapters", "adapters read from disk on demand"),
        ("adapters_in_memory", "all in host memory"),
    ):
        skewed = parts.get(part, {}).get("series", {}).get(next(iter(ADAPTER_SERIES)), [])
        by_count = {r["workload"]["num_adapters"]: r["output_throughput"] for r in skewed}
        ratio = _ratio(by_count.get(512), by_count.get(8))
        goal(f"512 adapters / 8 adapters output tokens/s (skewed, {where})", ratio, 0.85, True)

    runs = parts.get("rates", {}).get("runs", [])
    at70 = next((r for r in runs if r.get("saturation_fraction") == TTFT_FRACTION), None)
    kinds = at70["by_adapter_kind"] if at70 else {}
    goal(
        "p99 TTFT adapter / base requests at 70% of saturation",
        _ratio(kinds.get("adapter", {}).get("p99_ttft_ms"), kinds.get("base", {}).get("p99_ttft_ms")),
        1.3,
        False,
    )
    return out


def summary_markdown(parts: dict[str, Any], goal_rows: list[dict]) -> str:
    lines = ["# loraplex load-test suite", ""]
    for part in ("peers", "merged", "ranks"):
        if part in parts:
            lines += [f"## {part}", "", markdown(parts[part]["systems"]), ""]
    for part in ("adapters", "adapters_in_memory"):
        if part not in parts:
            continue
        lines += [
            f"## {part}",
            "",
            "| popularity | adapters | out tok/s | p99 TTFT ms | vs 8 adapters |",
            "|---" * 5 + "|",
        ]
        for label, reports in parts[part]["series"].items():
            eight = next((r["output_throughput"] for r in reports if r["workload"]["num_adapters"] == 8), None)
            for r in reports:
                lines.append(
                    f"| {label} | {r['workload']['num_adapters']} | {r['output_throughput']:.1f} | "
                    f"{r['p99_ttft_ms']:.0f} | {_ratio(r['output_throughput'], eight)} |"
                )
        lines.append("")
    if "rates" in parts:
        lines += [
            "## rates",
            "",
            "| rate req/s | x saturation | out tok/s | p99 TTFT base ms | p99 TTFT adapter ms | adapter / base |",
            "|---" * 6 + "|",
        ]
        for r in parts["rates"]["runs"]:
            kinds = r["by_adapter_kind"]
            b, a = kinds.get("base", {}).get("p99_ttft_ms"), kinds.get("adapter", {}).get("p99_ttft_ms")
            lines.append(
                f"| {r['workload']['rate']} | {r.get('saturation_fraction', 'all at once')} | "
                f"{r['output_throughput']:.1f} | {b} | {a} | {_ratio(a, b)} |"
            )
        lines.append("")
    lines += ["## goals", "", "| goal | measured | bound | met |", "|---|---|---|---|"]
    lines += [f"| {g['goal']} | {g['value']} | {g['bound']} | {g['met']} |" for g in goal_rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("loadtests/results/full"))
    p.add_argument("--stores", type=Path, default=None, help="where the adapter stores are made (<out>/stores)")
    p.add_argument("--parts", type=names, default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--requests", type=int, default=128, help="requests per all-at-once run")
    p.add_argument("--max-loras", type=int, default=64, help="loraplex's device slots")
    p.add_argument("--rate-seconds", type=float, default=45.0, help="length of each Poisson run (70%%: twice)")
    p.add_argument("--adapter-counts", type=ints, default=[1, 8, 64, 512])
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    log_to_stderr()
    args = parse_args(argv)
    parts = args.parts
    if not parts or any(p not in PARTS for p in parts):
        log.error("error: --parts takes a comma-separated list of %s", ", ".join(PARTS))
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    suite = Suite(
        out=args.out,
        stores=args.stores or args.out / "stores",
        requests=args.requests,
        settings=RunSettings(progress=not args.no_progress),
        max_loras=args.max_loras,
        rate_seconds=args.rate_seconds,
        adapter_counts=args.adapter_counts,
    )
    results_path = args.out / "suite.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    done = results.get("parts", {})
    started = time.monotonic()
    for part in parts:
        log.info("==== part %s (%.0f s in)", part, time.monotonic() - started)
        if part == "peers":
            done[part] = suite.peers(64, ["loraplex", "peft_swap", "peft_mixed"], part)
        elif part == "adapters_in_memory":
            done[part] = suite.adapters(in_memory=True)
        elif part == "merged":
            done[part] = suite.peers(8, ["loraplex", "merged", "peft_swap", "peft_mixed"], part)
        else:
            done[part] = getattr(suite, part)()
        done[part]["command"] = "python -m loadtests.suite " + " ".join(sys.argv[1:] if argv is None else argv)
        goal_rows = goals(done)  # written after every part, so an interrupted suite keeps what it measured
        payload = {"machine": machine(), "parts": done, "goals": goal_rows}
        results_path.write_text(json.dumps(payload, indent=2) + "\n")
        (args.out / "summary.md").write_text(summary_markdown(done, goal_rows))
    print((args.out / "summary.md").read_text())
    log.info("suite done in %.0f s: %s", time.monotonic() - started, results_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
