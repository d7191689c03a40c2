"""What the lean forward pass supports, read from a transformers config."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from server.model.families import FAMILIES, STATIC_ROPE_TYPES, SUPPORTED_MODEL_TYPES

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")  # under self_attn; the rest under mlp
# The LoRA-targetable projections of a layer: separate (most families), or q/k/v and gate/up fused (Phi-3).
SPLIT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class UnsupportedModel(ValueError):
    pass


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-family decoder."""

    model_type: str
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    n_layers: int
    vocab: int
    max_positions: int
    rms_eps: float
    qkv_bias: bool
    sliding_window: int | None
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (server.model.families)
    fused: bool = False  # qkv_proj and gate_up_proj modules (Phi-3)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def projections(self) -> tuple[str, ...]:
        """The LoRA-targetable projections of a layer, as the model names its modules."""
        return FUSED_PROJECTIONS if self.fused else SPLIT_PROJECTIONS

    def projection_dims(self) -> dict[str, tuple[int, int]]:
        """``(d_in, d_out)`` of each LoRA-targetable projection."""
        h, i = self.hidden, self.intermediate
        if self.fused:
            return {
                "qkv_proj": (h, self.q_dim + 2 * self.kv_dim),
                "o_proj": (self.q_dim, h),
                "gate_up_proj": (h, 2 * i),
                "down_proj": (i, h),
            }
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def module_name(self, layer: int, projection: str) -> str:
        """The transformers module name, which PEFT tensor names are built from."""
        group = "self_attn" if projection in ATTENTION_PROJECTIONS else "mlp"
        return f"model.layers.{layer}.{group}.{projection}"

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelShape:
        """The shape of a supported family's config; anything the forward pass does not implement is refused,
        naming it."""
        model_type = getattr(config, "model_type", "?")
        family = FAMILIES.get(model_type)
        if family is None:
            raise UnsupportedModel(
                f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModel(f"{model_type}: activation {act!r} is not supported (silu only)")
        if getattr(config, "mlp_bias", False):
            raise UnsupportedModel(f"{model_type}: MLP biases (mlp_bias) are not supported")
        if not family.qkv_bias and getattr(config, "attention_bias", False):
            raise UnsupportedModel(f"{model_type}: attention biases (attention_bias) are not supported")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModel(
                f"{model_type}: rope type {rope_type!r} is not supported; supported: {', '.join(STATIC_ROPE_TYPES)}"
            )
        partial = rope.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
        if partial != 1.0:
            raise UnsupportedModel(f"{model_type}: partial_rotary_factor {partial} is not supported (1.0 only)")
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        window = getattr(config, "sliding_window", None)
        if family.window_flag is not None and not getattr(config, family.window_flag, False):
            window = None
        return cls(
            model_type=model_type,
            hidden=config.hidden_size,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            n_layers=config.num_hidden_layers,
            vocab=config.vocab_size,
            max_positions=config.max_position_embeddings,
            rms_eps=config.rms_norm_eps,
            qkv_bias=family.qkv_bias,
            sliding_window=window,
            qk_norm=family.qk_norm,
            fused=family.fused,
        )
