"""Decode-sized fp32 projections: our GEMV kernel (``server.model.cpu_gemv``) against ``F.linear``, same run.

For the SmolLM2-135M projection shapes and the lm_head, 1 and 4 tokens, the weights rotating over copies
larger than the caches (as in a real step, which reads every weight once), best of 5 rounds per case.
Prints time and the weight bytes read per second; writes JSON with the machine it ran on.

Run: ``python -m loadtests.bench.gemv [--threads 2] [--out loadtests/results/gemv.json]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from loadtests.machine import machine
from server.model import cpu_gemv

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576))  # qkv, o, gate/up, down, lm_head
TOKENS = (1, 4)


def best_time(fn, x: torch.Tensor, weights: list[torch.Tensor], calls: int) -> float:
    for w in weights:
        fn(x, w)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for i in range(calls):
            fn(x, weights[i % len(weights)])
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("loadtests/results/gemv.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{machine()}  threads {args.threads}")
    for (n, k), t in ((s, t) for s in SHAPES for t in TOKENS):
        weights = [torch.randn(n, k) for _ in range(max(1, 256_000_000 // (n * k * 4)))]
        x = torch.randn(t, k)
        torch_s = best_time(F.linear, x, weights, args.calls)
        ours_s = best_time(cpu_gemv.linear, x, weights, args.calls)
        gbps = {name: n * k * 4 / s / 1e9 for name, s in (("torch", torch_s), ("ours", ours_s))}
        rows.append({"weight": [n, k], "tokens": t, "torch_us": torch_s * 1e6, "ours_us": ours_s * 1e6,
                     "torch_gb_s": gbps["torch"], "ours_gb_s": gbps["ours"], "speedup": torch_s / ours_s})
        print(f"W {n:5d}x{k:<4d} T={t}  torch {torch_s * 1e6:8.1f} us ({gbps['torch']:4.1f} GB/s)  "
              f"ours {ours_s * 1e6:8.1f} us ({gbps['ours']:4.1f} GB/s)  {torch_s / ours_s:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": f"python -m loadtests.bench.gemv --threads {args.threads}", "machine": machine(),
               "threads": args.threads, "rows": rows}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
