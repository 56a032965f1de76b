"""StableLM (2), mirroring transformers/models/stablelm/modeling_stablelm.py: llama's gated MLP with LayerNorm,
partial rotary (default 0.25), optional q/k/v biases (`use_qkv_bias`), optional per-head LayerNorm on queries and
keys (`qk_layernorm`: one bias-free norm per head) and an optional parallel residual sharing the input norm."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.layers import MLP, Attention, Backbone, CausalLM, DecoderLayer, ResidualBlock, layer_norm, make_rope


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 50304
    intermediate_size: int = 6912
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    use_qkv_bias: bool = False
    qk_layernorm: bool = False
    use_parallel_residual: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    partial_rotary_factor: float = 0.25


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
        head_dim = args.hidden_size // args.num_attention_heads
        super().__init__(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, head_dim, rope,
                         qkv_bias=args.use_qkv_bias, o_bias=False)
        if args.qk_layernorm:
            self.q_layernorm = PerHeadLayerNorm(head_dim, args.num_attention_heads, args.layer_norm_eps)
            self.k_layernorm = PerHeadLayerNorm(head_dim, args.num_key_value_heads, args.layer_norm_eps)

    def project(self, x):
        q, k, v = super().project(x)
        if "q_layernorm" in self:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        return q, k, v


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        rope = make_rope(args.hidden_size // args.num_attention_heads, args.rope_theta, args.rope_scaling,
                         args.partial_rotary_factor, args.max_position_embeddings)
        norm = layer_norm(args.hidden_size, args.layer_norm_eps)

        def layer():
            attn = StableLmAttention(args, rope)
            mlp = MLP(args.hidden_size, args.intermediate_size, args.hidden_act)
            if args.use_parallel_residual:  # no post-attention norm: the input norm feeds both
                return ResidualBlock(attn, mlp, norm, norms=("input_layernorm",), parallel=True)
            return DecoderLayer(attn, mlp, norm)

        self.model = Backbone(args.vocab_size, args.hidden_size, [layer() for _ in range(args.num_hidden_layers)],
                              norm())
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
