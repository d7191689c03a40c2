"""The fast LoRA ops against the fp32 reference loop, over batch mixes shaped like real traffic."""

from __future__ import annotations

import shutil
import zlib

import pytest
import torch

from server.lora import cpu_kernel
from server.lora.metadata import LoraBackend, LoraBatch
from server.lora.ops import ModuleSlots, add_lora
from server.lora.reference import add_lora_reference
from server.native import runnable_isas

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="CPU LoRA kernel did not build")
# Every kernel test runs each build this CPU can run (AVX-512 and AVX2 where present, portable C always);
# tests/unit/test_kernel_isas.py holds the builds bit-equal to each other and compiles the rest.
each_isa = pytest.mark.parametrize("isa", runnable_isas())

DTYPES = [torch.float32, torch.bfloat16]
# (d_in, d_out): square, narrow, wide, odd, and the SmolLM2 k/v projection.
SHAPES = [(64, 64), (67, 130), (130, 67), (576, 192)]
# Per-slot ranks of a 64-slot buffer with R = 16; in "mixed", every sixth slot holds an adapter that
# does not target this module (rank 0).
SLOTS = 64
RANKS = {
    "r1": [1] * SLOTS,
    "r3": [3] * SLOTS,
    "rmax": [16] * SLOTS,
    "mixed": ([16, 1, 3, 8, 0, 5] * SLOTS)[:SLOTS],
}
MIXES = ["distinct", "zipf", "identical", "base_mixed", "rank0"]
TOKENS = [1, 3, 17, 63]
PAD = (5, 11)  # y is y_wide[:, 5 : 5 + d_out] of a [T, 5 + d_out + 11] tensor


def seed(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def make_slots(d_in: int, d_out: int, ranks: list[int], dtype: torch.dtype, gen: torch.Generator) -> ModuleSlots:
    """Slot buffers filled the way activation fills them: rows past each slot's rank are zero."""
    s, r = len(ranks), max(16, max(ranks))
    a = torch.randn(s, r, d_in, generator=gen) / d_in**0.5
    bt = torch.randn(s, r, d_out, generator=gen) / 4
    for i, ri in enumerate(ranks):
        a[i, ri:] = 0
        bt[i, ri:] = 0
    scale = torch.rand(s, generator=gen) + 0.5
    rank = torch.tensor(ranks, dtype=torch.int32)
    return ModuleSlots(a.to(dtype), bt.to(dtype), scale, rank, list(ranks), scale.tolist())


def make_token_slots(mix: str, t: int, ranks: list[int], gen: torch.Generator) -> list[int]:
    s = len(ranks)
    live = [i for i in range(s) if ranks[i] > 0]
    if mix == "distinct":  # as long as there are enough slots
        return [live[i % len(live)] for i in range(t)]
    if mix == "zipf":
        w = torch.tensor([1.0 / (k + 1) ** 1.5 for k in range(len(live))])
        return [live[i] for i in torch.multinomial(w, t, replacement=True, generator=gen).tolist()]
    if mix == "identical":
        return [live[-1]] * t
    if mix == "base_mixed":
        return [(-1 if u < 0.35 else live[v % len(live)]) for u, v in _uniform_pairs(t, gen)]
    if mix == "rank0":  # slots in turn, the rank-0 ones included, and base-only rows
        return [(i % s) if i % 3 else -1 for i in range(t)]
    raise AssertionError(mix)


def _uniform_pairs(t: int, gen: torch.Generator) -> list[tuple[float, int]]:
    u = torch.rand(t, generator=gen).tolist()
    v = torch.randint(0, 1000, (t,), generator=gen).tolist()
    return list(zip(u, v, strict=True))


def make_io(t: int, d_in: int, d_out: int, dtype: torch.dtype, gen: torch.Generator):
    """x as a row-strided view, y as a column slice of a wider output."""
    x_wide = torch.randn(t, d_in + 3, generator=gen).to(dtype)
    y_wide = torch.randn(t, PAD[0] + d_out + PAD[1], generator=gen).to(dtype)
    return x_wide[:, :d_in], y_wide, y_wide[:, PAD[0] : PAD[0] + d_out]


def expected(y: torch.Tensor, x: torch.Tensor, w: ModuleSlots, token_slots: list[int]) -> torch.Tensor:
    """The reference result, computed and kept in fp32 (on the same, possibly bf16-rounded, inputs)."""
    y_ref = y.float().clone()
    add_lora_reference(
        y_ref, x.float(), w.a.float(), w.bt.float(), w.scale, w.rank, torch.tensor(token_slots, dtype=torch.int32)
    )
    return y_ref


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, loose: bool = False) -> None:
    if dtype is torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    elif not loose:  # fp32 accumulation, one round-to-nearest-even of y: within half a bf16 ulp
        torch.testing.assert_close(out.float(), ref, rtol=2**-8, atol=1e-6)
    else:  # torch paths also round the intermediate h to bf16
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def assert_untouched(y_wide: torch.Tensor, before: torch.Tensor, token_slots: list[int], ranks: list[int]):
    """Columns outside the slice and rows without an adapter for this module: bit-for-bit unchanged."""
    d_end = y_wide.shape[1] - PAD[1]
    assert torch.equal(y_wide[:, : PAD[0]], before[:, : PAD[0]])
    assert torch.equal(y_wide[:, d_end:], before[:, d_end:])
    idle = [t for t, s in enumerate(token_slots) if s < 0 or ranks[s] == 0]
    assert torch.equal(y_wide[idle], before[idle])


# --------------------------------------------------------------------------- the C kernel itself


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rank_set", list(RANKS))
@pytest.mark.parametrize("mix", MIXES)
@each_isa
def test_kernel_matches_reference(dtype, shape, rank_set, mix, isa):
    d_in, d_out = shape
    ranks = list(RANKS[rank_set])
    if mix == "rank0":
        ranks[4::6] = [0] * len(ranks[4::6])
    gen = seed(dtype, shape, rank_set, mix)
    w = make_slots(d_in, d_out, ranks, dtype, gen)
    for t in TOKENS:
        token_slots = make_token_slots(mix, t, ranks, gen)
        x, y_wide, y = make_io(t, d_in, d_out, dtype, gen)
        before = y_wide.clone()
        ref = expected(y, x, w, token_slots)
        slots = torch.tensor(token_slots, dtype=torch.int32)
        cpu_kernel.add_lora_sparse(y, x, w.a, w.bt, w.scale, w.rank, slots, isa=isa)
        assert_matches(y, ref, dtype)
        assert_untouched(y_wide, before, token_slots, ranks)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("t", [1, 8, 33, 256])
@each_isa
def test_kernel_decode_shapes_and_threads(dtype, threads, t, isa):
    """Sizes large enough for the multi-threaded path, R = 64 with mixed ranks, many slots."""
    gen = torch.Generator().manual_seed(t * 10 + threads)
    ranks = [64, 16, 8, 0, 33, 1, 64, 12] * 4
    w = make_slots(576, 1536, ranks, dtype, gen)
    token_slots = torch.randint(-1, len(ranks), (t,), generator=gen).tolist()
    x, y_wide, y = make_io(t, 576, 1536, dtype, gen)
    before = y_wide.clone()
    ref = expected(y, x, w, token_slots)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        slots = torch.tensor(token_slots, dtype=torch.int32)
        cpu_kernel.add_lora_sparse(y, x, w.a, w.bt, w.scale, w.rank, slots, isa=isa)
    finally:
        torch.set_num_threads(old)
    assert_matches(y, ref, dtype)
    assert_untouched(y_wide, before, token_slots, ranks)


@needs_kernel
@each_isa
def test_kernel_bf16_rounds_to_nearest_even_like_torch(isa):
    """y + delta is rounded once, ties to even, to the same bits as torch's fp32 -> bf16 cast."""
    gen = torch.Generator().manual_seed(7)
    w = make_slots(64, 64, [1, 1], torch.bfloat16, gen)
    w.a.zero_()
    w.a[:, 0, 0] = 1.0  # h = x[t, 0] = 1 exactly
    w.scale.fill_(1.0)
    w.bt[0, 0] = 2.0**-8  # half an ulp of every y below: a tie, rounded to the even neighbour
    w.bt[1, 0] = (torch.randn(64, generator=gen) * 2.0**-8).to(torch.bfloat16)  # below an ulp
    x = torch.zeros(8, 64, dtype=torch.bfloat16)
    x[:, 0] = 1.0
    y = (1.0 + torch.arange(64) * 2.0**-7).to(torch.bfloat16).repeat(8, 1)  # exact, in [1, 1.5)
    slots = torch.tensor([0, 1] * 4, dtype=torch.int32)
    ref = (y.float() + w.bt[slots.long(), 0].float()).to(torch.bfloat16)
    cpu_kernel.add_lora_sparse(y, x, w.a, w.bt, w.scale, w.rank, slots, isa=isa)
    assert torch.equal(y, ref)
    assert torch.equal(y[0, ::2], (1.0 + torch.arange(0, 64, 2) * 2.0**-7).to(torch.bfloat16))  # even: kept


@needs_kernel
@each_isa
def test_kernel_empty_and_all_base(isa):
    gen = torch.Generator().manual_seed(3)
    w = make_slots(64, 32, [4, 4], torch.float32, gen)
    x, y = torch.randn(0, 64), torch.randn(0, 32)
    cpu_kernel.add_lora_sparse(y, x, w.a, w.bt, w.scale, w.rank, torch.zeros(0, dtype=torch.int32), isa=isa)
    x, y = torch.randn(5, 64), torch.randn(5, 32)
    before = y.clone()
    cpu_kernel.add_lora_sparse(y, x, w.a, w.bt, w.scale, w.rank, torch.full((5,), -1, dtype=torch.int32), isa=isa)
    assert torch.equal(y, before)


@needs_kernel
@each_isa
def test_kernel_rejects_bad_arguments_without_touching_y(isa):
    gen = torch.Generator().manual_seed(4)
    w = make_slots(64, 32, [4, 4], torch.float32, gen)
    x, y = torch.randn(3, 64), torch.randn(3, 32)
    slots = torch.tensor([0, 1, -1], dtype=torch.int32)
    bad = [
        dict(x=x.double()),
        dict(y=y.to(torch.bfloat16)),
        dict(x=x.t().contiguous().t()),  # column stride 3
        dict(y=torch.randn(1, 32).expand(3, 32)),  # rows overlap
        dict(a=w.a.transpose(1, 2).contiguous().transpose(1, 2)),
        dict(bt=w.bt[:, :, :16]),
        dict(slots=slots.long()),
        dict(slots=torch.tensor([0, 2, -1], dtype=torch.int32)),  # slot out of range
        dict(slots=slots[:2]),
        dict(rank=torch.tensor([4, 17], dtype=torch.int32)),  # rank above R
        dict(scale=w.scale.double()),
    ]
    _assert_rejected(w, x, y, slots, bad, isa=isa)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler")
def test_kernel_builds_where_gcc_exists_and_shares_torchs_openmp():
    assert cpu_kernel.available()
    with open("/proc/self/maps") as f:
        gomps = {line.split()[-1] for line in f if "libgomp" in line.rsplit("/", 1)[-1]}
    assert len(gomps) == 1, gomps  # bound to the libgomp torch loaded, not a second runtime


# --------------------------------------------------------------------------- the kernel, mixed precision
# The oracle is the fp32 reference on a.float(), bt.float(): bf16 widens to fp32 exactly.


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rank_set", list(RANKS))
@pytest.mark.parametrize("mix", MIXES)
@each_isa
def test_kernel_mixed_precision_matches_reference(shape, rank_set, mix, isa):
    d_in, d_out = shape
    ranks = list(RANKS[rank_set])
    if mix == "rank0":
        ranks[4::6] = [0] * len(ranks[4::6])
    gen = seed("mixed", shape, rank_set, mix)
    w = make_slots(d_in, d_out, ranks, torch.bfloat16, gen)
    for t in TOKENS:
        token_slots = make_token_slots(mix, t, ranks, gen)
        x, y_wide, y = make_io(t, d_in, d_out, torch.float32, gen)
        before = y_wide.clone()
        ref = expected(y, x, w, token_slots)
        slots = torch.tensor(token_slots, dtype=torch.int32)
        cpu_kernel.add_lora_sparse(y, x, w.a, w.bt, w.scale, w.rank, slots, isa=isa)
        assert y.dtype is torch.float32
        assert_matches(y, ref, torch.float32)
        assert_untouched(y_wide, before, token_slots, ranks)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("t", [1, 8, 33, 256])
@each_isa
def test_kernel_mixed_precision_decode_shapes_and_threads(threads, t, isa):
    """The multi-threaded sizes, R = 64 with mixed ranks; also bit-for-bit the fp32 path on the widened weights."""
    gen = torch.Generator().manual_seed(t * 10 + threads + 5)
    ranks = [64, 16, 8, 0, 33, 1, 64, 12] * 4
    w = make_slots(576, 1536, ranks, torch.bfloat16, gen)
    token_slots = torch.randint(-1, len(ranks), (t,), generator=gen).tolist()
    slots = torch.tensor(token_slots, dtype=torch.int32)
    x, y_wide, y = make_io(t, 576, 1536, torch.float32, gen)
    before = y_wide.clone()
    ref = expected(y, x, w, token_slots)
    y32_wide = y_wide.clone()
    y32 = y32_wide[:, PAD[0] : PAD[0] + 1536]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu_kernel.add_lora_sparse(y, x, w.a, w.bt, w.scale, w.rank, slots, isa=isa)
        cpu_kernel.add_lora_sparse(y32, x, w.a.float(), w.bt.float(), w.scale, w.rank, slots, isa=isa)
    finally:
        torch.set_num_threads(old)
    assert_matches(y, ref, torch.float32)
    assert_untouched(y_wide, before, token_slots, ranks)
    assert torch.equal(y_wide, y32_wide)  # same fp32 products in the same order


@needs_kernel
@each_isa
def test_kernel_mixed_precision_exact_weights(isa):
    """Weights that are exact in bf16 give exactly the fp32 kernel's result (small sizes: one thread)."""
    gen = torch.Generator().manual_seed(21)
    w = make_slots(67, 130, [16, 1, 3, 0, 5], torch.bfloat16, gen)
    token_slots = [0, 1, -1, 2, 3, 4, 0, 0, 2]
    slots = torch.tensor(token_slots, dtype=torch.int32)
    x, y_wide, y = make_io(len(token_slots), 67, 130, torch.float32, gen)
    y32_wide = y_wide.clone()
    cpu_kernel.add_lora_sparse(y, x, w.a, w.bt, w.scale, w.rank, slots, isa=isa)
    y32 = y32_wide[:, PAD[0] : PAD[0] + 130]
    cpu_kernel.add_lora_sparse(y32, x, w.a.float(), w.bt.float(), w.scale, w.rank, slots, isa=isa)
    assert torch.equal(y_wide, y32_wide)


@needs_kernel
@each_isa
def test_kernel_rejects_other_dtype_combinations_without_touching_y(isa):
    gen = torch.Generator().manual_seed(5)
    w = make_slots(64, 32, [4, 4], torch.bfloat16, gen)
    x, y = torch.randn(3, 64), torch.randn(3, 32)
    slots = torch.tensor([0, 1, -1], dtype=torch.int32)
    bad = [
        dict(x=x.to(torch.bfloat16)),  # bf16 x, fp32 y
        dict(x=x.to(torch.bfloat16), y=y.to(torch.bfloat16), a=w.a.float(), bt=w.bt.float()),  # bf16 act, fp32 w
        dict(bt=w.bt.float()),  # a and bt differ
        dict(a=w.a.float()),
        dict(a=w.a.half(), bt=w.bt.half()),
        dict(y=y.double(), x=x.double()),
    ]
    _assert_rejected(w, x, y, slots, bad, match="float32/bfloat16", isa=isa)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mix", MIXES)
def test_add_lora_cpu_kernel_mixed_precision(shape, mix):
    """ops.add_lora on fp32 activations with bf16 slot buffers (CPU kernel only; TORCH needs one dtype)."""
    d_in, d_out = shape
    ranks = RANKS["mixed"]
    gen = seed("ops-mixed", shape, mix)
    w = make_slots(d_in, d_out, ranks, torch.bfloat16, gen)
    for t in TOKENS:
        token_slots = make_token_slots(mix, t, ranks, gen)
        x, y_wide, y = make_io(t, d_in, d_out, torch.float32, gen)
        before = y_wide.clone()
        ref = expected(y, x, w, token_slots)
        batch = LoraBatch.build(token_slots, torch.device("cpu"), LoraBackend.CPU_KERNEL, dense_min_tokens=16)
        assert not batch.dense_segments  # the kernel takes every token
        add_lora(y, x, w, batch)
        assert_matches(y, ref, torch.float32)
        assert_untouched(y_wide, before, token_slots, ranks)


# --------------------------------------------------------------------------- ops.add_lora, every backend

BACKENDS = [LoraBackend.REFERENCE, LoraBackend.TORCH]
if cpu_kernel.available():
    BACKENDS.append(LoraBackend.CPU_KERNEL)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mix", MIXES)
def test_add_lora_matches_reference(backend, dtype, shape, mix):
    d_in, d_out = shape
    ranks = RANKS["mixed"]
    gen = seed(backend, dtype, shape, mix)
    w = make_slots(d_in, d_out, ranks, dtype, gen)
    for t in TOKENS:
        token_slots = make_token_slots(mix, t, ranks, gen)
        x, y_wide, y = make_io(t, d_in, d_out, dtype, gen)
        before = y_wide.clone()
        ref = expected(y, x, w, token_slots)
        batch = LoraBatch.build(token_slots, torch.device("cpu"), backend, dense_min_tokens=16)
        add_lora(y, x, w, batch)
        loose = backend is LoraBackend.TORCH or bool(batch.dense_segments)
        assert_matches(y, ref, dtype, loose=loose)
        assert_untouched(y_wide, before, token_slots, ranks)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_add_lora_dense_segments_mixed_with_sparse_tokens(backend, dtype):
    """Prefill runs (>= dense_min_tokens of one slot) beside decode tokens and base-only rows."""
    ranks = RANKS["mixed"]
    gen = torch.Generator().manual_seed(11)
    w = make_slots(130, 67, ranks, dtype, gen)
    token_slots = [0] * 20 + [1, 3, -1, 2] + [3] * 5 + [5] * 18 + [-1] * 3 + [2] * 17 + [0, 1]
    x, y_wide, y = make_io(len(token_slots), 130, 67, dtype, gen)
    before = y_wide.clone()
    ref = expected(y, x, w, token_slots)
    batch = LoraBatch.build(token_slots, torch.device("cpu"), backend, dense_min_tokens=16)
    # Only the torch backend splits long runs off as dense matmuls; the kernel takes every token.
    assert len(batch.dense_segments) == (3 if backend is LoraBackend.TORCH else 0)
    add_lora(y, x, w, batch)
    assert_matches(y, ref, dtype, loose=backend is not LoraBackend.REFERENCE)
    assert_untouched(y_wide, before, token_slots, ranks)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_add_lora_without_adapters_is_a_no_op(backend):
    gen = torch.Generator().manual_seed(12)
    w = make_slots(64, 64, RANKS["mixed"], torch.float32, gen)
    x, y_wide, y = make_io(9, 64, 64, torch.float32, gen)
    before = y_wide.clone()
    add_lora(y, x, w, LoraBatch.build([-1] * 9, torch.device("cpu"), backend))
    assert torch.equal(y_wide, before)


def _assert_rejected(w, x, y, slots, bad: list[dict], match: str | None = None, isa: str | None = None) -> None:
    """Each override of the good arguments raises ValueError and leaves ``y`` as it was."""
    before = y.clone()
    for override in bad:
        args = dict(y=y, x=x, a=w.a, bt=w.bt, scale=w.scale, rank=w.rank, slots=slots) | override
        with pytest.raises(ValueError, match=match):
            cpu_kernel.add_lora_sparse(**args, isa=isa)
        assert torch.equal(y, before), override.keys()
