"""Quantized base weights: GGUF blocks read as gguf-py writes them, and our kernel on the codes.

The reference for the GGUF formats is gguf-py's own ``quantize`` / ``dequantize`` (llama.cpp's
Python package). The references for the kernel: for decode-sized steps (integer dot products on
activations quantized per 32-value block, as GGML does), a float64 product of the same quantized
activations and the dequantized weights; for longer steps, its dense fp32 mode on the dequantized
values, which it must equal bit for bit.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from server import native
from server.config import ModelConfig
from server.model import cpu_gemv, quantized
from server.model.gguf_blocks import unpack
from server.model.quantized_base import UnsupportedQuantization, check_supported

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="GEMV kernel did not build")
RUNNABLE = native.runnable_isas()
GGUF_KINDS = ("Q8_0", "Q4_0", "Q4_1")


def _gguf_matrix(kind: str, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """gguf-py's bytes of a random matrix in ``kind``, and its own dequantization of them."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    qtype = GGMLQuantizationType[kind]
    raw = gguf_quantize(w, qtype)
    return raw, gguf_dequantize(raw, qtype)


@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_gguf_blocks_dequantize_as_gguf_py_does(kind):
    raw, expected = _gguf_matrix(kind, 6, 96, seed=1)
    blocks = unpack(kind, raw, (6, 96))
    assert torch.equal(blocks.dequantize(), torch.from_numpy(expected))
    matrix = quantized.from_blocks(blocks)  # the kernel's dequantization of the same codes
    assert torch.equal(matrix.dequantize(), torch.from_numpy(expected))
    rows = torch.tensor([5, 0, 3, 1, 2, 4])
    assert torch.equal(blocks.take_rows(rows).dequantize(), torch.from_numpy(expected)[rows])


def test_a_row_of_partial_blocks_is_refused():
    with pytest.raises(ValueError, match="whole number of 32-value blocks"):
        unpack("Q8_0", np.zeros((2, 34), np.uint8), (2, 40))


def _matrices(n: int, k: int, seed: int) -> dict[str, quantized.QuantizedMatrix]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    out = {scheme: quantized.quantize(w, scheme) for scheme in quantized.SCHEMES if k % 32 == 0 or scheme == "int8"}
    for kind in GGUF_KINDS:
        if k % 32 == 0:
            raw, _ = _gguf_matrix(kind, n, k, seed)
            out[kind] = quantized.from_blocks(unpack(kind, raw, (n, k)))
    return out


def _quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the integer path sees it: per 32-value block, ``d * round(x * 127 / max|x|)`` with ``d = max|x| / 127``
    (fp32 scale and products, rounding half to even), returned in float64."""
    t, k = x.shape
    blocks = x.view(t, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)  # (127 / amax is reciprocal times 127)
    q = torch.round(blocks * inv)
    return (q.double() * (amax / 127.0).double()).view(t, k)


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize(("k", "n"), [(576, 960), (1536, 576), (64, 7), (100, 33)])
def test_codes_give_the_product_of_their_dequantized_copy(isa, k, n):
    """By default (exact activations), and with int8 activations beyond QDOT_TOKENS tokens or on rows of partial
    blocks: the dense kernel on the dequantized matrix, bit for bit, up to its token limit; close to a float64
    product beyond. With int8 activations up to QDOT_TOKENS tokens on rows of whole blocks: the product of the
    8-bit activations with the dequantized matrix, to fp32 rounding."""
    for name, m in _matrices(n, k, seed=k + n).items():
        dense = m.dequantize()
        b = torch.randn(n)
        for t, int8 in itertools.product((1, 2, 3, 4, 7, cpu_gemv.QDOT_TOKENS + 1, 40), (False, True)):
            x = torch.randn(t, k)
            y = cpu_gemv.quantized_linear(x, m.codes, m.mode, m.scales, m.mins, m.group, m.offset, m.k, b,
                                          int8_activations=int8, isa=isa)
            integer = int8 and t <= cpu_gemv.QDOT_TOKENS and k % 32 == 0
            if not integer and t <= cpu_gemv.MAX_TOKENS[torch.float32]:
                assert torch.equal(y, cpu_gemv.linear(x, dense, b, isa=isa)), (name, t, int8)
            xs = _quantized_activations(x) if integer else x.double()
            ref = F.linear(xs, dense.double(), b.double())
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * k**0.5,
                                       msg=lambda m, name=name, t=t, int8=int8: f"{name} t={t} int8={int8}: {m}")


def test_integer_path_error_is_that_of_8_bit_activations():
    """Against the exact product of the weights' own values: within half an activation step per block."""
    m = dataclasses.replace(quantized.quantize(torch.randn(256, 512), "int4"), int8_activations=True)
    x = torch.randn(3, 512) * torch.linspace(0.1, 10, 512)
    y = m.linear(x)
    exact = x.double() @ m.dequantize().double().T
    steps = (x.view(3, 16, 32).abs().amax(-1) / 127).double()  # [T, blocks]
    w_abs = m.dequantize().abs().double().view(256, 16, 32).sum(-1)  # [N, blocks]
    bound = steps @ w_abs.T / 2  # sum over blocks of half a step times sum |w|
    assert ((y.double() - exact).abs() <= bound * (1 + 1e-4) + 1e-4).all()
    assert (y.double() - exact).abs().max() > 0  # it is the quantized path, not the fp32 one
    # Exact activations (the default): the fp32 product of the dequantized weights, bit for bit.
    exact_m = dataclasses.replace(m, int8_activations=False)
    assert torch.equal(exact_m.linear(x), cpu_gemv.linear(x, m.dequantize()))


def test_long_steps_multiply_the_dequantized_matrix():
    m = quantized.quantize(torch.randn(64, 96), "int4")
    x = torch.randn(quantized.KERNEL_TOKENS + 1, 96)
    assert torch.equal(m.linear(x), F.linear(x, m.dequantize()))


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("t", [1, 4, 9])
def test_builds_and_thread_counts_agree_bit_for_bit(t, int8):
    old = torch.get_num_threads()
    try:
        for name, m in _matrices(1024, 576, seed=t).items():
            x = torch.randn(t, 576)
            outs = []
            for isa, threads in itertools.product(RUNNABLE, (1, 2)):
                torch.set_num_threads(threads)
                outs.append(cpu_gemv.quantized_linear(x, m.codes, m.mode, m.scales, m.mins, m.group, m.offset, m.k,
                                                      int8_activations=int8, isa=isa))
            assert all(torch.equal(o, outs[0]) for o in outs), name
    finally:
        torch.set_num_threads(old)


def test_quantization_error_is_that_of_the_scheme():
    """Round to nearest: every value within half a step of its scale (int8 per row, int4 per 32 values)."""
    w = torch.randn(48, 256) * torch.linspace(0.01, 3, 48)[:, None]
    i8, i4 = quantized.quantize(w, "int8"), quantized.quantize(w, "int4")
    assert ((i8.dequantize() - w).abs() <= i8.scales / 2 * (1 + 1e-5)).all()
    step4 = i4.scales.repeat_interleave(32, dim=1)
    assert ((i4.dequantize() - w).abs() <= step4 / 2 * (1 + 1e-5) + 1e-6).all()
    assert i8.codes.dtype is torch.int8 and i4.codes.shape == (48, 128)  # two 4-bit codes a byte


def test_fusing_rows_keeps_each_part():
    a, b = quantized.quantize(torch.randn(8, 64), "int4"), quantized.quantize(torch.randn(4, 64), "int4")
    fused = quantized.concat_rows([a, b])
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    assert quantized.concat_rows([a, quantized.quantize(torch.randn(4, 64), "int8")]) is None  # formats differ


def test_saved_matrices_load_back_equal(tmp_path):
    mats = _matrices(40, 64, seed=3)
    quantized.save_matrices(mats, tmp_path / "q.safetensors")
    back = quantized.load_matrices(tmp_path / "q.safetensors")
    assert set(back) == set(mats)
    for name, m in mats.items():
        assert (back[name].kind, back[name].mode, back[name].group, back[name].offset) == (
            m.kind, m.mode, m.group, m.offset)
        assert torch.equal(back[name].dequantize(), m.dequantize())


@pytest.mark.parametrize(
    ("device", "dtype", "needle"),
    [("cuda", torch.float32, "CPU only"), ("cpu", torch.bfloat16, "--dtype float32")],
)
def test_unsupported_combinations_are_refused_naming_the_flag(device, dtype, needle):
    for scheme in ("int8", "int4"):
        with pytest.raises(UnsupportedQuantization, match=f"--quantization {scheme}") as info:
            check_supported(scheme, torch.device(device), dtype)
        assert needle in str(info.value)
    check_supported("none", torch.device(device), dtype)
    check_supported("auto", torch.device(device), dtype)


def test_int8_activations_need_quantized_weights():
    with pytest.raises(UnsupportedQuantization, match="--activations int8 applies to quantized base weights"):
        check_supported("none", torch.device("cpu"), torch.float32, "int8")
    for scheme in ("auto", "int8", "int4"):
        check_supported(scheme, torch.device("cpu"), torch.float32, "int8")
    with pytest.raises(ValueError, match="activations must be one of exact, int8"):
        ModelConfig(activations="int4")
