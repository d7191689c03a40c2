"""Composed requests through the batched op: ``LoraBatch.build(..., composed=...)`` + ``add_lora`` against fp32.

A composing token has slot -1 and k terms ``(row, slot, weight)``; it gets
``sum_i weight_i * scale[s_i] * B[s_i] A[s_i] x``, beside tokens of the plain
per-token path (one slot each) and base-only tokens, in the same call.
"""

from __future__ import annotations

import random

import pytest
import torch

from server.lora import cpu_kernel
from server.lora.metadata import LoraBackend, LoraBatch
from server.lora.ops import ModuleSlots, add_lora
from server.lora.reference import add_lora_reference
from tests.unit.test_lora_ops import PAD, make_io, make_slots, seed

BACKENDS = [LoraBackend.REFERENCE, LoraBackend.TORCH]
if cpu_kernel.available():
    BACKENDS.append(LoraBackend.CPU_KERNEL)
needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="CPU LoRA kernel did not build")
DTYPES = [torch.float32, torch.bfloat16]
CPU = torch.device("cpu")
# Slot ranks for one module (R = 16): rank 1, 3 and the maximum; slot 3 holds an adapter that does not
# target this module (rank 0).
RANKS = [16, 1, 3, 0, 8, 16, 5, 2]
RANK0 = 3
LIVE = [s for s, r in enumerate(RANKS) if r > 0]
SHAPES = [(64, 64), (67, 130), (130, 67)]
Term = tuple[int, int, float]  # (token row, slot, weight)


def expected(
    y: torch.Tensor, x: torch.Tensor, w: ModuleSlots, token_slots: list[int], composed: list[Term]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 result, and per element the sum of the magnitudes that went into it (for bf16 tolerances).

    Plain tokens go through the reference loop; each composed term is added here in float64.
    """
    y_ref = y.float().clone()
    a, bt = w.a.float(), w.bt.float()
    add_lora_reference(y_ref, x.float(), a, bt, w.scale, w.rank, torch.tensor(token_slots, dtype=torch.int32))
    mag = y.float().abs()
    scales = w.scale.tolist()
    for t, s in enumerate(token_slots):
        if s >= 0 and RANKS[s] > 0:
            h = x[t].float() @ a[s].T
            mag[t] += scales[s] * (h.abs() @ bt[s].abs())
    for row, s, weight in composed:
        r = RANKS[s]
        if r == 0:
            continue
        h = x[row].double() @ a[s, :r].double().T
        y_ref[row] += (weight * scales[s] * (h @ bt[s, :r].double())).float()
        mag[row] += (abs(weight) * scales[s] * (h.abs() @ bt[s, :r].double().abs())).float()
    return y_ref, mag


def assert_close(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: a few ulps of the magnitudes summed. bf16: a handful of roundings (h, delta, weighted delta, y)."""
    rel = 2e-5 if dtype is torch.float32 else 2**-5
    err = (out.float() - ref).abs()
    bound = rel * mag + 1e-6
    worst = (err - bound).max().item()
    assert worst <= 0, f"max error {err.max().item():.3g} exceeds the bound by {worst:.3g}"


def assert_untouched(y_wide: torch.Tensor, before: torch.Tensor, rows: list[int]) -> None:
    """Columns outside the slice, and ``rows``, bit-for-bit as they were."""
    d_end = y_wide.shape[1] - PAD[1]
    assert torch.equal(y_wide[:, : PAD[0]], before[:, : PAD[0]])
    assert torch.equal(y_wide[:, d_end:], before[:, d_end:])
    assert torch.equal(y_wide[rows], before[rows]), rows


def idle_rows(token_slots: list[int], composed: list[Term]) -> list[int]:
    """Rows that must be exactly unchanged: base-only, a rank-0 slot, or only zero-weight / rank-0 terms."""
    live_terms = {row for row, s, weight in composed if RANKS[s] > 0 and weight != 0.0}
    return [t for t, s in enumerate(token_slots) if (s < 0 or RANKS[s] == 0) and t not in live_terms]


def random_mix(t: int, rng: random.Random) -> tuple[list[int], list[Term]]:
    """Base-only, single-adapter (the rank-0 slot included) and composing rows (1 to 3 adapters), interleaved."""
    token_slots: list[int] = []
    composed: list[Term] = []
    for row in range(t):
        kind = rng.choice(["base", "single", "composed", "composed"])
        if kind == "base":
            token_slots.append(-1)
        elif kind == "single":
            token_slots.append(rng.randrange(len(RANKS)))
        else:
            token_slots.append(-1)
            for s in rng.sample(range(len(RANKS)), rng.randint(1, 3)):
                weight = rng.choice([rng.uniform(-2.0, 2.0), -1.0, 0.0, 0.5, 1.0])
                composed.append((row, s, weight))
    return token_slots, composed


def run(backend, dtype, shape, token_slots, composed, gen, slot_dtype=None) -> LoraBatch:
    """Build the batch, run ``add_lora`` on a column slice, check values and the rows that must not move."""
    d_in, d_out = shape
    w = make_slots(d_in, d_out, RANKS, slot_dtype or dtype, gen)
    x, y_wide, y = make_io(len(token_slots), d_in, d_out, dtype, gen)
    before = y_wide.clone()
    ref, mag = expected(y, x, w, token_slots, composed)
    batch = LoraBatch.build(token_slots, CPU, backend, dense_min_tokens=16, composed=composed)
    add_lora(y, x, w, batch)
    assert y.dtype is dtype
    assert_close(y, ref, mag, dtype)
    assert_untouched(y_wide, before, idle_rows(token_slots, composed))
    return batch


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("trial", range(3))
def test_random_mixes_match_reference(backend, dtype, shape, trial):
    gen = seed("composed", backend, dtype, shape, trial)
    rng = random.Random(repr(("composed", backend.value, str(dtype), shape, trial)))
    for t in (1, 3, 5, 17, 33):
        token_slots, composed = random_mix(t, rng)
        run(backend, dtype, shape, token_slots, composed, gen)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_long_composed_prefill_runs_beside_decodes(backend, dtype):
    """Prefill chunks of composing requests (>= 16 tokens each) beside a plain prefill, decodes and base rows."""
    runs = [
        ("composed", 20, [(0, 0.7), (2, -1.3)]),
        ("base", 3, []),
        ("single", 17, [(5, 1.0)]),
        ("composed", 1, [(1, 2.0), (6, -0.5), (4, 1.0)]),  # a decode token composing three adapters
        ("composed", 16, [(6, 1.0), (RANK0, 1.0), (1, -0.25)]),
        ("single", 1, [(2, 1.0)]),
        ("composed", 19, [(4, 0.0), (7, 3.0)]),
        ("base", 2, []),
    ]
    token_slots: list[int] = []
    composed: list[Term] = []
    for kind, n, terms in runs:
        start = len(token_slots)
        token_slots.extend([terms[0][0] if kind == "single" else -1] * n)
        if kind == "composed":
            composed.extend((row, s, weight) for s, weight in terms for row in range(start, start + n))
    gen = seed("long", backend, dtype)
    batch = run(backend, dtype, (130, 67), token_slots, composed, gen)
    assert batch.composed is not None
    if backend is LoraBackend.TORCH:  # long runs of one slot are dense matmuls, among the terms too
        assert [s.slot for s in batch.dense_segments] == [5]
        assert {s.slot for s in batch.composed.batch.dense_segments} == {0, 1, 2, RANK0, 4, 6, 7}
    else:
        assert not batch.dense_segments and not batch.composed.batch.dense_segments


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rank0_slot_and_zero_weights_contribute_exactly_zero(backend, dtype):
    """A slot whose adapter does not target this module, and weight 0, leave their rows bit-for-bit alone."""
    token_slots = [-1] * 21
    composed = [(row, RANK0, 1.0) for row in range(0, 18)]  # a dense-length run of the rank-0 slot
    composed += [(row, 2, 0.0) for row in range(0, 18, 2)]  # zero weight on a live slot
    composed += [(18, RANK0, -2.0), (19, 0, 0.0), (19, 6, 0.0), (20, RANK0, 1.0), (20, 1, 0.75)]
    gen = seed("zero", backend, dtype)
    d_in, d_out = 67, 130
    w = make_slots(d_in, d_out, RANKS, dtype, gen)
    x, y_wide, y = make_io(len(token_slots), d_in, d_out, dtype, gen)
    before = y_wide.clone()
    ref, mag = expected(y, x, w, token_slots, composed)
    add_lora(y, x, w, LoraBatch.build(token_slots, CPU, backend, composed=composed))
    assert_untouched(y_wide, before, list(range(20)))
    assert not torch.equal(y_wide[20], before[20])  # the live term of row 20 is there ...
    assert_close(y, ref, mag, dtype)  # ... and only it


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_one_term_of_weight_one_equals_the_plain_slot(backend):
    """Composing a single adapter at weight 1 gives the plain per-token path's result (fp32)."""
    gen = seed("one", backend)
    w = make_slots(67, 130, RANKS, torch.float32, gen)
    slots = [0, 1, 2, RANK0, 4, 5, 6, 7, 0, 2] + [6] * 17
    x, _, y = make_io(len(slots), 67, 130, torch.float32, gen)
    y_plain = y.clone()
    add_lora(y_plain, x, w, LoraBatch.build(slots, CPU, backend))
    composed = [(row, s, 1.0) for row, s in enumerate(slots)]
    add_lora(y, x, w, LoraBatch.build([-1] * len(slots), CPU, backend, composed=composed))
    torch.testing.assert_close(y, y_plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_weights_scale_linearly_and_negative_subtracts(backend):
    """Weight -w undoes weight w; weight 2 is twice weight 1 (fp32)."""
    gen = seed("linear", backend)
    w = make_slots(64, 64, RANKS, torch.float32, gen)
    x, _, y = make_io(7, 64, 64, torch.float32, gen)
    rows = range(7)

    def delta(weights: dict[int, float]) -> torch.Tensor:
        out = torch.zeros(7, 64)
        composed = [(row, s, wt) for row in rows for s, wt in weights.items()]
        add_lora(out, x, w, LoraBatch.build([-1] * 7, CPU, backend, composed=composed))
        return out

    one, two = delta({0: 1.0, 4: 1.0}), delta({0: 2.0, 4: 2.0})
    torch.testing.assert_close(two, 2 * one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta({0: 1.5, 4: -1.5}), delta({0: 1.5}) - delta({4: 1.5}), rtol=1e-5, atol=1e-6)
    assert one.abs().max() > 0.1
    out = y.clone()
    add_lora(out, x, w, LoraBatch.build([-1] * 7, CPU, backend, composed=[(r, 1, 0.8) for r in rows]))
    add_lora(out, x, w, LoraBatch.build([-1] * 7, CPU, backend, composed=[(r, 1, -0.8) for r in rows]))
    torch.testing.assert_close(out, y, rtol=0, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cpu_kernel_fp32_activations_with_bf16_slots(shape):
    """The kernel's mixed precision (bf16 slot buffers, fp32 activations) for composing rows too."""
    gen = seed("mixed-precision", shape)
    rng = random.Random(repr(("mixed-precision", shape)))
    for t in (1, 9, 33):
        token_slots, composed = random_mix(t, rng)
        run(LoraBackend.CPU_KERNEL, torch.float32, shape, token_slots, composed, gen, slot_dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_build_keeps_each_term_together(backend):
    """Terms may be reordered (grouped by slot), but each keeps its row, slot and weight; none means no terms."""
    composed = [(4, 2, -0.5), (0, 6, 1.0), (4, 0, 2.0), (1, 2, 0.0), (0, 2, 0.25)]
    batch = LoraBatch.build([-1, 5, -1, 3, -1], CPU, backend, composed=composed)
    terms = batch.composed
    assert terms is not None and batch.has_lora
    assert terms.weights.dtype is torch.float32 and terms.weights.shape == (5, 1)
    assert terms.rows.dtype is torch.int64
    got = zip(terms.rows.tolist(), terms.batch.token_slots.tolist(), terms.weights[:, 0].tolist(), strict=True)
    assert sorted(got) == sorted(composed)
    assert LoraBatch.build([-1, -1], CPU, backend, composed=[]).composed is None
    assert not LoraBatch.build([-1, -1], CPU, backend, composed=[]).has_lora
    assert LoraBatch.build([-1, -1], CPU, backend, composed=[(1, 0, 1.0)]).has_lora
