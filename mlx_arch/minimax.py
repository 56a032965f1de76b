"""MiniMax (MiniMax-Text-01), mirroring transformers/models/minimax/modeling_minimax.py: Mixtral's sparse MoE blocks
under a hybrid of softmax attention layers (a sliding window on all of them when `sliding_window` is set) and
lightning-attention layers (`layer_types`; by default every second layer from the second on is linear).

Lightning attention: q, k, v = act(qkv_proj(x)) per head, unscaled linear attention whose state decays per token by
exp(-slope) (slope per head, shrinking with the layer's depth), an RMSNorm (eps 1e-6) over all heads, then
out_proj(sigmoid(output_gate(x)) * norm). transformers keeps the slopes and the block decays derived from them as
buffers in the checkpoint; they are recomputed here from the config and the stored copies dropped.

Each block is post-norm on its residual: h = n1(x); h = h * alpha + attn(h) * beta; h = n2(h);
out = h * mlp_alpha + mlp(h) * mlp_beta, with alphas and betas per attention kind from the config.

Hub configs of the released model say `attn_type_list` (1 = softmax attention) and `rotary_dim`, which transformers
5.25 does not read: a config without `layer_types` gets transformers' default pattern here too, and RoPE turns the
whole head_dim whatever `rotary_dim` or `partial_rotary_factor` say (MiniMaxRotaryEmbedding reads neither).
mlx-lm's `minimax` module is MiniMax-M2's architecture, not this one.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import mixtral
from .core.kinds import LayerKind, sliding
from .core.layers import activation
from .core.linear import decayed_linear
from .core.weights import Drop


@dataclass
class ModelArgs(mixtral.ModelArgs):
    model_type: str = "minimax"
    rope_theta: float = 10000.0
    block_size: int = 256
    full_attn_alpha_factor: float = 1
    full_attn_beta_factor: float = 1
    linear_attn_alpha_factor: float = 1
    linear_attn_beta_factor: float = 1
    mlp_alpha_factor: float = 1
    mlp_beta_factor: float = 1

    def __post_init__(self):
        super().__post_init__()
        self.partial_rotary_factor = 1.0  # not read by transformers' MiniMax
        if self.layer_types is None:
            self.layer_types = ["full_attention" if (i + 1) % 2 else "linear_attention"
                                for i in range(self.num_hidden_layers)]


class LightningAttention(nn.Module):
    cache_slots = 1  # the decayed key-value state
    sensitive_children = ("out_proj",)

    def __init__(self, a: ModelArgs, index: int):
        super().__init__()
        self.heads, self.head_dim, self.chunk = a.num_attention_heads, a.head_dim, a.block_size
        width = self.heads * self.head_dim
        self.qkv_proj = nn.Linear(a.hidden_size, 3 * width, bias=False)
        self.out_proj = nn.Linear(width, a.hidden_size, bias=False)
        self.output_gate = nn.Linear(a.hidden_size, width, bias=False)
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.act = activation(a.hidden_act)
        base = 1 / (2 ** (8 / self.heads))
        depth = 1 - index / (a.num_hidden_layers - 1 + 1e-5) + 1e-5
        self._slope = mx.array([base ** (h + 1) * depth for h in range(self.heads)], dtype=mx.float32)

    def __call__(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        qkv = self.act(self.qkv_proj(x)).reshape(B, L, self.heads, 3 * self.head_dim)
        q, k, v = mx.split(qkv, 3, axis=-1)
        g = mx.broadcast_to(-self._slope, (B, L, self.heads))
        out = decayed_linear(q, k, v, g, cache, chunk=self.chunk).astype(x.dtype).reshape(B, L, -1)
        return self.out_proj(mx.sigmoid(self.output_gate(x)) * self.norm(out))


class Block(nn.Module):
    """MiniMax's post-norm block with scaled residuals."""

    def __init__(self, attn, mlp, norm, kind: LayerKind, attn_factors, mlp_factors):
        super().__init__()
        self.self_attn, self.block_sparse_moe = attn, mlp
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.kind, self.attn_factors, self.mlp_factors = kind, attn_factors, mlp_factors

    def __call__(self, x, mask=None, cache=None):
        (a1, b1), (a2, b2) = self.attn_factors, self.mlp_factors
        h = self.input_layernorm(x)
        h = self.post_attention_layernorm(h * a1 + self.self_attn(h, mask, cache) * b1)
        return h * a2 + self.block_sparse_moe(h) * b2

    def make_cache(self):
        from .core.cache import StateCache

        return self.kind.make_cache() if self.kind.attends else StateCache(self.self_attn.cache_slots)


class Model(mixtral.Model):
    def layer_kinds(self) -> list:
        a = self.args
        return [sliding(a.sliding_window) if t == "full_attention" else LayerKind("recurrent")
                for t in a.layer_types[: a.num_hidden_layers]]

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        if kind.attends:
            attn, factors = self.attention(index, kind), (a.full_attn_alpha_factor, a.full_attn_beta_factor)
        else:
            attn, factors = LightningAttention(a, index), (a.linear_attn_alpha_factor, a.linear_attn_beta_factor)
        return Block(attn, self.mlp(index), self.norm, kind, factors, (a.mlp_alpha_factor, a.mlp_beta_factor))

    def weight_rules(self) -> list:
        derived = Drop(*(f"model.layers.{{i}}.self_attn.{b}" for b in
                         ("slope_rate", "query_decay", "key_decay", "diagonal_decay")),
                       why="derived from the config (slopes and their block decays)")
        return super().weight_rules() + [derived]
