"""A lean forward pass over a packed batch for the decoder families of :mod:`server.model.families`.

Weights are read tensor by tensor (from the model's files, or a transformers model in tests), frozen, cast
once to the serving dtype and placed on the device; q/k/v and gate/up are fused into one matmul each. LoRA
terms are added into views of the fused outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PretrainedConfig

from server.lora.metadata import LoraBatch
from server.lora.ops import ModuleSlots, add_lora
from server.model import cpu_gemv, cpu_layer_ops
from server.model.architecture import ModelShape, UnsupportedModel
from server.model.attention import AttentionBatch, attend
from server.model.families import ACTIVATIONS
from server.model.quantized import QuantizedMatrix, concat_rows
from server.model.weights_source import TensorSource, lm_head_name

Weight = torch.Tensor | QuantizedMatrix  # a base projection: dense in the serving dtype, or quantized codes


@dataclass(frozen=True)
class StepInputs:
    """Everything one forward pass needs besides the weights, built once per step."""

    input_ids: torch.Tensor  # [T] int64, packed
    rope_rows: torch.Tensor  # [T] int64: each token's row of the rotary tables (its position, or past it: longrope)
    attention: AttentionBatch  # full causal attention
    windowed: AttentionBatch | None  # the sliding-window layers' (None: the model has none)
    lora: LoraBatch
    lora_projections: frozenset[str]  # projections some adapter of this step changes; the rest skip LoRA
    sample_rows: torch.Tensor  # [n] int64: rows whose next-token logits are needed


@dataclass
class DecoderLayer:
    w_qkv: Weight  # [q_dim + 2 kv_dim, hidden]
    b_qkv: torch.Tensor | None
    w_o: Weight  # [hidden, q_dim]
    w_gate_up: Weight  # [2 intermediate, hidden]
    w_down: Weight  # [hidden, intermediate]
    norms: dict[str, torch.Tensor]  # by position (Norms' fields: attn_in, attn_out, mlp_in, mlp_out)
    q_norm: torch.Tensor | None = None  # RMSNorm of q and k before RoPE: [head_dim] per head, or whole rows
    k_norm: torch.Tensor | None = None
    windowed: bool = False  # attends to the last sliding_window positions only
    rope: str | None = "default"  # its rotary table, None: no RoPE in this layer
    lora: dict[str, ModuleSlots] = field(default_factory=dict)  # projection -> slots


class CausalLM:
    """Frozen base weights and the forward pass; LoRA slots are attached by the slot pool."""

    def __init__(
        self,
        config: PretrainedConfig,
        tensors: TensorSource,
        device: torch.device,
        dtype: torch.dtype,
        quantized: dict[str, QuantizedMatrix] | None = None,
    ) -> None:
        """The serving copy of the weights named by transformers' parameter names in ``tensors``, read one at a
        time. ``quantized``: projections (by module name, and ``lm_head``) served as codes rather than dense.
        A tensor in ``tensors`` that this forward pass would not read is refused, naming it."""
        self.shape = ModelShape.from_config(config)
        self.device, self.dtype = device, dtype
        s = self.shape
        quantized = quantized or {}
        used: set[str] = set()

        def take(name: str, as_dtype: torch.dtype = dtype) -> torch.Tensor:
            used.add(name)
            return tensors.get(name, device, as_dtype).contiguous()

        def norm_weight(name: str) -> torch.Tensor:
            if not s.norm_weight_fp32:
                return take(name)
            return (take(name, torch.float32) + s.norm_offset).contiguous()  # Gemma stores w - 1

        def weight(*modules: str) -> Weight:
            """The modules' weights stacked by rows: quantized when all of them are, in one format."""
            if all(name in quantized for name in modules):
                fused = concat_rows([quantized[name] for name in modules])
                if fused is not None:
                    used.update(name + ".weight" for name in modules)
                    return fused
            parts = [take(name + ".weight") for name in modules]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        self.embed = take("model.embed_tokens.weight")
        head = lm_head_name(config)
        if "lm_head" in quantized:
            self.lm_head: Weight = quantized["lm_head"]
            used.add(head)
        else:  # tied: one copy
            self.lm_head = self.embed if head == "model.embed_tokens.weight" else take(head)
        self.norm = norm_weight("model.norm.weight")
        qkv_parts, gate_up_parts = (("qkv_proj",), ("gate_up_proj",)) if s.fused else (
            ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
        self.layers: list[DecoderLayer] = []
        for i in range(s.n_layers):
            prefix = f"model.layers.{i}"
            b_qkv = None
            if s.qkv_bias:
                b_qkv = torch.cat([take(s.module_name(i, p) + ".bias") for p in ("q_proj", "k_proj", "v_proj")])

            def named(*projections: str, i=i) -> list[str]:
                return [s.module_name(i, p) for p in projections]

            self.layers.append(
                DecoderLayer(
                    w_qkv=weight(*named(*qkv_parts)),
                    b_qkv=b_qkv,
                    w_o=weight(*named("o_proj")),
                    w_gate_up=weight(*named(*gate_up_parts)),
                    w_down=weight(*named("down_proj")),
                    norms={where: norm_weight(f"{prefix}.{name}.weight") for where, name in s.norms.placed()},
                    q_norm=norm_weight(f"{prefix}.self_attn.q_norm.weight") if s.qk_norm else None,
                    k_norm=norm_weight(f"{prefix}.self_attn.k_norm.weight") if s.qk_norm else None,
                    windowed=s.windowed[i],
                    rope=s.rope[i],
                )
            )
        _refuse_unread(s.model_type, tensors, used, ignore={"lm_head.weight"} if head != "lm_head.weight" else set())
        # [rows, rotary_dim] each: a row per position; with longrope, the short table's rows then the long one's
        # (server.model.runner picks a token's row).
        self.rope_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        rotary = rotary_module(config)
        for key in s.rope_keys:
            layer_type = None if key == "default" else key
            cos, sin = rope_tables(rotary, s.max_positions, layer_type)
            if cos.shape[1] != s.rotary_dim:  # transformers' rotary module and our reading of the config disagree
                raise UnsupportedModel(f"{s.model_type}: rotary tables of {cos.shape[1]} values per head, expected "
                                       f"{s.rotary_dim}")
            if s.long_rope_after is not None:  # transformers' rotary module picks the table by the length it sees
                short_cos, short_sin = rope_tables(rotary, s.long_rope_after, layer_type)
                cos, sin = torch.cat([short_cos, cos]), torch.cat([short_sin, sin])
            self.rope_tables[key] = (cos.to(device=device, dtype=dtype).contiguous(),
                                     sin.to(device=device, dtype=dtype).contiguous())
        self.embed_scale = None if s.embed_scale == 1.0 else torch.tensor(s.embed_scale, dtype=dtype, device=device)
        self.activation = _ACTIVATIONS[s.activation]
        # fp32 and bf16 on the CPU: decode-sized projections by our GEMV kernel (every thread streams the weights).
        cpu_kernel = device.type == "cpu" and dtype in cpu_gemv.MAX_TOKENS and cpu_gemv.available()
        self.dense_linear = cpu_gemv.linear if cpu_kernel else F.linear
        # fp32 and bf16 on the CPU: RMSNorm and RoPE by one C call each (see cpu_layer_ops).
        self.c_layer_ops = device.type == "cpu" and dtype in cpu_layer_ops.DTYPES and cpu_layer_ops.available()
        # Llama's norm arithmetic; Gemma's and OLMo 2's (times an fp32 weight, rounded once) equal it in fp32.
        if s.norm_weight_fp32 and dtype != torch.float32:
            self.rms_norm = cpu_layer_ops.rms_norm_fp32_weight
        else:
            self.rms_norm = cpu_layer_ops.rms_norm if self.c_layer_ops else cpu_layer_ops.torch_rms_norm
        # The column slices of the fused outputs that each targetable projection's LoRA term adds into.
        qkv, gate_up = s.q_dim + 2 * s.kv_dim, 2 * s.intermediate
        self.qkv_slices = {"qkv_proj": (0, qkv)} if s.fused else {
            "q_proj": (0, s.q_dim),
            "k_proj": (s.q_dim, s.q_dim + s.kv_dim),
            "v_proj": (s.q_dim + s.kv_dim, qkv),
        }
        self.gate_up_slices = {"gate_up_proj": (0, gate_up)} if s.fused else {
            "gate_proj": (0, s.intermediate),
            "up_proj": (s.intermediate, gate_up),
        }

    def linear(self, x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
        if type(w) is QuantizedMatrix:
            return w.linear(x, b)
        return self.dense_linear(x, w, b)

    def weights_summary(self) -> str:
        """How the base projections are held, e.g. ``float32`` or ``Q4_1 + Q8_0 codes (68 MB), rest float32``."""
        dtype = str(self.dtype).removeprefix("torch.")
        mats = [self.lm_head] + [getattr(ly, n) for ly in self.layers for n in ("w_qkv", "w_o", "w_gate_up", "w_down")]
        quantized = [m for m in mats if type(m) is QuantizedMatrix]
        if not quantized:
            return dtype
        kinds = " + ".join(sorted({m.kind for m in quantized}))
        rest = "" if len(quantized) == len(mats) else f", other projections {dtype}"
        acts = f"int8 in decode steps, else {dtype}" if any(m.int8_activations for m in quantized) else dtype
        return f"{kinds} codes ({sum(m.nbytes for m in quantized) >> 20} MB){rest}, activations {acts}"

    def _qk_norms(self, qkv: torch.Tensor, layer: DecoderLayer) -> None:
        """The q and k norms on the q and k columns of the fused projection's output, in place."""
        s, norm = self.shape, self.rms_norm
        q, k = qkv[:, : s.q_dim], qkv[:, s.q_dim : s.q_dim + s.kv_dim]
        if s.qk_norm == "head":
            _head_norm_(q, s.n_heads, s.head_dim, layer.q_norm, norm, s.rms_eps)
            _head_norm_(k, s.n_kv_heads, s.head_dim, layer.k_norm, norm, s.rms_eps)
        else:  # over all heads at once
            q.copy_(norm(q, layer.q_norm, s.rms_eps))
            k.copy_(norm(k, layer.k_norm, s.rms_eps))

    def _residual(self, x: torch.Tensor, branch: torch.Tensor, post_norm: torch.Tensor | None) -> torch.Tensor:
        """``x`` plus a layer branch's output: normalized first where the family has a post-norm, scaled where
        it has a residual multiplier."""
        if post_norm is not None:
            branch = self.rms_norm(branch, post_norm, self.shape.rms_eps)
        if self.shape.residual_scale != 1.0:
            branch = branch * self.shape.residual_scale
        return x + branch

    @torch.inference_mode()
    def forward(self, step: StepInputs, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Run the packed batch; return fp32 logits ``[len(step.sample_rows), vocab]``."""
        s = self.shape
        t = step.input_ids.shape[0]
        x = self.embed.index_select(0, step.input_ids)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        c_ops = self.c_layer_ops
        norm, eps = self.rms_norm, s.rms_eps
        if not c_ops:  # each table's rows at this step's positions, [T, 1, rotary_dim]
            at = {key: tuple(tab.index_select(0, step.rope_rows).unsqueeze(1) for tab in tables)
                  for key, tables in self.rope_tables.items()}
        active = step.lora_projections if step.lora.has_lora else frozenset()
        linear = self.linear
        for layer, (k_cache, v_cache) in zip(self.layers, kv_cache, strict=True):
            lora = {name: slots for name, slots in layer.lora.items() if name in active}
            ln = layer.norms
            h = norm(x, ln["attn_in"], eps) if "attn_in" in ln else x
            qkv = linear(h, layer.w_qkv, layer.b_qkv)
            for name, (lo, hi) in self.qkv_slices.items():
                if name in lora:
                    add_lora(qkv[:, lo:hi], h, lora[name], step.lora)
            if layer.q_norm is not None:
                self._qk_norms(qkv, layer)
            if c_ops and layer.rope is not None:  # q and k rotated in place
                cos, sin = self.rope_tables[layer.rope]
                cpu_layer_ops.rope_(qkv, s.n_heads + s.n_kv_heads, s.head_dim, cos, sin, step.rope_rows)
            q = qkv[:, : s.q_dim].view(t, s.n_heads, s.head_dim)
            k = qkv[:, s.q_dim : s.q_dim + s.kv_dim].view(t, s.n_kv_heads, s.head_dim)
            v = qkv[:, s.q_dim + s.kv_dim :].view(t, s.n_kv_heads, s.head_dim)
            if not c_ops and layer.rope is not None:
                cos, sin = at[layer.rope]
                q = _rope(q, cos, sin)
                k = _rope(k, cos, sin)
            batch = step.windowed if layer.windowed else step.attention
            a = attend(q, k, v.contiguous(), k_cache, v_cache, batch, s.scale, s.attn_softcap)
            o = linear(a, layer.w_o)
            if "o_proj" in lora:
                add_lora(o, a, lora["o_proj"], step.lora)
            x = self._residual(x, o, ln.get("attn_out"))
            h = norm(x, ln["mlp_in"], eps) if "mlp_in" in ln else x
            gu = linear(h, layer.w_gate_up)
            for name, (lo, hi) in self.gate_up_slices.items():
                if name in lora:
                    add_lora(gu[:, lo:hi], h, lora[name], step.lora)
            act = self.activation(gu[:, : s.intermediate]) * gu[:, s.intermediate :]
            d = linear(act, layer.w_down)
            if "down_proj" in lora:
                add_lora(d, act, lora["down_proj"], step.lora)
            x = self._residual(x, d, ln.get("mlp_out"))
        last = norm(x.index_select(0, step.sample_rows), self.norm, eps)
        logits = linear(last, self.lm_head).float()
        if s.logits_divisor != 1.0:
            logits = logits / s.logits_divisor
        if s.final_softcap is not None:
            logits = torch.tanh(logits / s.final_softcap) * s.final_softcap
        return logits


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = dict(zip(ACTIVATIONS, (F.silu, _gelu_tanh, F.gelu), strict=True))  # by transformers' names


def _refuse_unread(model_type: str, tensors: TensorSource, used: set[str], ignore: set[str]) -> None:
    """A weight the forward pass does not read means the file holds a model it does not implement."""
    unread = sorted(n for n in tensors.names() if n not in used and n not in ignore and not n.endswith("inv_freq"))
    if unread:
        more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
        raise UnsupportedModel(
            f"{model_type}: the weights hold tensors this family's forward pass does not use: "
            f"{', '.join(unread[:3])}{more}"
        )


def rotary_module(config: PretrainedConfig) -> torch.nn.Module:
    """The model's own transformers rotary module (its rope type and scaling included), built from the config
    alone: the model's skeleton on the meta device names the module's class."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return type(skeleton.model.rotary_emb)(config=config)


def rope_tables(
    rotary: torch.nn.Module, max_positions: int, layer_type: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin ``[max_positions, rotary_dim]`` from a :func:`rotary_module` (``layer_type`` for families
    with one table per layer type)."""
    positions = torch.arange(max_positions)[None, :]
    extra = {} if layer_type is None else {"layer_type": layer_type}
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions, **extra)
    return cos[0], sin[0]


def _head_norm_(part: torch.Tensor, heads: int, head_dim: int, w: torch.Tensor, norm, eps: float) -> None:
    """RMSNorm over each head of ``part [T, heads * head_dim]`` (a column slice), in place."""
    t = part.shape[0]
    part.copy_(norm(part.reshape(t * heads, head_dim), w, eps).view(t, heads * head_dim))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ``cos.shape[-1]`` values of each head of ``x``; the rest pass through."""
    dim = cos.shape[-1]
    if dim < x.shape[-1]:
        return torch.cat((_rope(x[..., :dim], cos, sin), x[..., dim:]), dim=-1)
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
