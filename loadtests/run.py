"""Drive a running server with a planned workload and write the report and plots.

    python -m loadtests.run --url http://127.0.0.1:8000 --adapters 8 --rate 4 --requests 100 --duration 60 \\
        --alpha 0.5 --out loadtests/results/run
    python -m loadtests.run ... --sweep-rates 1,2,4          # one run per rate, then the sweep plot
    python -m loadtests.run ... --sweep-adapters 1,8,64      # one run per adapter count

A single run writes ``<out>/report.json`` and ``<out>/latency_cdfs.png``. A sweep writes each run under
``<out>/<key>_<value>/`` and, in ``<out>/``, ``report.json`` (every run's summary) and ``sweep_<key>.png``.
Adapters are named ``<prefix><i>``; they must already be on the server (checked against ``/v1/models``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import httpx

from loadtests.client import ClientConfig, check_loopback, run_plan
from loadtests.machine import machine
from loadtests.plots import plot_adapter_sweep, plot_latency_cdfs, plot_rate_sweep
from loadtests.report import build_report
from loadtests.workload import WorkloadSpec, build_plan, load_prompts

log = logging.getLogger("loadtests.run")


def server_models(url: str) -> tuple[str, set[str]]:
    """(the base model's name, every adapter name) from ``/v1/models``."""
    resp = httpx.get(url.rstrip("/") + "/v1/models", timeout=30, trust_env=False)
    resp.raise_for_status()
    cards = resp.json()["data"]
    bases = [c["id"] for c in cards if not c.get("parent")]
    base = bases[0] if bases else ""
    return base, {c["id"] for c in cards if c.get("parent")}


def missing_adapters(spec: WorkloadSpec, available: set[str]) -> list[str]:
    return [name for name in spec.adapter_names if name not in available]


def workload_summary(spec: WorkloadSpec, prompts_file: str | None, url: str) -> dict[str, Any]:
    out = {k: v for k, v in dataclasses.asdict(spec).items() if k != "prompts"}
    out["rate"] = "inf" if math.isinf(spec.rate) else spec.rate  # JSON has no infinity
    out["prompts_file"] = prompts_file
    out["url"] = url
    return out


def run_once(spec: WorkloadSpec, cfg: ClientConfig, prompts_file: str | None = None, progress: bool = True) -> dict:
    """Plan, send, and summarize one run; the report as a dict."""
    plan = build_plan(spec)
    log.info("run: %d requests, %d adapters, rate %s/s, cv %s", len(plan), spec.num_adapters, spec.rate, spec.cv)
    result = asyncio.run(run_plan(plan, cfg, sys.stderr if progress else None))
    return build_report(result, workload_summary(spec, prompts_file, cfg.url))


def write_run(report: dict, folder: Path, title: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps({"machine": machine(), **report}, indent=2) + "\n")
    plot_latency_cdfs(report, folder / "latency_cdfs.png", title)


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.replace(":", ",").partition(",")
    return int(lo), int(hi or lo)


def names(text: str) -> list[str]:
    """A comma-separated list, blanks dropped (for argparse ``type=``; ``floats`` and ``ints`` convert too)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def floats(text: str) -> list[float]:
    return [float(x) for x in names(text)]


def ints(text: str) -> list[int]:
    return [int(x) for x in names(text)]


def log_to_stderr() -> None:
    """The load tools' logging: plain messages at INFO, without httpx's line per request."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def add_workload_args(
    p: argparse.ArgumentParser,
    adapters: int,
    rate: float,
    requests: int,
    lengths: tuple[int, int],
) -> None:
    """The workload's flags (shared with ``loadtests.compare``); the defaults differ per tool."""
    p.add_argument("--adapters", type=int, default=adapters, help="number of adapters, named <prefix><i>")
    p.add_argument("--adapter-prefix", default="lora-")
    p.add_argument("--popularity", choices=("power", "zipf"), default="power")
    p.add_argument("--alpha", type=float, default=1.0, help="power-law exponent (1 = uniform, smaller = skewed)")
    p.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent (with --popularity zipf)")
    p.add_argument("--base-share", type=float, default=0.0, help="share of base-only requests, 0..1")
    p.add_argument("--rate", type=float, default=rate, help="requests per second ('inf' = all at once)")
    p.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of arrival gaps (1 = Poisson)")
    p.add_argument("--requests", type=int, default=requests, help="number of requests (0 = bounded by --duration)")
    p.add_argument("--duration", type=float, default=None, help="seconds: no request is sent after this")
    p.add_argument("--prompt-len", type=_range, default=lengths, help="prompt words, LO:HI")
    p.add_argument("--output-len", type=_range, default=lengths, help="max_tokens, LO:HI")
    p.add_argument("--prompts-file", type=Path, default=None, help='JSONL of {"prompt", "max_tokens"}')
    p.add_argument("--seed", type=int, default=0)


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    """The plan the workload flags describe; ValueError for a bad one."""
    return WorkloadSpec(
        num_adapters=args.adapters,
        adapter_prefix=args.adapter_prefix,
        popularity=args.popularity,
        alpha=args.alpha,
        zipf_s=args.zipf_s,
        base_share=args.base_share,
        rate=args.rate,
        cv=args.cv,
        num_requests=args.requests or None,
        duration=args.duration,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        prompts=load_prompts(args.prompts_file) if args.prompts_file else None,
        seed=args.seed,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server root (loopback only)")
    p.add_argument("--out", type=Path, default=Path("loadtests/results/run"), help="output folder")
    add_workload_args(p, adapters=8, rate=4.0, requests=100, lengths=(32, 64))
    p.add_argument("--base-model", default=None, help="model for base requests (default: from /v1/models)")
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS (default: exact lengths)")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to wait for in-flight requests")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--no-progress", action="store_true")
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--sweep-rates", type=floats, default=None, help="comma-separated request rates")
    sweep.add_argument("--sweep-adapters", type=ints, default=None, help="comma-separated adapter counts")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    log_to_stderr()
    args = parse_args(argv)
    try:
        check_loopback(args.url)
        spec = workload_spec(args)
    except ValueError as exc:
        log.error("error: %s", exc)
        return 2
    runs: list[tuple[str, WorkloadSpec]] = [("", spec)]
    if args.sweep_rates:
        runs = [(f"rate_{r:g}", dataclasses.replace(spec, rate=r)) for r in args.sweep_rates]
    elif args.sweep_adapters:
        runs = [(f"adapters_{n}", dataclasses.replace(spec, num_adapters=n)) for n in args.sweep_adapters]

    try:
        base_model, available = server_models(args.url)
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        log.error("error: cannot list models at %s/v1/models: %s", args.url, exc)
        return 2
    missing = sorted({m for _, s in runs for m in missing_adapters(s, available)})
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        log.error("error: %d adapters missing on %s: %s", len(missing), args.url, shown)
        return 2

    cfg = ClientConfig(
        url=args.url,
        base_model=args.base_model if args.base_model is not None else base_model,
        max_duration=args.duration,
        drain_timeout=args.drain_timeout,
        request_timeout=args.request_timeout,
        ignore_eos=not args.no_ignore_eos,
    )
    prompts_file = str(args.prompts_file) if args.prompts_file else None
    reports = []
    for name, run_spec in runs:
        report = run_once(run_spec, cfg, prompts_file, progress=not args.no_progress)
        folder = args.out / name if name else args.out
        write_run(report, folder, title=name or "")
        log.info(
            "%s: completed %d, failed %d, %.2f req/s, %.1f output tok/s, p99 TTFT %s ms -> %s",
            name or "run",
            report["completed"],
            report["failed"],
            report["request_throughput"] or 0.0,
            report["output_throughput"] or 0.0,
            report["p99_ttft_ms"],
            folder / "report.json",
        )
        reports.append(report)
    if len(runs) > 1:
        key = "rate" if args.sweep_rates else "num_adapters"
        summaries = [{k: v for k, v in r.items() if k != "requests"} for r in reports]
        sweep = {"machine": machine(), "sweep": key, "runs": summaries}
        (args.out / "report.json").write_text(json.dumps(sweep, indent=2) + "\n")
        plot = plot_rate_sweep if key == "rate" else plot_adapter_sweep
        plot(reports, args.out / f"sweep_{key}.png")
    return 0 if all(r["failed"] == 0 for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
