"""Side-by-side run: loraplex against the peer baselines, same model, same adapters, same workload.

    python -m loadtests.compare --adapters 64 --requests 128 --rate inf --alpha 0.3 \\
        --prompt-len 32:32 --output-len 32:32 --systems loraplex,peft_swap,peft_mixed --out loadtests/results/peers

Makes N PEFT adapters for the default model in ``<out>/adapters_store`` (reused when the same ones are already
there; ``--ranks 8,16,32,64`` cycles ranks over them), then for each system in turn starts its server on
127.0.0.1, runs a warm-up pass (the same workload with the next seed; its figures are kept in the report as
``warmup``), runs the measured workload, writes ``<out>/<system>/report.json`` and ``latency_cdfs.png`` and stops
the server. Finally writes ``<out>/summary.json`` and ``<out>/summary.png`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtests.client import ClientConfig
from loadtests.machine import machine
from loadtests.run import (
    add_workload_args,
    ints,
    log_to_stderr,
    names,
    run_once,
    server_models,
    workload_spec,
    write_run,
)
from loadtests.servers import SYSTEMS, running
from loadtests.stores import make_store
from loadtests.workload import WorkloadSpec

log = logging.getLogger("loadtests.compare")

KEYS = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")
WARMUP_KEYS = ("completed", "failed", "duration", "output_throughput", "p99_ttft_ms")


@dataclass(frozen=True)
class RunSettings:
    """How each measured run is driven, whatever the system."""

    warmup: bool = True  # one pass of the same workload with the next seed first, unmeasured
    drain_timeout: float = 600.0
    request_timeout: float = 1200.0
    start_timeout: float = 300.0
    progress: bool = True
    prompts_file: str | None = None


def loraplex_args(ranks: list[int] | tuple[int, ...], max_loras: int, host_cache: str | None) -> list[str]:
    """The loraplex flags of a load run: slots for ``max_loras`` adapters of the largest rank in the store."""
    args = ["--max-lora-rank", str(max(ranks)), "--max-loras", str(max_loras)]
    return args + (["--host-cache", host_cache] if host_cache else [])


def touch_adapters(url: str, names: list[str], timeout: float = 120.0) -> None:
    """One 1-token request per adapter, a few at a time, so every adapter has been loaded once (steady state)."""

    async def go() -> None:
        limit = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=url, timeout=timeout, trust_env=False) as client:

            async def one(name: str) -> None:
                async with limit:
                    body = {"model": name, "prompt": "the", "max_tokens": 1, "temperature": 0}
                    (await client.post("/v1/completions", json=body)).raise_for_status()

            await asyncio.gather(*(one(n) for n in names))

    asyncio.run(go())


def measure(
    url: str, spec: WorkloadSpec, settings: RunSettings, folder: Path, title: str, extra: dict | None = None
) -> dict:
    """Warm up (when asked), run ``spec`` against ``url``, write the report (plus ``extra``) in ``folder``."""
    base_model, available = server_models(url)
    missing = [n for n in spec.adapter_names if n not in available]
    if missing:
        raise RuntimeError(f"{title}: {len(missing)} adapters missing on the server, e.g. {missing[:5]}")
    cfg = ClientConfig(
        url=url,
        base_model=base_model,
        max_duration=spec.duration,
        drain_timeout=settings.drain_timeout,
        request_timeout=settings.request_timeout,
    )
    warm = None
    if settings.warmup:
        log.info("%s: warm-up pass (seed %d)", title, spec.seed + 1)
        warm = run_once(dataclasses.replace(spec, seed=spec.seed + 1), cfg, settings.prompts_file, settings.progress)
    report = run_once(spec, cfg, settings.prompts_file, settings.progress)
    if warm is not None:
        report["warmup"] = {k: warm[k] for k in WARMUP_KEYS}
    report.update(extra or {})
    write_run(report, folder, title=title)
    log.info(
        "%s: completed %d, failed %d, %.2f req/s, %.1f out tok/s, p99 TTFT %s ms",
        title,
        report["completed"],
        report["failed"],
        report["request_throughput"] or 0.0,
        report["output_throughput"] or 0.0,
        report["p99_ttft_ms"],
    )
    return report


def compare_systems(
    systems: list[str],
    store: Path,
    spec: WorkloadSpec,
    settings: RunSettings,
    out: Path,
    lp_args: list[str],
) -> dict[str, dict]:
    """One server per system in turn, the same workload against each; the reports by system."""
    reports: dict[str, dict] = {}
    for system in systems:
        folder = out / system
        log.info("== %s: starting server", system)
        t0 = time.monotonic()
        with running(system, store, folder / "server.log", settings.start_timeout, lp_args) as url:
            log.info("%s ready in %.1f s at %s", system, time.monotonic() - t0, url)
            extra = {"system": system, "server_args": lp_args if system == "loraplex" else []}
            reports[system] = measure(url, spec, settings, folder, system, extra)
    return reports


def summarize(reports: dict[str, dict]) -> dict:
    rows = {s: {k: r.get(k) for k in (*KEYS, "completed", "failed")} for s, r in reports.items()}
    lp = rows.get("loraplex")
    if lp:
        for row in rows.values():
            for k in ("request_throughput", "output_throughput"):
                a, b = lp.get(k), row.get(k)
                row[f"loraplex_over_{k}"] = round(a / b, 3) if a and b else None
    return rows


def markdown(rows: dict[str, dict]) -> str:
    cols = (
        "req/s",
        "out tok/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "TPOT p50 ms",
        "TPOT p99 ms",
        "ok/failed",
        "loraplex x (out tok/s)",
    )

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| system | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for s, row in rows.items():
        cells = [fmt(row[k]) for k in KEYS] + [
            f"{row['completed']}/{row['failed']}",
            fmt(row.get("loraplex_over_output_throughput")),
        ]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_summary(rows: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, label in zip(
        axes,
        ("request_throughput", "output_throughput", "p99_ttft_ms"),
        ("requests/s", "output tokens/s", "p99 TTFT (ms)"),
        strict=True,
    ):
        values = [rows[n][key] or 0.0 for n in names]
        bars = ax.bar(names, values, color=["tab:blue" if n == "loraplex" else "tab:gray" for n in names])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.compare", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--systems", type=names, default="loraplex,peft_swap,peft_mixed", help=f"comma-separated, of {SYSTEMS}"
    )
    p.add_argument("--out", type=Path, default=Path("loadtests/results/peers"))
    p.add_argument("--store", type=Path, default=None, help="adapter store (default: <out>/adapters_store)")
    p.add_argument("--ranks", type=ints, default=[16], help="adapter ranks, cycled over the adapters (8,16,32,64)")
    p.add_argument("--max-loras", type=int, default=64, help="loraplex's device slots")
    p.add_argument("--host-cache", default=None, help="loraplex's host cache bound (default: the server's)")
    add_workload_args(p, adapters=64, rate=math.inf, requests=128, lengths=(32, 32))
    p.add_argument("--no-warmup", action="store_true", help="measure the first pass (cold caches)")
    p.add_argument("--drain-timeout", type=float, default=600.0)
    p.add_argument("--request-timeout", type=float, default=1200.0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    log_to_stderr()
    args = parse_args(argv)
    systems = args.systems
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        log.error("error: unknown systems %s (choose from %s)", unknown, ", ".join(SYSTEMS))
        return 2
    try:
        spec = workload_spec(args)
    except ValueError as exc:
        log.error("error: %s", exc)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    store = make_store(
        (args.store or args.out / "adapters_store").resolve(), args.adapters, args.adapter_prefix, args.seed, args.ranks
    )
    settings = RunSettings(
        warmup=not args.no_warmup,
        drain_timeout=args.drain_timeout,
        request_timeout=args.request_timeout,
        start_timeout=args.start_timeout,
        progress=not args.no_progress,
        prompts_file=str(args.prompts_file) if args.prompts_file else None,
    )
    lp_args = loraplex_args(args.ranks, args.max_loras, args.host_cache)
    reports = compare_systems(systems, store, spec, settings, args.out, lp_args)
    rows = summarize(reports)
    workload = {k: v for k, v in reports[systems[0]]["workload"].items() if k != "url"}
    summary = {
        "command": "python -m loadtests.compare " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "workload": workload,
        "loraplex_args": lp_args,
        "warmup": settings.warmup,
        "systems": rows,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = f"{args.adapters} adapters, {args.requests} requests, rate {args.rate:g}/s, alpha {args.alpha:g}"
    plot_summary(rows, args.out / "summary.png", title)
    print(markdown(rows))
    log.info("wrote %s and %s", args.out / "summary.json", args.out / "summary.png")
    return 0 if all(r["failed"] == 0 for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
