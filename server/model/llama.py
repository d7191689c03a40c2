"""A lean forward pass for Llama-family decoders over a packed batch.

Weights are taken from a loaded transformers model, frozen, cast once to the
serving dtype and placed on the device; q/k/v and gate/up are fused into one
matmul each. LoRA terms are added into views of the fused outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from server.lora.metadata import LoraBatch
from server.lora.ops import ModuleSlots, add_lora
from server.model import cpu_gemv
from server.model.architecture import ModelShape
from server.model.attention import AttentionBatch, attend


@dataclass(frozen=True)
class StepInputs:
    """Everything one forward pass needs besides the weights, built once per step."""

    input_ids: torch.Tensor  # [T] int64, packed
    positions: torch.Tensor  # [T] int64
    attention: AttentionBatch
    lora: LoraBatch
    lora_projections: frozenset[str]  # projections some adapter of this step changes; the rest skip LoRA
    sample_rows: torch.Tensor  # [n] int64: rows whose next-token logits are needed


@dataclass
class DecoderLayer:
    w_qkv: torch.Tensor  # [q_dim + 2 kv_dim, hidden]
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor  # [hidden, q_dim]
    w_gate_up: torch.Tensor  # [2 intermediate, hidden]
    w_down: torch.Tensor  # [hidden, intermediate]
    ln_in: torch.Tensor
    ln_post: torch.Tensor
    lora: dict[str, ModuleSlots] = field(default_factory=dict)  # projection -> slots


class CausalLM:
    """Frozen base weights and the forward pass; LoRA slots are attached by the slot pool."""

    def __init__(self, hf_model: PreTrainedModel, device: torch.device, dtype: torch.dtype) -> None:
        self.shape = ModelShape.from_config(hf_model.config)
        self.device, self.dtype = device, dtype
        s = self.shape

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        inner = hf_model.model
        self.embed = take(inner.embed_tokens.weight)
        self.lm_head = take(hf_model.get_output_embeddings().weight)
        self.norm = take(inner.norm.weight)
        self.layers: list[DecoderLayer] = []
        for hl in inner.layers:
            att, mlp = hl.self_attn, hl.mlp
            if any(hasattr(att, n) for n in ("q_norm", "k_norm")):
                raise ValueError("per-head q/k norms are not supported")
            b_qkv = None
            if s.qkv_bias:
                b_qkv = take(torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]))
            self.layers.append(
                DecoderLayer(
                    w_qkv=take(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])),
                    b_qkv=b_qkv,
                    w_o=take(att.o_proj.weight),
                    w_gate_up=take(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                    w_down=take(mlp.down_proj.weight),
                    ln_in=take(hl.input_layernorm.weight),
                    ln_post=take(hl.post_attention_layernorm.weight),
                )
            )
        positions = torch.arange(s.max_positions, device="cpu")[None, :]
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
        self.rope_cos = cos[0].to(device=device, dtype=dtype)  # [max_positions, head_dim]
        self.rope_sin = sin[0].to(device=device, dtype=dtype)
        self.attn_scale = s.head_dim**-0.5
        # fp32 on the CPU: decode-sized projections by our GEMV kernel (every thread streams the weights).
        cpu_fp32 = device.type == "cpu" and dtype == torch.float32
        self.linear = cpu_gemv.linear if cpu_fp32 and cpu_gemv.available() else F.linear
        # [q | k | v] column slices of the fused projection, for LoRA.
        self.qkv_slices = {
            "q_proj": (0, s.q_dim),
            "k_proj": (s.q_dim, s.q_dim + s.kv_dim),
            "v_proj": (s.q_dim + s.kv_dim, s.q_dim + 2 * s.kv_dim),
        }
        self.gate_up_slices = {
            "gate_proj": (0, s.intermediate),
            "up_proj": (s.intermediate, 2 * s.intermediate),
        }

    @torch.inference_mode()
    def forward(self, step: StepInputs, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Run the packed batch; return fp32 logits ``[len(step.sample_rows), vocab]``."""
        s = self.shape
        t = step.input_ids.shape[0]
        x = self.embed.index_select(0, step.input_ids)
        cos = self.rope_cos.index_select(0, step.positions).unsqueeze(1)  # [T, 1, hd]
        sin = self.rope_sin.index_select(0, step.positions).unsqueeze(1)
        active = step.lora_projections if step.lora.has_lora else frozenset()
        linear = self.linear
        for layer, (k_cache, v_cache) in zip(self.layers, kv_cache, strict=True):
            lora = {name: slots for name, slots in layer.lora.items() if name in active}
            h = F.rms_norm(x, (s.hidden,), layer.ln_in, s.rms_eps)
            qkv = linear(h, layer.w_qkv, layer.b_qkv)
            for name, (lo, hi) in self.qkv_slices.items():
                if name in lora:
                    add_lora(qkv[:, lo:hi], h, lora[name], step.lora)
            q = qkv[:, : s.q_dim].view(t, s.n_heads, s.head_dim)
            k = qkv[:, s.q_dim : s.q_dim + s.kv_dim].view(t, s.n_kv_heads, s.head_dim)
            v = qkv[:, s.q_dim + s.kv_dim :].view(t, s.n_kv_heads, s.head_dim)
            q = _rope(q, cos, sin)
            k = _rope(k, cos, sin)
            a = attend(q, k, v.contiguous(), k_cache, v_cache, step.attention, self.attn_scale)
            o = linear(a, layer.w_o)
            if "o_proj" in lora:
                add_lora(o, a, lora["o_proj"], step.lora)
            x = x + o
            h = F.rms_norm(x, (s.hidden,), layer.ln_post, s.rms_eps)
            gu = linear(h, layer.w_gate_up)
            for name, (lo, hi) in self.gate_up_slices.items():
                if name in lora:
                    add_lora(gu[:, lo:hi], h, lora[name], step.lora)
            act = F.silu(gu[:, : s.intermediate]) * gu[:, s.intermediate :]
            d = linear(act, layer.w_down)
            if "down_proj" in lora:
                add_lora(d, act, lora["down_proj"], step.lora)
            x = x + d
        last = F.rms_norm(x.index_select(0, step.sample_rows), (s.hidden,), self.norm, s.rms_eps)
        return linear(last, self.lm_head).float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
