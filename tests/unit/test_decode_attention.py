"""Our paged decode-attention kernel equals SDPA (or transformers' eager rule, with soft-capped scores) over
gathered, masked keys, windowed or not."""

from __future__ import annotations

import pytest
import torch

from server.model import cpu_attention
from server.model.attention import AttentionBatch, attend

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C compiler")


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("softcap", [None, 2.0])  # Gemma 2's soft-capped scores (against transformers' eager rule)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (9, 3, 64), (8, 8, 32), (6, 1, 24)])
def test_kernel_equals_sdpa_on_ragged_paged_contexts(heads, kv_heads, head_dim, softcap, window):
    g = torch.Generator().manual_seed(heads * 100 + head_dim)
    n_slots, block = 512, 16
    k_cache = torch.randn(n_slots, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(n_slots, kv_heads, head_dim, generator=g)
    # Five sequences with scattered, non-contiguous blocks and ragged lengths (1 to 70).
    perm = torch.randperm(n_slots // block, generator=g).tolist()
    # (block table, cached tokens, new tokens); the first has no cached prefix, so it is a prefill.
    seqs = [(perm[i * 5 : i * 5 + 5], length - 1, 1) for i, length in enumerate([1, 17, 70, 33, 5])]
    t = len(seqs)
    q = torch.randn(t, heads, head_dim, generator=g)
    k = torch.randn(t, kv_heads, head_dim, generator=g)
    v = torch.randn(t, kv_heads, head_dim, generator=g)
    outs = []
    for kernel in (False, True):
        kc, vc = k_cache.clone(), v_cache.clone()
        batch = AttentionBatch.build(seqs, block, torch.device("cpu"), decode_kernel=kernel, window=window)
        outs.append(attend(q, k, v, kc, vc, batch, head_dim**-0.5, softcap))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
