"""Qwen3-Next, mirroring transformers/models/qwen3_next/modeling_qwen3_next.py: a hybrid of gated attention layers
(q_proj also yields a per-head output gate, o_proj(attn * sigmoid(gate)); (1 + w) RMS q/k norms; RoPE on
`partial_rotary_factor` of head_dim, 0.25 by default) and gated delta-net layers (`linear_attn`), each followed by
Qwen2-MoE's sparse block (softmax top-k, shared expert with a sigmoid gate) or a dense MLP (`mlp_only_layers`,
`decoder_sparse_step`).

Layer kinds come from `layer_types`, or from the older `full_attention_interval` (every n-th layer full, 4 by
default), as Qwen3NextConfig reads them. mlx-lm reads only the interval, which `export_config` writes.

The (1 + w) norms are stored folded (w + 1) and computed as plain RMSNorms, the layout mlx-lm reads; the fold is
applied only to weights whose q/k/v convolutions are still in the checkpoint's (C, 1, K) layout, so sanitize can run
twice.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import qwen2_moe
from .core.conv import DepthwiseLayout, causal_conv, depthwise_conv
from .core.kinds import LayerKind
from .core.layers import Attention, activation
from .core.linear import FoldNormOffset, GatedRMSNorm, RecurrentBlock, gated_delta, l2norm, repeat_heads


@dataclass
class ModelArgs(qwen2_moe.ModelArgs):
    model_type: str = "qwen3_next"
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: Optional[int] = 2
    head_dim: Optional[int] = 256
    partial_rotary_factor: float = 0.25
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts_per_tok: int = 10
    num_experts: int = 512
    norm_topk_prob: bool = True
    qkv_bias: bool = False
    full_attention_interval: int = 4  # legacy: only read when there are no layer_types
    windowed = False

    def __post_init__(self):
        if self.layer_types is None:
            n = self.full_attention_interval
            self.layer_types = ["full_attention" if (i + 1) % n == 0 else "linear_attention"
                                for i in range(self.num_hidden_layers)]
        super().__post_init__()


class GatedAttention(Attention):
    """Attention whose q_proj yields, per head, the queries and an output gate: o_proj(attn * sigmoid(gate))."""

    def __init__(self, hidden_size, n_heads, n_kv_heads, head_dim, rope, bias, norm):
        super().__init__(hidden_size, n_heads, n_kv_heads, head_dim, rope, qkv_bias=bias, o_bias=bias, qk_norm=norm)
        self.q_proj = nn.Linear(hidden_size, 2 * n_heads * head_dim, bias=bias)

    def __call__(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        q, gate = mx.split(self.q_proj(x).reshape(B, L, self.n_heads, 2 * self.head_dim), 2, axis=-1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (self.q_norm(q), self.k_norm(k), v))
        out = self.attend(q, k, v, mask, cache)
        return self.o_proj(out * mx.sigmoid(gate.reshape(B, L, -1)))


class GatedDeltaNet(nn.Module):
    """The gated delta-net mixer: [q | k | v | z] and [b | a] projected per key-head group, a causal conv + act on
    q/k/v, beta = sigmoid(b), log decay g = -exp(A_log) * softplus(a + dt_bias), l2-normed q/k, the gated delta
    rule, then a gated RMSNorm with z and out_proj."""

    cache_slots = 2  # the convolution's last inputs, the delta rule's state
    sensitive_children = ("out_proj",)
    chunk = 64

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.nk, self.nv = a.linear_num_key_heads, a.linear_num_value_heads
        self.dk, self.dv = a.linear_key_head_dim, a.linear_value_head_dim
        key_dim, value_dim = self.nk * self.dk, self.nv * self.dv
        self.conv1d = depthwise_conv(2 * key_dim + value_dim, a.linear_conv_kernel_dim, bias=False)
        self.in_proj_qkvz = nn.Linear(a.hidden_size, 2 * key_dim + 2 * value_dim, bias=False)
        self.in_proj_ba = nn.Linear(a.hidden_size, 2 * self.nv, bias=False)
        self.dt_bias = mx.ones((self.nv,))
        self.A_log = mx.zeros((self.nv,))
        self.norm = GatedRMSNorm(self.dv, eps=a.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, a.hidden_size, bias=False)
        self.act = activation(a.hidden_act)

    def project(self, x):
        """q, k (B, L, nk, dk), v, z (B, L, nv, dv), b, a (B, L, nv) from the grouped projections."""
        B, L, _ = x.shape
        r = self.nv // self.nk
        qkvz = self.in_proj_qkvz(x).reshape(B, L, self.nk, -1)
        q, k, v, z = mx.split(qkvz, [self.dk, 2 * self.dk, 2 * self.dk + r * self.dv], axis=-1)
        b, a = mx.split(self.in_proj_ba(x).reshape(B, L, self.nk, 2 * r), 2, axis=-1)
        return q, k, v.reshape(B, L, self.nv, self.dv), z.reshape(B, L, self.nv, self.dv), \
            b.reshape(B, L, self.nv), a.reshape(B, L, self.nv)

    def mix(self, q, k, v, z, b, a, cache):
        """Convolution, gates and the delta rule; returns (B, L, nv * dv) before out_proj."""
        B, L = q.shape[:2]
        mixed = mx.concatenate([q.reshape(B, L, -1), k.reshape(B, L, -1), v.reshape(B, L, -1)], axis=-1)
        mixed = self.act(causal_conv(self.conv1d, mixed, cache, slot=0))
        q, k, v = mx.split(mixed, [self.nk * self.dk, 2 * self.nk * self.dk], axis=-1)
        q, k = (l2norm(t.reshape(B, L, self.nk, self.dk).astype(mx.float32)) for t in (q, k))
        q, k = repeat_heads(q * self.dk**-0.5, self.nv), repeat_heads(k, self.nv)
        beta = mx.sigmoid(b.astype(mx.float32))
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + self.dt_bias)
        out = gated_delta(q, k, v.reshape(B, L, self.nv, self.dv), g, beta, cache, slot=1, chunk=self.chunk)
        return self.norm(out.astype(v.dtype), z).reshape(B, L, -1)

    def __call__(self, x, mask=None, cache=None):
        return self.out_proj(self.mix(*self.project(x), cache))


class Model(qwen2_moe.Model):
    reference_reads_children = True  # transformers' delta net reads its conv1d's weight without calling the module

    def attention(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        return GatedAttention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                              a.attention_bias, lambda dims: nn.RMSNorm(dims, eps=a.rms_norm_eps))

    def linear_attention(self, index: int) -> nn.Module:
        return GatedDeltaNet(self.args)

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        mixer = self.attention(index, kind) if kind.attends else self.linear_attention(index)
        return RecurrentBlock(mixer, self.mlp(index), self.norm,
                              names=("self_attn" if kind.attends else "linear_attn", "mlp"), kind=kind)

    def weight_rules(self) -> list:
        conv = "model.layers.{i}.linear_attn.conv1d.weight"
        norms = [f"model.layers.{{i}}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm",
                                                              "self_attn.q_norm", "self_attn.k_norm")]
        return super().weight_rules() + [FoldNormOffset(conv, "model.norm.weight", *norms), DepthwiseLayout(conv)]

    def export_config(self, config: dict) -> dict:
        a = self.args
        out = {**config, "head_dim": a.head_dim, "partial_rotary_factor": a.partial_rotary_factor,
               "mlp_only_layers": a.mlp_only_layers}
        kinds = a.layer_types[: a.num_hidden_layers]
        for n in range(1, len(kinds) + 1):
            if all((t == "full_attention") == ((i + 1) % n == 0) for i, t in enumerate(kinds)):
                return {**out, "full_attention_interval": n}
        return out
