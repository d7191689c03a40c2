"""Which decoder configs the forward pass takes (server.model.families), and how it refuses the rest."""

from __future__ import annotations

import pytest
from transformers import Gemma2Config, LlamaConfig, MistralConfig, OlmoConfig, Phi3Config, Qwen2Config, Qwen3Config

from server.model.architecture import ModelShape, UnsupportedModel
from server.model.families import SUPPORTED_MODEL_TYPES

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)


def test_each_supported_family_reads_its_own_features():
    assert set(SUPPORTED_MODEL_TYPES) == {"llama", "mistral", "qwen2", "qwen3", "phi3"}
    phi3 = ModelShape.from_config(Phi3Config(**TINY, pad_token_id=None))
    assert phi3.fused and phi3.projections == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert phi3.projection_dims()["qkv_proj"] == (32, 32 + 2 * 16) and phi3.module_name(0, "gate_up_proj") == (
        "model.layers.0.mlp.gate_up_proj")
    qwen3 = ModelShape.from_config(Qwen3Config(**TINY, head_dim=8))
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 8
    qwen2 = ModelShape.from_config(Qwen2Config(**TINY))
    assert qwen2.qkv_bias and not qwen2.qk_norm and qwen2.sliding_window is None  # use_sliding_window off
    assert ModelShape.from_config(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=16)).sliding_window == 16
    assert ModelShape.from_config(MistralConfig(**TINY, sliding_window=16)).sliding_window == 16
    llama31 = LlamaConfig(**TINY, max_position_embeddings=512, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    assert not ModelShape.from_config(llama31).qk_norm


@pytest.mark.parametrize(
    ("config", "fragments"),
    [
        (Gemma2Config(**TINY), ["model type 'gemma2' is not supported", "llama, mistral, qwen2, qwen3, phi3"]),
        (OlmoConfig(**TINY), ["model type 'olmo' is not supported"]),
        (Phi3Config(**TINY, pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                 "partial_rotary_factor": 0.75}),
         ["phi3: partial_rotary_factor 0.75 is not supported"]),
        (LlamaConfig(**TINY, hidden_act="gelu"), ["llama: activation 'gelu' is not supported"]),
        (LlamaConfig(**TINY, attention_bias=True), ["llama: attention biases (attention_bias)"]),
        (LlamaConfig(**TINY, mlp_bias=True), ["llama: MLP biases (mlp_bias)"]),
        (LlamaConfig(**TINY, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
         ["llama: rope type 'dynamic' is not supported", "default, linear, llama3, yarn"]),
    ],
    ids=["gemma2", "olmo", "partial-rotary", "activation", "attention-bias", "mlp-bias", "dynamic-rope"],
)
def test_what_the_forward_pass_does_not_implement_is_refused_naming_it(config, fragments):
    with pytest.raises(UnsupportedModel) as info:
        ModelShape.from_config(config)
    for fragment in fragments:
        assert fragment in str(info.value)
