"""Our C kernels on every instruction set: each build compiles on any x86 machine, runs where the CPU can,
and the LoRA kernel's builds agree bit for bit.

The LoRA kernel computes the same lanes in the same order in its AVX-512, AVX2 and portable-C builds (see
``server/lora/_lora_vec.h``), so the portable build reproduces the AVX-512 arithmetic on a CPU without AVX-512:
comparing every build this CPU runs against it checks the others' arithmetic here. A build this CPU cannot run is
still compiled (so a change that breaks it fails on any machine) and its comparison is skipped with the reason.
"""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch

from server import native
from server.lora import cpu_kernel
from server.model import cpu_attention, cpu_gemv, cpu_layer_ops

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler")

RUNNABLE = native.runnable_isas()
NOT_HERE = f"this CPU ({native.cpu_model()}) runs only {', '.join(RUNNABLE)}"
# (activations, weights): fp32, bf16, fp32 with bf16 weights
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "mixed": (torch.float32, torch.bfloat16),
}


@pytest.mark.parametrize("isa", native.ISAS)
def test_every_build_compiles_and_runs_its_own_vector_layer(isa):
    """gcc builds each level on any machine; where this CPU runs it, the build reports the layer it was asked for
    (a build that silently fell back to portable loops would answer 0)."""
    assert cpu_kernel.build(isa).exists()
    assert cpu_attention.build(isa).exists()
    assert cpu_gemv.build(isa).exists()
    assert cpu_layer_ops.build(isa).exists()
    if isa in RUNNABLE:
        assert cpu_kernel.compiled_isa(isa) == cpu_kernel.ISA_CODES[isa]
    else:
        with pytest.raises(ValueError, match=f"cannot run the {isa} build"):
            cpu_kernel.available(isa)


def test_the_server_uses_the_best_build_this_cpu_runs():
    assert native.cpu_isa() == RUNNABLE[0]
    assert "portable" in RUNNABLE
    flags = native.cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags and "fma" in flags:
        assert native.cpu_isa() == "avx512"
    elif {"avx2", "fma"} <= flags:
        assert native.cpu_isa() in ("avx2", "avx512")


def _problem(dtype: str, t: int, d_in: int, d_out: int, seed: int):
    act, wt = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    ranks = [16, 1, 3, 8, 0, 5, 16, 12]
    s, r = len(ranks), 16
    a = torch.randn(s, r, d_in, generator=g) / d_in**0.5
    bt = torch.randn(s, r, d_out, generator=g) / 4
    for i, ri in enumerate(ranks):
        a[i, ri:], bt[i, ri:] = 0, 0
    scale = torch.rand(s, generator=g) + 0.5
    rank = torch.tensor(ranks, dtype=torch.int32)
    slots = torch.randint(-1, s, (t,), generator=g, dtype=torch.int32)
    x = torch.randn(t, d_in, generator=g).to(act)
    y = torch.randn(t, d_out, generator=g).to(act)
    return y, (x, a.to(wt), bt.to(wt), scale, rank, slots)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("t", "d_in", "d_out"), [(1, 576, 1536), (5, 67, 130), (33, 576, 192), (256, 130, 67)])
def test_lora_kernel_builds_agree_bit_for_bit_at_any_thread_count(dtype, t, d_in, d_out):
    """Every build this CPU runs, on one and two threads, gives the same bits (tails, rank 0, base rows included)."""
    y0, args = _problem(dtype, t, d_in, d_out, seed=t * 1000 + d_in)
    results = {}
    old = torch.get_num_threads()
    try:
        for isa, threads in itertools.product(RUNNABLE, (1, 2)):
            torch.set_num_threads(threads)
            y = y0.clone()
            cpu_kernel.add_lora_sparse(y, *args, isa=isa)
            results[isa, threads] = y
    finally:
        torch.set_num_threads(old)
    (first, y_first), *rest = results.items()
    assert not torch.equal(y_first, y0) or not (args[-1] >= 0).any()  # the call did something
    for key, y in rest:
        assert torch.equal(y, y_first), (key, first)


VECTOR_BUILDS = [
    pytest.param(
        isa,
        marks=pytest.mark.skipif(
            isa not in RUNNABLE, reason=f"{NOT_HERE}: the {isa} build is compiled (test above) but cannot run here"
        ),
    )
    for isa in native.ISAS
    if isa != "portable"
]


@pytest.mark.parametrize("isa", VECTOR_BUILDS)
def test_each_vector_build_equals_the_portable_build(isa):
    """The portable build is the oracle for the vector builds' arithmetic: same lanes, same order, same bits."""
    for dtype in DTYPES:
        y0, args = _problem(dtype, 17, 576, 1536, seed=99)
        y_isa, y_portable = y0.clone(), y0.clone()
        cpu_kernel.add_lora_sparse(y_isa, *args, isa=isa)
        cpu_kernel.add_lora_sparse(y_portable, *args, isa="portable")
        assert torch.equal(y_isa, y_portable), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", RUNNABLE)
def test_decode_attention_builds_equal_sdpa(isa, dtype):
    """Each build this CPU runs against attention over the gathered context (fp32 tolerance: the builds
    vectorise the softmax sums differently). bf16: the same fp32 attention of the widened inputs, rounded
    to bf16 once (within one bf16 step of it)."""
    g = torch.Generator().manual_seed(11)
    b, h, kv, d, n = 4, 6, 2, 64, 256
    q = torch.randn(b, h, d, generator=g).to(dtype)
    k_cache = torch.randn(n, kv, d, generator=g).to(dtype)
    v_cache = torch.randn(n, kv, d, generator=g).to(dtype)
    lengths = torch.tensor([1, 7, 40, 129], dtype=torch.int32)
    index = torch.stack([torch.randperm(n, generator=g)[:129] for _ in range(b)])
    out = cpu_attention.decode_attention(q, k_cache, v_cache, index, lengths, d**-0.5, isa=isa)
    assert out.dtype is dtype
    for i in range(b):
        idx = index[i, : lengths[i]]
        k = k_cache[idx].float().repeat_interleave(h // kv, dim=1).transpose(0, 1)  # [H, L, D]
        v = v_cache[idx].float().repeat_interleave(h // kv, dim=1).transpose(0, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(q[i].float().unsqueeze(1), k, v).squeeze(1)
        if dtype is torch.float32:
            torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
        else:
            step = ref.abs().clamp_min(1e-30) * 2.0**-7  # one bf16 step (8 significant bits) at ref's size
            assert ((out[i].float() - ref).abs() <= step).all()
