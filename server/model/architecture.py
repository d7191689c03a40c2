"""What the lean forward pass supports, read from a transformers config."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from server.model.families import (
    ACTIVATIONS,
    FAMILIES,
    PRE_NORMS,
    STATIC_ROPE_TYPES,
    SUPPORTED_MODEL_TYPES,
    Family,
    Norms,
)

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")  # under self_attn; the rest under mlp
# The LoRA-targetable projections of a layer: separate (most families), or q/k/v and gate/up fused (Phi-3).
SPLIT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class UnsupportedModel(ValueError):
    pass


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder and what its family's forward pass does (server.model.families)."""

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
    sliding_window: int | None  # the window of the layers in ``windowed`` (None: no layer has one)
    qk_norm: str | None = None  # "head" or "all": RMSNorm of q and k before RoPE
    fused: bool = False  # qkv_proj and gate_up_proj modules (Phi-3)
    norms: Norms = PRE_NORMS
    norm_offset: float = 0.0
    norm_weight_fp32: bool = False
    activation: str = "silu"
    embed_scale: float = 1.0
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    residual_scale: float = 1.0
    logits_divisor: float = 1.0
    windowed: tuple[bool, ...] = ()  # per layer: attends to the last ``sliding_window`` positions only
    rope: tuple[str | None, ...] = ()  # per layer: its rotary table's key in ``rope_keys``, None: no RoPE
    rotary_dim: int = 0  # the values of each head RoPE rotates (head_dim, or a partial rotary factor's share)
    long_rope_after: int | None = None  # longrope: the long table past this sequence length (None: one table)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5 if self.attn_scale is None else self.attn_scale

    @property
    def rope_keys(self) -> tuple[str, ...]:
        return tuple(sorted({k for k in self.rope if k is not None}))

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
        act = getattr(config, family.activation_field, None) or "silu"
        if act not in ACTIVATIONS:
            raise UnsupportedModel(
                f"{model_type}: activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        if getattr(config, "mlp_bias", False):
            raise UnsupportedModel(f"{model_type}: MLP biases (mlp_bias) are not supported")
        if not family.qkv_bias and getattr(config, "attention_bias", False):
            raise UnsupportedModel(f"{model_type}: attention biases (attention_bias) are not supported")
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModel(f"{model_type}: bidirectional attention (use_bidirectional_attention) is not "
                                   "supported: a causal decoder only")
        n_layers = config.num_hidden_layers
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * n_layers
        if len(layer_types) != n_layers or set(layer_types) - {"full_attention", "sliding_attention"}:
            raise UnsupportedModel(f"{model_type}: layer_types {layer_types!r}: only full_attention and "
                                   f"sliding_attention, one per layer, are supported")
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        rope_keys, partial, long_after = _check_rope(config, model_type, family, set(layer_types))
        rope: list[str | None] = [t if family.rope_per_layer_type else rope_keys[0] for t in layer_types]
        if family.no_rope_layers:
            uses = getattr(config, "no_rope_layers", None) or [1] * n_layers
            rope = [key if use else None for key, use in zip(rope, uses, strict=True)]
        window = getattr(config, "sliding_window", None) if family.window != "none" else None
        windowed = [window is not None and (family.window == "all" or t == "sliding_attention") for t in layer_types]
        attn_scale = embed_scale = None
        residual_scale = logits_divisor = 1.0
        if family.query_pre_attn_scalar:
            attn_scale = config.query_pre_attn_scalar**-0.5
        if family.embed_sqrt_hidden:
            embed_scale = config.hidden_size**0.5
        if family.multipliers:
            embed_scale = config.embedding_multiplier
            attn_scale = config.attention_multiplier
            residual_scale = config.residual_multiplier
            logits_divisor = config.logits_scaling
        softcaps = (None, None)
        if family.softcapping:
            softcaps = (config.attn_logit_softcapping, config.final_logit_softcapping)
        return cls(
            model_type=model_type,
            hidden=config.hidden_size,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            n_layers=n_layers,
            vocab=config.vocab_size,
            max_positions=config.max_position_embeddings,
            rms_eps=config.rms_norm_eps,
            qkv_bias=family.qkv_bias,
            sliding_window=window if any(windowed) else None,
            qk_norm=family.qk_norm,
            fused=family.fused,
            norms=family.norms,
            norm_offset=family.norm_offset,
            norm_weight_fp32=family.norm_weight_fp32,
            activation=act,
            embed_scale=1.0 if embed_scale is None else float(embed_scale),
            attn_scale=attn_scale,
            attn_softcap=softcaps[0] or None,
            final_softcap=softcaps[1] or None,
            residual_scale=float(residual_scale),
            logits_divisor=float(logits_divisor),
            windowed=tuple(windowed),
            rope=tuple(rope),
            rotary_dim=int(head_dim * partial),
            long_rope_after=long_after,
        )


def _check_rope(
    config: PretrainedConfig, model_type: str, family: Family, layer_types: set[str]
) -> tuple[list[str], float, int | None]:
    """The rotary tables' keys (``"default"``, or each layer type's), the partial rotary factor and, for
    longrope, the length past which the long table applies; refuses rope the forward pass does not implement."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    per_type = family.rope_per_layer_type
    tables = {t: params.get(t) or {} for t in sorted(layer_types)} if per_type else {"default": params}
    partial, long_after = 1.0, None
    for key, rope in tables.items():
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        where = "" if key == "default" else f" ({key} layers)"
        if rope_type not in STATIC_ROPE_TYPES or (rope_type == "longrope" and per_type):
            raise UnsupportedModel(f"{model_type}: rope type {rope_type!r}{where} is not supported; supported: "
                                   f"{', '.join(STATIC_ROPE_TYPES)}")
        if rope_type == "longrope":
            long_after = rope.get("original_max_position_embeddings") or config.original_max_position_embeddings
        partial = rope.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
        if partial != 1.0 and not family.partial_rotary:
            raise UnsupportedModel(f"{model_type}: partial_rotary_factor {partial} is not supported (1.0 only)")
    if not 0 < partial <= 1:
        raise UnsupportedModel(f"{model_type}: partial_rotary_factor {partial} is not supported")
    return list(tables), partial, long_after
