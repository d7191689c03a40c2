"""Side-by-side run: loraplex against the peer baselines, same model, same adapters, same workload.

    python -m loadtests.compare --adapters 64 --requests 128 --rate inf --alpha 0.3 \\
        --prompt-len 32:32 --output-len 32:32 --systems loraplex,peft_swap,peft_mixed --out loadtests/results/peers

Makes N rank-16 PEFT adapters for the default model in ``<out>/adapters_store`` (reused when the same count
is already there), then for each system in turn starts its server on 127.0.0.1, runs the workload (same spec,
same seed), writes ``<out>/<system>/report.json`` and ``latency_cdfs.png`` and stops the server. Finally writes
``<out>/summary.json`` and ``<out>/summary.png`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from loadtests.client import ClientConfig
from loadtests.run import add_workload_args, run_once, server_models, workload_spec, write_run
from tests.helpers.server_process import free_port, wait_until_up

log = logging.getLogger("loadtests.compare")

SYSTEMS = ("loraplex", "peft_swap", "peft_mixed", "merged")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 16
KEYS = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")


def make_store(store: Path, count: int, prefix: str, seed: int) -> Path:
    """``count`` rank-16 adapters named ``<prefix><i>`` in ``store``; reused when exactly those are there."""
    names = [f"{prefix}{i}" for i in range(count)]
    # loraplex keeps ``.lock`` and ``.staging/`` in the store: hidden entries are not adapters
    present = (
        {p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")} if store.is_dir() else set()
    )
    if present == set(names) and all((store / n / "adapter_config.json").is_file() for n in names):
        log.info("reusing %d adapters in %s", count, store)
        return store
    import shutil

    from server.model.loading import load_model
    from tests.helpers.tiny import AdapterSpec, make_adapter

    if store.exists():
        shutil.rmtree(store)
    tmp = store.with_name(store.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base = load_model(None, Path.home() / ".cache" / "loraplex").hf_model
    for i, name in enumerate(names):
        make_adapter(base, AdapterSpec(name, RANK, 2 * RANK, TARGETS), tmp, seed + i, std=0.02)
    tmp.rename(store)
    log.info("made %d adapters in %s", count, store)
    return store


def server_cmd(system: str, store: Path, port: int) -> list[str]:
    if system == "loraplex":
        return [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--adapters-dir",
            str(store),
            "--max-lora-rank",
            str(RANK),
            "--max-loras",
            "16",
        ]
    return [sys.executable, "-m", f"loadtests.baselines.{system}", "--adapters-dir", str(store), "--port", str(port)]


@contextmanager
def running(system: str, store: Path, log_path: Path, timeout: float = 300.0):
    """Start ``system``'s server, yield its URL once /ready (or /health) answers 200, and always stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            server_cmd(system, store, port), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            wait_until_up(proc, url + "/ready", log_path, timeout, poll=0.3)  # the baselines serve /ready too
            yield url
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    with suppress(ProcessLookupError, PermissionError):  # anything left in the server's own process group
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


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
    p.add_argument("--systems", default="loraplex,peft_swap,peft_mixed", help=f"comma-separated, of {SYSTEMS}")
    p.add_argument("--out", type=Path, default=Path("loadtests/results/peers"))
    p.add_argument("--store", type=Path, default=None, help="adapter store (default: <out>/adapters_store)")
    add_workload_args(p, adapters=64, rate=math.inf, requests=128, lengths=(32, 32))
    p.add_argument("--drain-timeout", type=float, default=600.0)
    p.add_argument("--request-timeout", type=float, default=1200.0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
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
        (args.store or args.out / "adapters_store").resolve(), args.adapters, args.adapter_prefix, args.seed
    )
    reports: dict[str, dict] = {}
    for system in systems:
        folder = args.out / system
        log.info("== %s: starting server", system)
        t0 = time.monotonic()
        with running(system, store, folder / "server.log", args.start_timeout) as url:
            log.info("%s ready in %.1f s at %s", system, time.monotonic() - t0, url)
            base_model, available = server_models(url)
            missing = [n for n in spec.adapter_names if n not in available]
            if missing:
                raise RuntimeError(f"{system}: {len(missing)} adapters missing, e.g. {missing[:5]}")
            cfg = ClientConfig(
                url=url,
                base_model=base_model,
                max_duration=args.duration,
                drain_timeout=args.drain_timeout,
                request_timeout=args.request_timeout,
            )
            prompts_file = str(args.prompts_file) if args.prompts_file else None
            report = run_once(spec, cfg, prompts_file, progress=not args.no_progress)
        report["system"] = system
        write_run(report, folder, title=system)
        reports[system] = report
        log.info(
            "%s: completed %d, failed %d, %.2f req/s, %.1f out tok/s, p99 TTFT %s ms",
            system,
            report["completed"],
            report["failed"],
            report["request_throughput"] or 0.0,
            report["output_throughput"] or 0.0,
            report["p99_ttft_ms"],
        )

    rows = summarize(reports)
    workload = (
        {k: v for k, v in reports[systems[0]]["workload"].items() if k != "url"}
        if "workload" in reports[systems[0]]
        else {}
    )
    summary = {
        "command": "python -m loadtests.compare " + " ".join(sys.argv[1:] if argv is None else argv),
        "workload": workload,
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
