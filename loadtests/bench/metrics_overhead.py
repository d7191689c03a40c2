"""What metrics cost on the hot path: engine throughput with metrics on vs off, in one run.

Two engines on the default model (SmolLM2-135M, fp32, CPU), built by
``build_serving`` exactly as the server builds them, one with every metric on
(``MetricsConfig(enabled=True, adapter_top_k=10, vllm_compatible=True)``: the
per-adapter label and the vLLM gauges too) and one with ``enabled=False`` (no
registry, no telemetry calls). Both get the same mixed workload: ``--requests``
greedy requests, round-robin over ``--adapters`` rank ``--rank`` adapters on all
seven projections and the base model, ``--prompt-tokens`` random token ids,
exactly ``--max-tokens`` new tokens each, all submitted at once through
``engine.submit``. Rounds alternate on/off, off/on, ... so drift on a noisy
machine hits both alike; generated tokens/s per round, the median of each, and
their ratio (the goal: metrics cost under 2%, a ratio above 0.98).

Run: ``python -m loadtests.bench.metrics_overhead [--requests 32] [--rounds 10]``
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from loadtests.bench.common import CACHE_DIR, OtherLoad, TimedSink, cpu_check, make_adapters, setup_torch, write_json
from server.config import CacheConfig, Config, LoraConfig, ModelConfig
from server.engine.builder import Serving, build_serving
from server.engine.request import FinishReason, Request, SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.metrics import MetricsConfig
from server.model.loading import load_model

RESULTS = Path(__file__).resolve().parents[1] / "results" / "metrics_overhead.json"
ON = MetricsConfig(enabled=True, adapter_top_k=10, vllm_compatible=True)
OFF = MetricsConfig(enabled=False)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def make_work(vocab: int, special: set[int], args: argparse.Namespace, names: list[str]):
    """(prompt ids, adapter name or None) per request: round-robin over the adapters, then the base model."""
    gen = torch.Generator().manual_seed(args.seed)
    targets: list[str | None] = [*names, None]
    work = []
    for i in range(args.requests):
        ids: list[int] = []
        while len(ids) < args.prompt_tokens:
            t = int(torch.randint(vocab, (1,), generator=gen))
            if t not in special:
                ids.append(t)
        work.append((ids, targets[i % len(targets)]))
    return work


def build(adapters_dir: Path, args: argparse.Namespace, metrics: MetricsConfig) -> Serving:
    per_request = -(-(args.prompt_tokens + args.max_tokens) // 16) * 16
    config = Config(
        model=ModelConfig(cache_dir=CACHE_DIR),
        lora=LoraConfig(adapters_dir=adapters_dir, max_lora_rank=args.rank, max_loras=max(16, args.adapters)),
        cache=CacheConfig(kv_cache_tokens=max(4096, args.requests * per_request)),
        scheduler=SchedulerConfig(max_model_len=per_request),
        metrics=metrics,
    )
    serving = build_serving(config, load_model(None, CACHE_DIR))
    serving.engine.start()
    return serving


def drive(serving: Serving, work, max_tokens: int, tag: str) -> tuple[int, float]:
    """Submit every request at once, wait for all; (generated tokens, wall seconds)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    sinks = []
    for i, (ids, name) in enumerate(work):
        sink = TimedSink()
        adapter = serving.store.get(name) if name else None
        serving.engine.submit(Request(f"{tag}-{i}", ids, params, adapter=adapter), sink)
        sinks.append(sink)
    for i, sink in enumerate(sinks):
        if not sink.done.wait(600):
            raise RuntimeError(f"request {tag}-{i} did not finish in 600 s")
        if sink.error is not None or sink.last.finish_reason is not FinishReason.LENGTH:
            raise RuntimeError(f"request {tag}-{i} ended {sink.last.finish_reason}: {sink.error}")
    wall = time.perf_counter() - started
    return sum(len(s.token_ids) for s in sinks), wall


@contextlib.contextmanager
def timed_telemetry(telemetry) -> Iterator[dict[str, float]]:
    """Time every call the engine makes into ``telemetry`` (instance attributes shadow its methods meanwhile)."""
    spent: dict[str, float] = {}
    names = ("accepted", "scheduled", "token", "finished", "stepped", "state")

    def timed(name: str, fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

        return call

    for name in names:
        setattr(telemetry, name, timed(name, getattr(telemetry, name)))
    try:
        yield spent
    finally:
        for name in names:
            delattr(telemetry, name)


def main() -> None:
    args = parse_args()
    setup_torch()
    started = time.perf_counter()
    checks = [cpu_check("start")]
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        adapters_dir = Path(tmp)
        loaded = load_model(None, CACHE_DIR)
        names = make_adapters(loaded, adapters_dir, args.adapters, args.rank, args.seed)
        work = make_work(len(loaded.tokenizer), set(loaded.tokenizer.all_special_ids), args, names)
        del loaded
        engines = {"on": build(adapters_dir, args, ON), "off": build(adapters_dir, args, OFF)}
        assert engines["on"].metrics is not None and engines["off"].metrics is None
        print(
            f"{args.requests} requests over {args.adapters} rank-{args.rank} adapters and the base model, "
            f"prompt {args.prompt_tokens} tokens, {args.max_tokens} new tokens each, greedy, fp32, "
            f"{torch.get_num_threads()} threads; {args.rounds} rounds per engine, alternating"
        )
        rounds: dict[str, list[dict]] = {"on": [], "off": []}
        try:
            for key, serving in engines.items():  # warm-up: adapters loaded onto slots, first-call costs paid
                drive(serving, work, min(4, args.max_tokens), f"warm-{key}")
            for r in range(args.rounds):
                for key in ("on", "off") if r % 2 == 0 else ("off", "on"):
                    with OtherLoad() as load:
                        tokens, wall = drive(engines[key], work, args.max_tokens, f"r{r}-{key}")
                    rounds[key].append({"round": r, "tokens": tokens, "wall_s": round(wall, 4),
                                        "tokens_per_s": round(tokens / wall, 2), "other_load": round(load.share, 3)})
                    print(f"  round {r:2d} metrics {key:3s} {tokens / wall:8.1f} tok/s   others {load.share:.0%}")
            # The direct measure, free of the machine's noise: time spent inside the engine's telemetry calls.
            with timed_telemetry(engines["on"].engine.telemetry) as spent:
                tokens, wall = drive(engines["on"], work, args.max_tokens, "timed-telemetry")
            telemetry_share = sum(spent.values()) / wall
            print(f"  time in telemetry calls: {sum(spent.values()) * 1e3:.1f} ms of {wall:.2f} s "
                  f"({telemetry_share:.3%}): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in spent.items()))
            recorded = engines["on"].metrics.registry.get_sample_value(
                "loraplex_generation_tokens_total", {"adapter_kind": "adapter"})
            if not recorded:
                problems.append("the metrics-on engine recorded no generated tokens: metrics were not on")
        finally:
            for serving in engines.values():
                serving.stop()
    checks.append(cpu_check("end"))
    problems += [f"CPU contended at {c['label']}" for c in checks if c["contended"]]
    disturbed = [f"{k} round {x['round']}" for k, rs in rounds.items() for x in rs if x["other_load"] > 0.1]
    if disturbed:
        problems.append(f"other processes used over 10% of the CPUs during: {', '.join(disturbed)}")

    median = {k: statistics.median(x["tokens_per_s"] for x in rs) for k, rs in rounds.items()}
    ratio = median["on"] / median["off"]
    paired = [on["tokens_per_s"] / off["tokens_per_s"] for on, off in zip(rounds["on"], rounds["off"], strict=True)]
    print()
    print(f"metrics on  {median['on']:8.1f} tok/s (median of {args.rounds})")
    print(f"metrics off {median['off']:8.1f} tok/s (median of {args.rounds})")
    print(f"ratio on/off {ratio:.4f} (cost {1 - ratio:+.2%}); per-round ratios "
          f"{min(paired):.3f}..{max(paired):.3f}, median {statistics.median(paired):.4f}")
    print(f"telemetry calls on the engine thread: {telemetry_share:.3%} of the wall time")
    for p in problems:
        print(f"!! {p}")
    total = time.perf_counter() - started
    write_json(
        args.out,
        {
            "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "metrics_on": {"enabled": True, "adapter_top_k": ON.adapter_top_k, "vllm_compatible": True},
            "metrics_off": {"enabled": False},
            "workload": "requests round-robin over the adapters and the base model, random non-special prompt ids "
            "(seeded), ignore_eos, all submitted at once via engine.submit; rank-16 PEFT adapters on all 7 "
            "projections (alpha = 2 * rank)",
            "timing": "after one warm-up pass per engine; rounds alternate on/off and off/on",
            "tokens_per_s_median": {k: round(v, 2) for k, v in median.items()},
            "ratio_on_over_off": round(ratio, 4),
            "overhead": round(1 - ratio, 4),
            "paired_round_ratios": [round(x, 4) for x in paired],
            "telemetry_share_of_wall": round(telemetry_share, 5),
            "telemetry_seconds_by_call": {k: round(v, 5) for k, v in spent.items()},
            "rounds": rounds,
            "cpu_checks": checks,
            "problems": problems,
            "script_seconds": round(total, 1),
        },
    )


if __name__ == "__main__":
    main()
