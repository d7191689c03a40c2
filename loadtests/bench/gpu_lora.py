"""GPU benchmark of the Triton LoRA kernels (run it on a CUDA machine; it refuses to run without one).

Two parts, each printing ratios measured in the same run:

* ``op``: for Llama-7B projection shapes (4096x4096 q/k/v/o, 4096x11008 gate/up, 11008x4096 down), bf16, it
  times the batched LoRA op (``--lora-backend triton``, and the ``torch`` fallback) against the base
  projection ``x @ W.T`` it rides on, for ranks 8-64, T tokens, 1-64 distinct adapters, and the adapter
  popularity of S-LoRA's and Punica's evaluations: ``distinct`` (round-robin over the adapters),
  ``zipf`` (alpha 1, skewed) and ``identical`` (every token on one adapter). Timing uses CUDA events
  after warm-up; the ratio op/base is what an adapter adds to that projection.
* ``e2e``: the engine on the embedded default model (bf16 on CUDA) with ``--requests`` greedy requests over
  ``--adapters`` adapters, LoRA backend ``triton`` against ``torch``: generated tokens/s and their ratio.

Run: ``python -m loadtests.bench.gpu_lora [--parts op,e2e] [--quick] [--out loadtests/results/gpu_lora.json]``
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from loadtests.machine import machine
from loadtests.run import ints, names
from server.lora.metadata import LoraBackend, LoraBatch
from server.lora.ops import ModuleSlots, add_lora

SHAPES = {"qkvo": (4096, 4096), "gate_up": (4096, 11008), "down": (11008, 4096)}
POPULARITY = ("distinct", "zipf", "identical")


def token_slots(popularity: str, tokens: int, adapters: int, seed: int = 0) -> list[int]:
    """The slot of each of ``tokens`` tokens over ``adapters`` adapters, by popularity."""
    if popularity == "identical" or adapters == 1:
        return [0] * tokens
    if popularity == "distinct":
        return [t % adapters for t in range(tokens)]
    if popularity == "zipf":
        rng = random.Random(seed)
        weights = [1 / (k + 1) for k in range(adapters)]
        return sorted(rng.choices(range(adapters), weights=weights, k=tokens))
    raise ValueError(f"unknown popularity {popularity!r}; choose from {', '.join(POPULARITY)}")


def _time_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def op_part(quick: bool, ranks: list[int], tokens: list[int], adapters: list[int]) -> list[dict]:
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    shapes = dict(list(SHAPES.items())[:1]) if quick else SHAPES
    for shape, (d_in, d_out) in shapes.items():
        w = torch.randn(d_out, d_in, device=device, dtype=dtype) / d_in**0.5
        for rank in ranks:
            slots = max(adapters)
            mod = ModuleSlots(
                a=torch.randn(slots, rank, d_in, device=device, dtype=dtype) / d_in**0.5,
                bt=torch.randn(slots, rank, d_out, device=device, dtype=dtype),
                scale=torch.ones(slots, device=device),
                rank=torch.full((slots,), rank, dtype=torch.int32, device=device),
                host_rank=[rank] * slots,
                host_scale=[1.0] * slots,
            )
            for t in tokens:
                x = torch.randn(t, d_in, device=device, dtype=dtype)
                y = torch.empty(t, d_out, device=device, dtype=dtype)
                base_ms = _time_ms(lambda x=x: torch.nn.functional.linear(x, w))  # noqa: B023
                for n in adapters:
                    for popularity in POPULARITY:
                        plan = token_slots(popularity, t, n)
                        row = {"shape": shape, "rank": rank, "tokens": t, "adapters": n, "popularity": popularity,
                               "base_ms": round(base_ms, 4)}
                        for backend in (LoraBackend.TRITON, LoraBackend.TORCH):
                            batch = LoraBatch.build(plan, device, backend)
                            ms = _time_ms(lambda b=batch, x=x, y=y: add_lora(y, x, mod, b))  # noqa: B023
                            row[f"{backend.value}_ms"] = round(ms, 4)
                            row[f"{backend.value}_vs_base"] = round(ms / base_ms, 3)
                        row["triton_vs_torch"] = round(row["triton_ms"] / row["torch_ms"], 3)
                        print(
                            f"{shape:8} r={rank:<3} T={t:<4} n={n:<3} {popularity:9} base {base_ms:.4f} ms  "
                            f"triton/base {row['triton_vs_base']:.3f}  torch/base {row['torch_vs_base']:.3f}  "
                            f"triton/torch {row['triton_vs_torch']:.3f}",
                            flush=True,
                        )
                        rows.append(row)
    return rows


def e2e_part(requests: int, adapters: int, rank: int) -> dict:
    """Engine throughput on the default model, triton against torch (the same work, greedy)."""
    import tempfile

    from loadtests.bench import engine_vs_peft as evp
    from loadtests.bench.common import load_default, make_adapters

    loaded = load_default()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        adapter_names = make_adapters(loaded, store, adapters, rank, seed=0)
        work = evp.make_work(
            loaded, argparse.Namespace(seed=0, requests=requests, prompt_tokens=64, max_tokens=64), adapter_names
        )
        results = {b: evp.run_loraplex(loaded, store, work, rank, b, runs=2) for b in ("triton", "torch")}
    out = {b: r.summary(work.max_tokens) for b, r in results.items()}
    out["triton_vs_torch_tok_s"] = round(results["triton"].tok_s / results["torch"].tok_s, 3)
    print(f"e2e: triton {results['triton'].tok_s:.1f} tok/s, torch {results['torch'].tok_s:.1f} tok/s, "
          f"ratio {out['triton_vs_torch_tok_s']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", type=names, default=["op", "e2e"])
    p.add_argument("--quick", action="store_true", help="one shape, fewer points")
    p.add_argument("--ranks", type=ints, default=[8, 16, 32, 64])
    p.add_argument("--tokens", type=ints, default=[1, 16, 64, 256])
    p.add_argument("--adapters", type=ints, default=[1, 8, 32, 64])
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--e2e-adapters", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("loadtests/results/gpu_lora.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_lora needs a CUDA GPU: this machine has none (the kernels' correctness is checked without one "
              "in tests/unit/test_lora_triton.py, under Triton's interpreter)", file=sys.stderr)
        return 2
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "machine": machine()}
    if "op" in args.parts:
        tokens = [1, 64] if args.quick else args.tokens
        report["op"] = op_part(args.quick, args.ranks, tokens, args.adapters)
    if "e2e" in args.parts:
        report["e2e"] = e2e_part(args.requests, args.e2e_adapters, 16)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
