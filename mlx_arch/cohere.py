"""Cohere (Command-R), mirroring transformers/models/cohere/modeling_cohere.py: attention and MLP in parallel on
one bias-free LayerNorm (x + attn(n(x)) + mlp(n(x))), interleaved ("traditional") RoPE, logits multiplied by
`logit_scale`, embeddings tied by default, and with `use_qk_norm` a bias-free LayerNorm over each head of q and k
with its own weight per head (`q_norm.weight` of shape (heads, head_dim))."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.layers import MLP, Attention, Backbone, CausalLM, ResidualBlock, layer_norm, make_rope


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 256000
    hidden_size: int = 8192
    intermediate_size: int = 22528
    logit_scale: float = 0.0625
    num_hidden_layers: int = 40
    num_attention_heads: int = 64
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None  # not a CohereConfig field; llama's attention reads it when a config has one
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    rope_theta: float = 500000.0  # CohereConfig.default_theta
    rope_scaling: Optional[dict] = None
    attention_bias: bool = False
    use_qk_norm: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


class PerHeadLayerNorm(nn.Module):
    """Bias-free LayerNorm over head_dim with a weight per head, applied to (B, L, heads, head_dim)."""

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((n_heads, head_dim))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.layer_norm(x, None, None, self.eps) * self.weight


class CohereAttention(Attention):
    def __init__(self, args: ModelArgs, rope):
        super().__init__(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim, rope,
                         qkv_bias=args.attention_bias, o_bias=args.attention_bias)
        if args.use_qk_norm:  # `project` applies q_norm / k_norm per head, before RoPE
            self.q_norm = PerHeadLayerNorm(args.num_attention_heads, args.head_dim, args.layer_norm_eps)
            self.k_norm = PerHeadLayerNorm(args.num_key_value_heads, args.head_dim, args.layer_norm_eps)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.logit_scale = args.logit_scale
        rope = make_rope(args.head_dim, args.rope_theta, args.rope_scaling, 1.0, args.max_position_embeddings,
                         traditional=True)
        norm = layer_norm(args.hidden_size, args.layer_norm_eps, bias=False)
        layers = [
            ResidualBlock(CohereAttention(args, rope), MLP(args.hidden_size, args.intermediate_size, args.hidden_act),
                          norm, norms=("input_layernorm",), parallel=True)
            for _ in range(args.num_hidden_layers)
        ]
        self.model = Backbone(args.vocab_size, args.hidden_size, layers, norm())
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
