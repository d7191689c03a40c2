"""Our small-batch projection kernel (fp32 and bf16 weights) against torch, on every build this CPU runs."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from server import native
from server.model import cpu_gemv

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="GEMV kernel did not build")
RUNNABLE = native.runnable_isas()
# (K, N): the SmolLM2 projections (qkv, o, gate/up, down), odd sizes with tails, and fewer rows than a tile.
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (67, 130), (100, 3), (33, 1)]


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 16])
def test_matches_linear_in_fp64(isa, k, n, t):
    g = torch.Generator().manual_seed(k * 10 + n + t)
    x_wide = torch.randn(t, k + 5, generator=g)
    x = x_wide[:, 2 : 2 + k]  # a row-strided view
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    for bias in (None, b):
        y = cpu_gemv.linear(x, w, bias, isa=isa)
        ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        assert y.shape == (t, n) and y.dtype is torch.float32
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4 * k**0.5)


@pytest.mark.parametrize("t", [1, 4])
def test_builds_and_thread_counts_agree_bit_for_bit(t):
    g = torch.Generator().manual_seed(t)
    x, w, b = torch.randn(t, 1536, generator=g), torch.randn(3072, 1536, generator=g), torch.randn(3072, generator=g)
    old = torch.get_num_threads()
    outs = {}
    try:
        for isa, threads in itertools.product(RUNNABLE, (1, 2)):
            torch.set_num_threads(threads)
            outs[isa, threads] = cpu_gemv.linear(x, w, b, isa=isa)
    finally:
        torch.set_num_threads(old)
    (first, y0), *rest = outs.items()
    for key, y in rest:
        assert torch.equal(y, y0), (key, first)


def test_what_the_kernel_does_not_take_goes_to_torch():
    """More rows than MAX_TOKENS, other dtypes, a column-strided x, a non-contiguous weight: torch's answer."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, generator=g)
    cases = [
        (torch.randn(cpu_gemv.MAX_TOKENS[torch.float32] + 1, 32, generator=g), w),
        (torch.randn(2, 32, generator=g).double(), w.double()),
        (torch.randn(2, 32, generator=g).half(), w.half()),
        (torch.randn(32, 2, generator=g).t(), w),
        (torch.randn(2, 32, generator=g), torch.randn(32, 64, generator=g).t()),
        (torch.randn(0, 32, generator=g), w),
    ]
    for x, weight in cases:
        assert torch.equal(cpu_gemv.linear(x, weight), F.linear(x, weight))


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("t", [1, 3, 16])
def test_bf16_sums_in_fp32_and_rounds_once(isa, t):
    """bf16 weights and activations: within one bf16 rounding of the exact product of the bf16 values."""
    g = torch.Generator().manual_seed(t)
    x, w, b = (torch.randn(*s, generator=g).to(torch.bfloat16) for s in ((t, 576), (960, 576), (960,)))
    y = cpu_gemv.linear(x, w, b, isa=isa)
    assert y.dtype is torch.bfloat16
    exact = F.linear(x.double(), w.double(), b.double())
    assert torch.equal(y, exact.float().to(torch.bfloat16)) or (
        (y.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-3
    ).all()


def test_the_first_call_builds_and_uses_the_kernel(tmp_path):
    """No ``available()`` call first (as in a benchmark): the first call loads this CPU's build, not torch's path."""
    code = (
        "import torch; from server import native; native.set_cache_dir(r'%s'); from server.model import cpu_gemv; "
        "x, w = torch.randn(1, 64), torch.randn(8, 64); y = cpu_gemv.linear(x, w); "
        "assert cpu_gemv._GEMV.default is not None; torch.testing.assert_close(y, x @ w.T)" % (tmp_path / "kernels")
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
