"""Time each build of our CPU LoRA kernel that this CPU runs (``server.native``: avx512, avx2, portable).

For the SmolLM2-135M projection shapes, rank-16 adapters and T decode tokens spread over T adapters,
it times ``cpu_kernel.add_lora_sparse`` per build, fp32 and fp32 with bf16 adapter weights ("mixed"),
with the weights rotating over 16 copies so that they come from memory as in a real step; the figure
is the best of 5 rounds. Prints one line per case and writes JSON with the machine it ran on.

Run: ``python -m loadtests.bench.kernel_isas [--threads 1] [--out loadtests/results/kernel_isas.json]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from loadtests.machine import machine
from server.lora import cpu_kernel
from server.native import runnable_isas

SHAPES = ((576, 576), (576, 1536), (1536, 576))  # q/o, gate/up, down
TOKENS = (1, 4, 16, 64)
RANK, SLOTS, COPIES = 16, 64, 16
WEIGHTS = {"fp32": torch.float32, "mixed": torch.bfloat16}


def time_build(isa: str, d_in: int, d_out: int, t: int, wdtype: torch.dtype, calls: int) -> float:
    a = [torch.randn(SLOTS, RANK, d_in).to(wdtype) for _ in range(COPIES)]
    bt = [torch.randn(SLOTS, RANK, d_out).to(wdtype) for _ in range(COPIES)]
    scale, rank = torch.ones(SLOTS), torch.full((SLOTS,), RANK, dtype=torch.int32)
    slots = torch.arange(t, dtype=torch.int32) % SLOTS
    x, y = torch.randn(t, d_in), torch.zeros(t, d_out)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for i in range(calls):
            cpu_kernel.add_lora_sparse(y, x, a[i % COPIES], bt[i % COPIES], scale, rank, slots, isa=isa)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("loadtests/results/kernel_isas.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    isas = runnable_isas()
    rows = []
    print(f"{machine()}  threads {args.threads}")
    for (d_in, d_out), t, (wname, wdtype) in (
        (s, t, w) for s in SHAPES for t in TOKENS for w in WEIGHTS.items()
    ):
        us = {isa: time_build(isa, d_in, d_out, t, wdtype, args.calls) * 1e6 for isa in isas}
        rows.append({"shape": [d_in, d_out], "tokens": t, "weights": wname, "us": us})
        print(f"{d_in:4d}x{d_out:<4d} T={t:<3d} {wname:5s} " + "  ".join(f"{i} {v:8.1f} us" for i, v in us.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": f"python -m loadtests.bench.kernel_isas --threads {args.threads}", "machine": machine(),
               "threads": args.threads, "rank": RANK, "rows": rows}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
