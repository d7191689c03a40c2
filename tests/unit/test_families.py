"""Which decoder configs the forward pass takes (server.model.families), and how it refuses the rest."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    OlmoConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

from server.model.architecture import ModelShape, UnsupportedModel
from server.model.families import SUPPORTED_MODEL_TYPES

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)


def test_each_supported_family_reads_its_own_features():
    assert set(SUPPORTED_MODEL_TYPES) == {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2",
                                          "gemma3_text", "olmo2", "granite", "smollm3"}
    phi3 = ModelShape.from_config(Phi3Config(**TINY, pad_token_id=None))
    assert phi3.fused and phi3.projections == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert phi3.projection_dims()["qkv_proj"] == (32, 32 + 2 * 16) and phi3.module_name(0, "gate_up_proj") == (
        "model.layers.0.mlp.gate_up_proj")
    qwen3 = ModelShape.from_config(Qwen3Config(**TINY, head_dim=8))
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 8
    qwen2 = ModelShape.from_config(Qwen2Config(**TINY))
    assert qwen2.qkv_bias and not qwen2.qk_norm and qwen2.sliding_window is None  # use_sliding_window off
    assert ModelShape.from_config(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=16,
                                              max_window_layers=0)).sliding_window == 16
    assert ModelShape.from_config(MistralConfig(**TINY, sliding_window=16)).sliding_window == 16
    llama31 = LlamaConfig(**TINY, max_position_embeddings=512, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    assert not ModelShape.from_config(llama31).qk_norm


def test_gemma_olmo2_granite_smollm3_features():
    layers = dict(TINY, num_hidden_layers=4, head_dim=8)
    gemma2 = ModelShape.from_config(Gemma2Config(**layers, sliding_window=16, query_pre_attn_scalar=64))
    assert gemma2.windowed == (True, False, True, False) and gemma2.sliding_window == 16
    assert gemma2.attn_softcap == 50.0 and gemma2.final_softcap == 30.0 and gemma2.scale == 64**-0.5
    assert gemma2.norm_offset == 1.0 and gemma2.norm_weight_fp32 and gemma2.embed_scale == 32**0.5
    assert gemma2.activation == "gelu_pytorch_tanh" and gemma2.norms.placed()[-1] == (
        "mlp_out", "post_feedforward_layernorm")
    gemma3 = ModelShape.from_config(Gemma3TextConfig(**layers, sliding_window_pattern=2))
    assert gemma3.qk_norm == "head" and gemma3.attn_softcap is None and gemma3.final_softcap is None
    assert gemma3.rope == ("sliding_attention", "full_attention") * 2
    olmo2 = ModelShape.from_config(Olmo2Config(**TINY))
    assert olmo2.qk_norm == "all" and olmo2.norms.placed() == (
        ("attn_out", "post_attention_layernorm"), ("mlp_out", "post_feedforward_layernorm"))
    granite = ModelShape.from_config(GraniteConfig(**TINY, embedding_multiplier=12.0, attention_multiplier=0.5,
                                                   residual_multiplier=0.25, logits_scaling=4.0))
    assert (granite.embed_scale, granite.scale, granite.residual_scale, granite.logits_divisor) == (
        12.0, 0.5, 0.25, 4.0)
    phi4mini = ModelShape.from_config(Phi3Config(**TINY, pad_token_id=None, original_max_position_embeddings=4096,
                                                 rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75,
        "original_max_position_embeddings": 4096, "short_factor": [1.0] * 3, "long_factor": [2.0] * 3}))
    assert (phi4mini.rotary_dim, phi4mini.long_rope_after) == (6, 4096)
    smol = ModelShape.from_config(SmolLM3Config(**layers, no_rope_layer_interval=2))
    assert smol.rope == ("default", None, "default", None) and smol.sliding_window is None
    assert ModelShape.from_config(Qwen2Config(**layers, use_sliding_window=True, sliding_window=16,
                                              max_window_layers=2)).windowed == (False, False, True, True)


@pytest.mark.parametrize(
    ("config", "fragments"),
    [
        (OlmoConfig(**TINY), ["model type 'olmo' is not supported", "llama, mistral, qwen2, qwen3, phi3, gemma"]),
        (Gemma3Config(text_config=dict(TINY)), ["model type 'gemma3' is not supported"]),
        (Gemma3TextConfig(**TINY, use_bidirectional_attention=True), ["bidirectional attention"]),
        (Qwen3Config(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                              "partial_rotary_factor": 0.75}),
         ["qwen3: partial_rotary_factor 0.75 is not supported"]),  # transformers' Qwen3 rotates whole heads
        (LlamaConfig(**TINY, hidden_act="relu"), ["llama: activation 'relu' is not supported", "silu, gelu"]),
        (LlamaConfig(**TINY, attention_bias=True), ["llama: attention biases (attention_bias)"]),
        (LlamaConfig(**TINY, mlp_bias=True), ["llama: MLP biases (mlp_bias)"]),
        (LlamaConfig(**TINY, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
         ["llama: rope type 'dynamic' is not supported", "default, linear, llama3, yarn, longrope"]),
    ],
    ids=["olmo", "gemma3-multimodal", "bidirectional", "partial-rotary", "activation", "attention-bias", "mlp-bias",
         "dynamic-rope"],
)
def test_what_the_forward_pass_does_not_implement_is_refused_naming_it(config, fragments):
    with pytest.raises(UnsupportedModel) as info:
        ModelShape.from_config(config)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("weights", "served_as", "named"),
    [
        (Qwen3Config(**TINY, head_dim=8), LlamaConfig(**TINY, head_dim=8), "model.layers.0.self_attn.k_norm.weight"),
        (Gemma2Config(**TINY, head_dim=8), GemmaConfig(**TINY, head_dim=8),
         "model.layers.0.post_feedforward_layernorm.weight"),
    ],
    ids=["qwen3-as-llama", "gemma2-as-gemma"],
)
def test_weights_the_family_would_not_read_are_refused_naming_them(weights, served_as, named):
    """A checkpoint whose config names another family of the same sizes: its extra tensors are refused, not
    dropped."""
    from transformers import AutoModelForCausalLM

    from server.model.decoder import CausalLM
    from server.model.weights_source import ModuleTensors

    model = AutoModelForCausalLM.from_config(weights)
    with pytest.raises(UnsupportedModel, match="tensors this family's forward pass does not use") as info:
        CausalLM(served_as, ModuleTensors(model), torch.device("cpu"), torch.float32)
    assert named in str(info.value)
