"""StableLM (2), mirroring transformers/models/stablelm/modeling_stablelm.py: llama's gated MLP with LayerNorm,
partial rotary (default 0.25), optional q/k/v biases (`use_qkv_bias`), optional per-head LayerNorm on queries and
keys (`qk_layernorm`: one bias-free norm per head) and an optional parallel residual sharing the input norm."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .core.kinds import LayerKind
from .core.layers import Attention, ResidualBlock


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 50304
    intermediate_size: int = 6912
    hidden_size: int = 2560
    num_key_value_heads: Optional[int] = 32
    max_position_embeddings: Optional[int] = 4096
    layer_norm_eps: float = 1e-5
    use_qkv_bias: bool = False
    qk_layernorm: bool = False
    use_parallel_residual: bool = False
    partial_rotary_factor: float = 0.25
    windowed = False


class PerHeadLayerNorm(nn.Module):
    """A bias-free LayerNorm per head (`norms.{i}.weight`) over (B, heads, L, head_dim)."""

    def __init__(self, head_dim: int, n_heads: int, eps: float):
        super().__init__()
        self.norms = [nn.LayerNorm(head_dim, eps=eps, bias=False) for _ in range(n_heads)]
        self.eps = eps

    def __call__(self, x):
        weight = mx.stack([n.weight for n in self.norms])[:, None, :]
        return mx.fast.layer_norm(x, None, None, self.eps) * weight


class StableLmAttention(Attention):
    def __init__(self, args: ModelArgs, rope):
        super().__init__(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim, rope,
                         qkv_bias=args.use_qkv_bias, o_bias=False)
        if args.qk_layernorm:
            self.q_layernorm = PerHeadLayerNorm(args.head_dim, args.num_attention_heads, args.layer_norm_eps)
            self.k_layernorm = PerHeadLayerNorm(args.head_dim, args.num_key_value_heads, args.layer_norm_eps)

    def project(self, x):
        q, k, v = super().project(x)
        if "q_layernorm" in self:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        return q, k, v


class Model(llama.Model):
    def norm(self) -> nn.Module:
        return nn.LayerNorm(self.args.hidden_size, eps=self.args.layer_norm_eps)

    def attention(self, index: int, kind: LayerKind) -> nn.Module:
        return StableLmAttention(self.args, self.rope)

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        if self.args.use_parallel_residual:  # no post-attention norm: the input norm feeds both
            return ResidualBlock(self.attention(index, kind), self.mlp(index), self.norm, norms=("input_layernorm",),
                                 parallel=True, kind=kind)
        return super().layer(index, kind)
