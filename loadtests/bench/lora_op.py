"""Micro-benchmark of the sparse (decode) LoRA op against the base projection it rides on.

For the SmolLM2-135M projection shapes, rank-16 adapters, and three precisions
(``fp32``; ``bf16``; ``mixed``: fp32 activations and base weight with bf16
adapter weights, half the adapter bytes), it times, for the same T tokens:

* ``base``: the frozen projection ``F.linear(x, W)`` (``x @ W.T``);
* ``kernel``: ``ops.add_lora`` with ``LoraBackend.CPU_KERNEL`` (our C kernel);
* ``torch``: ``ops.add_lora`` with ``LoraBackend.TORCH`` (the gather + bmm fallback; not
  for ``mixed``, which it does not support: shown as ``-``);

and prints the ratios op/base. Tokens are spread round-robin over the given
number of distinct adapters (1 = all identical). Every token goes through the
sparse path (``dense_min_tokens`` above T), which is what the kernel is for.
With ``--copies N`` the weights rotate over N copies so that they are not all
cache-hot, as they are not in a real step of 210 projections.

Run: ``python -m loadtests.bench.lora_op [--threads N] [--copies N] [--quick] [--dtypes fp32,mixed]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from server.lora import cpu_kernel
from server.lora.metadata import LoraBackend, LoraBatch
from server.lora.ops import ModuleSlots, add_lora

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))  # q/o, k/v, gate/up, down
TOKENS = (1, 8, 32, 64)
ADAPTERS = (1, 8, 32, 64)
RANK = 16
SLOTS = 64
# name -> (activation and base weight dtype, adapter weight dtype)
PRECISIONS = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "mixed": (torch.float32, torch.bfloat16),
}


def _time_us(fn: Callable[[], object], min_time: float = 0.05, repeats: int = 5) -> float:
    """Best over ``repeats`` of the mean time of one call, in microseconds."""
    for _ in range(10):
        fn()
    n = 1
    while True:  # find an iteration count that runs for about min_time
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time / 4:
            break
        n *= 4
    n = max(1, int(n * min_time / dt))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def _module_slots(d_in: int, d_out: int, dtype: torch.dtype, gen: torch.Generator) -> ModuleSlots:
    a = (torch.randn(SLOTS, RANK, d_in, generator=gen) / d_in**0.5).to(dtype)
    bt = (torch.randn(SLOTS, RANK, d_out, generator=gen) / RANK**0.5).to(dtype)
    scale = torch.full((SLOTS,), 2.0)
    rank = torch.full((SLOTS,), RANK, dtype=torch.int32)
    return ModuleSlots(a, bt, scale, rank, rank.tolist(), scale.tolist())


def run(copies: int, quick: bool, precisions: list[str]) -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = (1, 32) if quick else TOKENS
    shapes = SHAPES[:2] if quick else SHAPES
    header = (
        f"{'dtype':<5} {'d_in->d_out':>11} {'T':>3} {'adap':>4} {'base us':>8} {'kernel us':>9} "
        f"{'torch us':>8} {'kernel/base':>11} {'torch/base':>10}"
    )
    print(header)
    print("-" * len(header))
    for name in precisions:
        dtype, w_dtype = PRECISIONS[name]
        for d_in, d_out in shapes:
            ws = [(torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(dtype) for _ in range(copies)]
            mods = [_module_slots(d_in, d_out, w_dtype, gen) for _ in range(copies)]
            for t in tokens:
                x = torch.randn(t, d_in, generator=gen).to(dtype)
                fused = torch.zeros(t, d_out + 64, dtype=dtype)
                y = fused[:, :d_out]  # a column slice of a wider output, as in fused projections
                for n in ADAPTERS:
                    if n > t:
                        continue
                    slots = [(i % n) * (SLOTS // n) for i in range(t)]
                    batches = {
                        be: LoraBatch.build(slots, torch.device("cpu"), be, dense_min_tokens=t + 1)
                        for be in (LoraBackend.CPU_KERNEL, LoraBackend.TORCH)
                    }
                    it = iter(range(1 << 62))

                    def base(it=it, ws=ws, x=x) -> None:
                        F.linear(x, ws[next(it) % copies])

                    def op(be: LoraBackend, it=it, mods=mods, x=x, y=y, batches=batches) -> None:
                        add_lora(y, x, mods[next(it) % copies], batches[be])

                    base_us = _time_us(base)
                    kern_us = _time_us(lambda op=op: op(LoraBackend.CPU_KERNEL))
                    if dtype is w_dtype:
                        torch_us = _time_us(lambda op=op: op(LoraBackend.TORCH))
                        torch_cols = f"{torch_us:>8.1f} {kern_us / base_us:>11.3f} {torch_us / base_us:>10.3f}"
                    else:  # the torch backend needs one dtype
                        torch_cols = f"{'-':>8} {kern_us / base_us:>11.3f} {'-':>10}"
                    shape = f"{d_in}->{d_out}"
                    print(f"{name:<5} {shape:>11} {t:>3} {n:>4} {base_us:>8.1f} {kern_us:>9.1f} {torch_cols}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--copies", type=int, default=1, help="rotate the weights over this many copies")
    parser.add_argument("--quick", action="store_true", help="two shapes, T in {1, 32}")
    parser.add_argument(
        "--dtypes", default=",".join(PRECISIONS), help=f"comma-separated subset of {', '.join(PRECISIONS)}"
    )
    args = parser.parse_args()
    precisions = [p for p in args.dtypes.split(",") if p]
    if not precisions or any(p not in PRECISIONS for p in precisions):
        parser.error(f"--dtypes takes a comma-separated subset of {', '.join(PRECISIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if not cpu_kernel.available():
        raise SystemExit("the CPU LoRA kernel did not build; see the warning above")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, rank {RANK}, {SLOTS} slots, "
        f"{args.copies} weight copies"
    )
    run(args.copies, args.quick, precisions)


if __name__ == "__main__":
    main()
