"""The Triton shrink/expand kernels against the fp32 reference: random shapes and hidden sizes, odd token
counts, ranks 1, 3, 16 and the maximum mixed in one batch, every mix of base-only and adapter tokens, bf16,
fp16 and fp32 (and fp32 activations over bf16 slots); base-only tokens and slots whose adapter skips the
module stay bit-for-bit unchanged.

``cpu`` runs the kernels in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without a
GPU): that is what CI checks. ``cuda`` runs the compiled kernels on a GPU when there is one, plus a CUDA-graph
capture-and-replay test; skipped otherwise.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from server.lora.metadata import TILE_TOKENS, LoraBackend, LoraBatch, TokenGroups
from server.lora.ops import ModuleSlots, add_lora
from server.lora.reference import add_lora_reference

triton_kernels = pytest.importorskip("server.lora.triton_kernels", reason="needs the triton package")


def _device_params():
    interpreted = triton_kernels.interpreted()
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(not interpreted, reason="CPU tensors need TRITON_INTERPRET=1")),
        pytest.param("cuda", marks=pytest.mark.skipif(
            not torch.cuda.is_available() or interpreted, reason="needs a GPU (and compiled, not interpreted, Triton)"
        )),
    ]


DEVICES = _device_params()
# activation dtype, slot dtype, (rtol, atol) against the fp32 reference on the same (rounded) values
DTYPES = {
    "fp32": (torch.float32, torch.float32, (1e-5, 1e-4)),
    "bf16": (torch.bfloat16, torch.bfloat16, (1.6e-2, 2e-2)),
    "fp16": (torch.float16, torch.float16, (2e-3, 2e-3)),
    "fp32-over-bf16": (torch.float32, torch.bfloat16, (1e-5, 1e-4)),
}
MIXES = ["all-base", "one-adapter", "all-distinct", "random", "long-runs"]


def make_slots(num_slots: int, max_rank: int, ranks: list[int], d_in: int, d_out: int, dtype, device, gen):
    a = torch.zeros(num_slots, max_rank, d_in)
    bt = torch.zeros(num_slots, max_rank, d_out)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, d_in, generator=gen) / d_in**0.5
        bt[s, :r] = torch.randn(r, d_out, generator=gen)
    scale = torch.tensor([0.5 + s for s in range(num_slots)], dtype=torch.float32)
    rank = torch.tensor(ranks, dtype=torch.int32)
    return ModuleSlots(a.to(dtype).to(device), bt.to(dtype).to(device), scale.to(device), rank.to(device),
                       list(ranks), scale.tolist())


def token_slots(mix: str, tokens: int, num_slots: int, rng: random.Random) -> list[int]:
    if mix == "all-base":
        return [-1] * tokens
    if mix == "one-adapter":
        return [rng.randrange(num_slots)] * tokens
    if mix == "all-distinct":
        return [t % num_slots for t in range(tokens)]
    if mix == "long-runs":  # prefill-like: runs longer than a tile
        out: list[int] = []
        while len(out) < tokens:
            out += [rng.randrange(-1, num_slots)] * rng.randint(TILE_TOKENS, 2 * TILE_TOKENS + 3)
        return out[:tokens]
    return [rng.randrange(-1, num_slots) for _ in range(tokens)]


def check(device: str, dtypes: str, mix: str, seed: int, y_view: bool = False) -> None:
    act, slot_dtype, (rtol, atol) = DTYPES[dtypes]
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    max_rank = rng.choice([16, 24, 64])
    num_slots = rng.randint(1, 5)
    ranks = [rng.choice([1, 3, 16, max_rank, 0]) for _ in range(num_slots)]  # 0: the adapter skips this module
    d_in, d_out = rng.randint(1, 150), rng.randint(1, 150)  # any hidden size, block multiples or not
    tokens = rng.choice([1, 7, 17, 33, 45])
    w = make_slots(num_slots, max_rank, ranks, d_in, d_out, slot_dtype, device, gen)
    slots = token_slots(mix, tokens, num_slots, rng)
    x = torch.randn(tokens, d_in, generator=gen).to(act).to(device)
    wide = torch.randn(tokens, d_out + 5, generator=gen).to(act).to(device)
    y = wide[:, 2 : 2 + d_out] if y_view else wide[:, :d_out].contiguous()  # a column slice of a fused output
    before, wide_before = y.clone(), wide.clone()
    expected = y.float().cpu()
    add_lora_reference(expected, x.float().cpu(), w.a.float().cpu(), w.bt.float().cpu(), w.scale.cpu(),
                       w.rank.cpu(), torch.tensor(slots, dtype=torch.int32))
    add_lora(y, x, w, LoraBatch.build(slots, torch.device(device), LoraBackend.TRITON))
    got = y.float().cpu()
    untouched = [t for t, s in enumerate(slots) if s < 0 or ranks[s] == 0]
    assert torch.equal(y.cpu()[untouched], before.cpu()[untouched])  # exactly zero contribution
    torch.testing.assert_close(got, expected.to(act).float(), rtol=rtol, atol=atol)
    if y_view:  # columns outside the slice are not written
        assert torch.equal(wide.cpu()[:, :2], wide_before.cpu()[:, :2])
        assert torch.equal(wide.cpu()[:, 2 + d_out :], wide_before.cpu()[:, 2 + d_out :])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("mix", MIXES)
def test_kernels_equal_the_reference(device, dtypes, mix):
    for seed in range(3):
        check(device, dtypes, mix, seed=zlib.crc32(f"{dtypes}/{mix}/{seed}".encode()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", ["fp32", "bf16"])
def test_output_may_be_a_column_slice_of_a_wider_tensor(device, dtypes):
    for seed in range(3):
        check(device, dtypes, "random", seed=seed, y_view=True)


@pytest.mark.parametrize("device", DEVICES)
def test_composed_terms_go_through_the_kernels(device):
    gen = torch.Generator().manual_seed(3)
    ranks = [4, 16, 1]
    w = make_slots(3, 16, ranks, 40, 24, torch.float32, device, gen)
    slots = [0, -1, 2, -1, 1]
    composed = [(1, 0, 0.25), (1, 2, 0.75), (3, 1, -1.0)]
    x = torch.randn(5, 40, generator=gen).to(device)
    y = torch.randn(5, 24, generator=gen).to(device)
    expected = y.clone().cpu()
    add_lora_reference(expected, x.cpu(), w.a.cpu(), w.bt.cpu(), w.scale.cpu(), w.rank.cpu(),
                       torch.tensor(slots, dtype=torch.int32))
    for row, slot, weight in composed:
        delta = torch.zeros(1, 24)
        add_lora_reference(delta, x.cpu()[row : row + 1], w.a.cpu(), w.bt.cpu(), w.scale.cpu(), w.rank.cpu(),
                           torch.tensor([slot], dtype=torch.int32))
        expected[row] += weight * delta[0]
    add_lora(y, x, w, LoraBatch.build(slots, torch.device(device), LoraBackend.TRITON, composed=composed))
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-5, atol=1e-4)


def test_token_groups_cover_each_adapter_token_once_in_tiles_of_one_slot():
    rng = random.Random(0)
    for _ in range(50):
        slots = [rng.randrange(-1, 4) for _ in range(rng.randint(0, 80))]
        g = TokenGroups.build(slots, torch.device("cpu"))
        rows, seen = g.rows.tolist(), []
        for slot, start, length in zip(g.tile_slot.tolist(), g.tile_start.tolist(), g.tile_len.tolist(), strict=True):
            assert 1 <= length <= TILE_TOKENS
            tile = rows[start : start + length]
            assert all(slots[t] == slot for t in tile)
            seen += tile
        assert sorted(seen) == [t for t, s in enumerate(slots) if s >= 0] and len(seen) == len(set(seen))
        assert g.num_tiles == sum(-(-slots.count(s) // TILE_TOKENS) for s in set(slots) if s >= 0)


def test_the_kernels_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_kernels, "interpreted", lambda: False)
    w = make_slots(1, 16, [4], 8, 8, torch.float32, "cpu", torch.Generator().manual_seed(0))
    batch = LoraBatch.build([0], torch.device("cpu"), LoraBackend.TRITON)
    with pytest.raises(RuntimeError, match="run on CUDA tensors"):
        add_lora(torch.zeros(1, 8), torch.ones(1, 8), w, batch)


@pytest.mark.skipif(not torch.cuda.is_available() or triton_kernels.interpreted(), reason="needs a GPU")
def test_cuda_graph_capture_and_replay_equals_eager():
    """The op reads its tiles from device tensors: a captured graph replays correctly when the step's
    inputs and tile tables are rewritten in place (same sizes), as an engine replaying graphs would."""
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    ranks = [8, 16, 3, 64]
    w = make_slots(4, 64, ranks, 4096, 4096, torch.bfloat16, device, gen)
    first = [0, 1, 2, 3, -1, 0, 0, 1] * 4
    second = [3, 3, 2, 2, 1, 1, 0, -1] * 4  # the same number of tiles, other slots and rows
    batch = LoraBatch.build(first, device, LoraBackend.TRITON)
    x = torch.randn(len(first), 4096, device=device, dtype=torch.bfloat16)
    y = torch.zeros(len(first), 4096, device=device, dtype=torch.bfloat16)
    add_lora(y, x, w, batch)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        y.zero_()
        add_lora(y, x, w, batch)
    for slots in (first, second):
        step = LoraBatch.build(slots, device, LoraBackend.TRITON)
        assert step.groups.num_tiles == batch.groups.num_tiles
        for mine, new in ((batch.groups.rows, step.groups.rows), (batch.groups.tile_slot, step.groups.tile_slot),
                          (batch.groups.tile_start, step.groups.tile_start),
                          (batch.groups.tile_len, step.groups.tile_len)):
            mine.copy_(new)
        x.copy_(torch.randn_like(x))
        graph.replay()
        eager = torch.zeros_like(y)
        add_lora(eager, x, w, step)
        torch.cuda.synchronize()
        torch.testing.assert_close(y, eager, rtol=0, atol=0)
