"""Shared by the end-to-end benchmarks (``engine_vs_peft``, ``single_stream``): setup, adapters, timing, JSON."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import torch

from loadtests.machine import machine
from server.engine.engine import Engine
from server.model.loading import LoadedModel, load_model
from tests.helpers.engine import Collected
from tests.helpers.tiny import AdapterSpec, make_adapter

T = TypeVar("T")

THREADS = 2
CACHE_DIR = Path.home() / ".cache" / "loraplex"  # the server's default: converted model and built kernels
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def setup_torch() -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)


def load_default() -> LoadedModel:
    """A fresh copy of the default model (fp32, CPU, eval); PEFT edits its model in place, so one copy per user."""
    return load_model(None, CACHE_DIR)


def make_adapters(loaded: LoadedModel, folder: Path, count: int, rank: int, seed: int) -> list[str]:
    """``count`` PEFT adapters of ``rank`` on all seven projections (alpha = 2 * rank, weights ~ N(0, 0.02))."""
    names = []
    for i in range(count):
        spec = AdapterSpec(f"bench-r{rank}-{i:03d}", rank, 2.0 * rank, PROJECTIONS)
        make_adapter(loaded.hf_model, spec, folder, seed=seed * 1000 + i, std=0.02)
        names.append(spec.name)
    return names


TimedSink = Collected  # outputs with their arrival times


def in_fresh_process(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a spawned process, as the server runs the engine.

    A process whose main thread has run torch (the PEFT baselines) keeps an
    OpenMP team alive, which would throttle the engine thread's.
    """
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its reaped children) so far."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user..steal minus idle and iowait (guest is in user)
    times = os.times()
    return busy / tick, times.user + times.system + times.children_user + times.children_system


class OtherLoad:
    """How busy other processes kept the machine while the block ran: the share of all CPUs they used.

    Our own figures are only meaningful when this is near 0 (see ``cpu_check``).
    """

    def __enter__(self) -> OtherLoad:
        self.t0, (self.busy0, self.self0) = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, mine = _cpu_seconds()
        wall = time.perf_counter() - self.t0
        others = max(0.0, (busy - self.busy0) - (mine - self.self0))
        self.share = others / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0


def wait_quiet(max_wait_s: float = 180.0, window_s: float = 2.0) -> bool:
    """Wait (idle) until other processes use under 10% of the CPUs over a window; False on time-out."""
    deadline = time.perf_counter() + max_wait_s
    while time.perf_counter() < deadline:
        with OtherLoad() as load:
            time.sleep(window_s)
        if load.share < 0.1:
            return True
    return False


def quiet_run(fn: Callable[[], T], label: str, tries: int = 3) -> tuple[T, float]:
    """Run ``fn`` under :class:`OtherLoad`; if other processes took over 10% of the CPUs, wait for quiet
    and run again (at most ``tries`` times). Returns the least disturbed result and its other-load share."""
    best: tuple[T, float] | None = None
    for attempt in range(tries):
        if attempt:
            print(f"  {label}: other processes used {best[1]:.0%} of the CPUs; waiting for quiet to measure again")
            wait_quiet()
        with OtherLoad() as load:
            out = fn()
        if best is None or load.share < best[1]:
            best = (out, load.share)
        if load.share <= 0.1:
            break
    assert best is not None
    return best


def cpu_check(label: str) -> dict:
    """Whether other processes compete for the CPUs now: the load average and a tiny matmul's latency.

    With 2 OpenMP threads and another busy process on this 2-core box, every parallel region waits for
    a descheduled thread (a 1x576x1536 matmul goes from ~0.04 ms to ~8 ms), which makes every figure
    here meaningless. Warns loudly when that is the case.
    """
    x, w = torch.randn(1, 576), torch.randn(1536, 576)
    ms = float("inf")
    for attempt in range(3):  # best of three, half a second apart: a passing blip is not contention
        if attempt:
            time.sleep(0.5)
        for _ in range(20):
            x @ w.T
        t0 = time.perf_counter()
        for _ in range(100):
            x @ w.T
        ms = min(ms, (time.perf_counter() - t0) / 100 * 1e3)
    load = os.getloadavg()
    contended = ms > 1.0
    if contended:
        print(f"!! CPU contended ({label}): 1x576x1536 matmul takes {ms:.2f} ms, load average {load[0]:.2f}")
    return {"label": label, "small_matmul_ms": round(ms, 4), "loadavg_1m": round(load[0], 2), "contended": contended}


def step_inline(engine: Engine) -> None:
    """Run a not-started engine's steps on the calling thread until it has no work (a diagnostic).

    The server steps on its own engine thread while the model was loaded on another; on this 2-core box
    libgomp then has more OpenMP threads than CPUs and throttles its spin-wait, so every parallel torch op
    on the engine thread pays a futex wake-up. Stepping where the model was loaded measures that cost.
    Uses the engine's private ``_drain``: mind it if the engine loop changes.
    """
    engine._drain(block=False)
    while engine.scheduler.has_work:
        engine.step()
        engine._drain(block=False)


def environment() -> dict:
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(),
        **machine(),
    }


def write_json(path: Path, results: dict) -> None:
    payload = {
        "command": " ".join(shlex.quote(a) for a in getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        **results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
