"""Decode step time with N running requests, each on its own adapter, divided by the same step with no adapters.

    python -m loadtests.bench.decode_step [--batch 32] [--rank 16] [--context 128] [--compose K]

Default model, fp32 (``--quantization auto``: its GGUF Q4_1 codes), rank-16 adapters on all seven
projections written straight into the device slots (what activation does), one decode token per request.
Prints the ratio per LoRA backend; base and adapter steps are interleaved so
drift on a noisy machine hits both alike. With ``--compose K`` each request
composes K adapters (weights 0.5) instead of using one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from loadtests.machine import machine
from server.config import CacheConfig, Config, LoraConfig, ModelConfig
from server.engine.builder import build_serving
from server.engine.scheduler import SchedulerConfig
from server.lora import cpu_kernel
from server.lora.weights import AdapterWeights
from server.model.loading import load_model
from server.model.runner import ModelRunner, SeqStep, one_adapter

CACHE = Path.home() / ".cache" / "loraplex"


def fill_slots(runner: ModelRunner, n: int, rank: int, seed: int = 0) -> None:
    shape = runner.model.shape
    dims = shape.projection_dims()
    g = torch.Generator().manual_seed(seed)
    for slot in range(n):
        a, b, scale = {}, {}, {}
        for layer in range(shape.n_layers):
            for proj, (d_in, d_out) in dims.items():
                name = shape.module_name(layer, proj)
                a[name] = torch.randn(rank, d_in, generator=g) * 0.02
                b[name] = torch.randn(rank, d_out, generator=g) * 0.02  # B^T
                scale[name] = 2.0
        runner.slots.write(slot, AdapterWeights(a, b, scale))


def time_steps(runner: ModelRunner, seqs: list[SeqStep], reps: int) -> float:
    runner.execute(seqs)
    started = time.perf_counter()
    for _ in range(reps):
        runner.execute(seqs)
    return (time.perf_counter() - started) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--adapters", type=int, default=None, help="distinct adapters (default: one per request)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backends", default="cpu,torch")
    p.add_argument("--compose", type=int, default=1, help="adapters composed per request (1: one plain adapter)")
    p.add_argument("--lora-dtype", default="auto", help="adapter slot dtype (bfloat16: bf16 adapters, fp32 serving)")
    p.add_argument("--quantization", default="none", help="base weights (none: fp32; auto: the GGUF's Q4_1 codes)")
    p.add_argument("--out", type=Path, default=Path("loadtests/results/decode_step.json"))
    args = p.parse_args()
    torch.set_num_threads(2)
    n_adapters = args.adapters or args.batch
    results = {"command": "python -m loadtests.bench.decode_step " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
        "batch": args.batch, "adapters": n_adapters, "quantization": args.quantization, "compose": args.compose,
        "rank": args.rank,
        "context": args.context,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "backends": {}}
    for backend in args.backends.split(","):
        if backend == "cpu" and not cpu_kernel.available():
            print("cpu kernel unavailable; skipping")
            continue
        config = Config(
            model=ModelConfig(quantization=args.quantization),
            lora=LoraConfig(adapters_dir=Path("/nonexistent"), max_lora_rank=args.rank,
                            max_loras=n_adapters, backend=backend, dtype=args.lora_dtype),
            cache=CacheConfig(kv_cache_tokens=args.batch * (args.context + 32)),
            scheduler=SchedulerConfig(max_model_len=args.context + 32),
        )
        runner = build_serving(config, load_model(None, CACHE)).engine.runner
        fill_slots(runner, n_adapters, args.rank)
        per_seq = -(-(args.context + 1) // 16)  # KV blocks of 16 tokens
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(args.batch)]
        base = [SeqStep([100 + i], args.context, tables[i], (), True) for i in range(args.batch)]
        if args.compose > 1:
            mixed = [
                SeqStep([100 + i], args.context, tables[i],
                        tuple(((i + j) % n_adapters, 0.5) for j in range(args.compose)), True)
                for i in range(args.batch)
            ]
        else:
            mixed = [SeqStep([100 + i], args.context, tables[i], one_adapter(i % n_adapters), True)
                     for i in range(args.batch)]
            mixed.sort(key=lambda s: s.slot)
        base_t, lora_t = [], []
        for _ in range(args.rounds):
            base_t.append(time_steps(runner, base, args.reps))
            lora_t.append(time_steps(runner, mixed, args.reps))
        b, m = statistics.median(base_t), statistics.median(lora_t)
        results["backends"][f"{backend}/{args.lora_dtype}"] = {"base_ms": b * 1e3, "lora_ms": m * 1e3, "ratio": m / b}
        print(f"{backend:6s} lora dtype {args.lora_dtype:8s} base {b * 1e3:7.1f} ms   "
              f"{n_adapters} adapters x{args.compose} per request {m * 1e3:7.1f} ms   ratio {m / b:.3f}")
        del runner
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
