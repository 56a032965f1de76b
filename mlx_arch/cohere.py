"""Cohere (Command-R), mirroring transformers/models/cohere/modeling_cohere.py: attention and MLP in parallel on
one bias-free LayerNorm (x + attn(n(x)) + mlp(n(x))), interleaved ("traditional") RoPE, logits multiplied by
`logit_scale`, embeddings tied by default, and with `use_qk_norm` a bias-free LayerNorm over each head of q and k
with its own weight per head (`q_norm.weight` of shape (heads, head_dim))."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .core.kinds import LayerKind
from .core.layers import Attention, ResidualBlock


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 256000
    hidden_size: int = 8192
    intermediate_size: int = 22528
    logit_scale: float = 0.0625
    num_hidden_layers: int = 40
    num_attention_heads: int = 64
    max_position_embeddings: Optional[int] = 8192
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    rope_theta: float = 500000.0  # CohereConfig.default_theta
    use_qk_norm: bool = False
    windowed = False


class PerHeadLayerNorm(nn.Module):
    """Bias-free LayerNorm over head_dim with a weight per head, applied to (B, L, heads, head_dim)."""

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((n_heads, head_dim))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.layer_norm(x, None, None, self.eps) * self.weight


class Model(llama.Model):
    rope_traditional = True

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.logit_scale = args.logit_scale

    def norm(self) -> nn.Module:
        return nn.LayerNorm(self.args.hidden_size, eps=self.args.layer_norm_eps, bias=False)

    def attention(self, index: int, kind: LayerKind) -> Attention:
        a = self.args
        attn = super().attention(index, kind)
        if a.use_qk_norm:  # `project` applies q_norm / k_norm per head, before RoPE
            attn.q_norm = PerHeadLayerNorm(a.num_attention_heads, a.head_dim, a.layer_norm_eps)
            attn.k_norm = PerHeadLayerNorm(a.num_key_value_heads, a.head_dim, a.layer_norm_eps)
        return attn

    def layer(self, index: int, kind: LayerKind) -> ResidualBlock:
        return ResidualBlock(self.attention(index, kind), self.mlp(index), self.norm, norms=("input_layernorm",),
                             parallel=True, kind=kind)
