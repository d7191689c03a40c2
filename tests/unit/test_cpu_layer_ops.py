"""Our C RMSNorm and RoPE against transformers' own modules on the same inputs, on every build this CPU runs."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from server import native
from server.model import cpu_layer_ops

pytestmark = pytest.mark.skipif(not cpu_layer_ops.available(), reason="layer-ops kernel did not build")
RUNNABLE = native.runnable_isas()


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize(("t", "k"), [(1, 576), (5, 64), (3, 100), (2, 33)])
def test_rms_norm_matches_transformers(isa, t, k):
    g = torch.Generator().manual_seed(t * k)
    ref = LlamaRMSNorm(k, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(k, generator=g))
    wide = torch.randn(t, k + 7, generator=g) * 3
    x = wide[:, 3 : 3 + k]  # a row-strided view
    y = cpu_layer_ops.rms_norm(x, ref.weight.detach(), 1e-5, isa=isa)
    torch.testing.assert_close(y, ref(x).detach(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("isa", RUNNABLE)
def test_bf16_rms_norm_matches_transformers_in_bf16(isa):
    """transformers' bf16 arithmetic (fp32 norm, rounded, times the weight, rounded): the same bf16 values but
    where the sum of squares' order moves the fp32 norm across a rounding boundary (then one bf16 step)."""
    g = torch.Generator().manual_seed(3)
    ref = LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(576, generator=g))
    ref = ref.to(torch.bfloat16)
    x = (torch.randn(6, 576, generator=g) * 3).to(torch.bfloat16)
    y, want = cpu_layer_ops.rms_norm(x, ref.weight.detach(), 1e-5, isa=isa), ref(x).detach()
    assert y.dtype is torch.bfloat16
    assert ((y.float() - want.float()).abs() <= want.float().abs() * 2.0**-7).all()
    assert (y == want).float().mean() > 0.98


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_builds_agree_bit_for_bit(dtype):
    x, w = torch.randn(4, 576).to(dtype), torch.randn(576).to(dtype)
    outs = [cpu_layer_ops.rms_norm(x, w, 1e-6, isa=isa) for isa in RUNNABLE]
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", RUNNABLE)
def test_rope_in_place_matches_transformers(isa, dtype):
    """Bit for bit, in bf16 too (each product and the sum rounded to bf16, as torch's bf16 ops do)."""
    heads, kv_heads, hd, t = 9, 3, 64, 5
    config = LlamaConfig(hidden_size=heads * hd, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256, rope_theta=10000.0)
    rotary = LlamaRotaryEmbedding(config)
    cos, sin = rotary(torch.zeros(1), torch.arange(256)[None, :])
    cos, sin = cos[0].to(dtype).contiguous(), sin[0].to(dtype).contiguous()
    positions = torch.tensor([0, 7, 100, 255, 3])
    qkv = torch.randn(t, (heads + 2 * kv_heads) * hd).to(dtype)
    q = qkv[:, : heads * hd].view(t, heads, hd).transpose(0, 1)[None]  # [1, H, T, hd], transformers' layout
    k = qkv[:, heads * hd : (heads + kv_heads) * hd].view(t, kv_heads, hd).transpose(0, 1)[None]
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos[positions][None], sin[positions][None])
    v_before = qkv[:, (heads + kv_heads) * hd :].clone()
    cpu_layer_ops.rope_(qkv, heads + kv_heads, hd, cos, sin, positions, isa=isa)
    assert torch.equal(qkv[:, : heads * hd].view(t, heads, hd).transpose(0, 1)[None], q_ref)
    assert torch.equal(qkv[:, heads * hd : (heads + kv_heads) * hd].view(t, kv_heads, hd).transpose(0, 1)[None], k_ref)
    assert torch.equal(qkv[:, (heads + kv_heads) * hd :], v_before)  # v untouched


def test_rope_refuses_positions_outside_the_table():
    cos = sin = torch.ones(8, 4)
    with pytest.raises(ValueError, match="error 4"):
        cpu_layer_ops.rope_(torch.zeros(1, 4), 1, 4, cos, sin, torch.tensor([8]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_rope_matches_phi3(dtype):
    """A partial rotary factor (Phi-4-mini's 0.75): the first 3/4 of each head rotated as transformers' Phi-3 does,
    bit for bit, the rest unchanged."""
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rope

    heads, kv_heads, hd, t = 4, 2, 64, 3
    config = Phi3Config(hidden_size=heads * hd, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        max_position_embeddings=64, pad_token_id=None,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75})
    cos, sin = Phi3RotaryEmbedding(config)(torch.zeros(1), torch.arange(64)[None, :])
    cos, sin = cos[0].to(dtype).contiguous(), sin[0].to(dtype).contiguous()
    assert cos.shape == (64, 48)
    positions = torch.tensor([0, 9, 63])
    qkv = torch.randn(t, (heads + 2 * kv_heads) * hd).to(dtype)
    q = qkv[:, : heads * hd].view(t, heads, hd).transpose(0, 1)[None]
    k = qkv[:, heads * hd : (heads + kv_heads) * hd].view(t, kv_heads, hd).transpose(0, 1)[None]
    q_ref, k_ref = phi3_rope(q, k, cos[positions][None], sin[positions][None])
    cpu_layer_ops.rope_(qkv, heads + kv_heads, hd, cos, sin, positions)
    assert torch.equal(qkv[:, : heads * hd].view(t, heads, hd).transpose(0, 1)[None], q_ref)
    assert torch.equal(qkv[:, heads * hd : (heads + kv_heads) * hd].view(t, kv_heads, hd).transpose(0, 1)[None], k_ref)
