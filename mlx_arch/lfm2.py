"""LFM2, mirroring transformers/models/lfm2/modeling_lfm2.py: a hybrid of attention layers (RMS q/k norms named
`q_layernorm` / `k_layernorm`, output `out_proj`) and gated short-convolution layers (`conv`: in_proj -> B, C, x;
y = out_proj(C * causal_conv(B * x))), each followed by a SwiGLU `feed_forward` (w1, w3, w2) whose width
`block_auto_adjust_ff_dim` shrinks to 2/3, scales by `block_ffn_dim_multiplier` and rounds up to
`block_multiple_of`. The final norm is `embedding_norm`; embeddings are tied by default.

Older Hub configs say `full_attn_idxs` instead of `layer_types`, `block_ff_dim` for `intermediate_size` and
`tie_embedding` for `tie_word_embeddings` (all read as Lfm2Config does), and carry `block_dim` (= hidden_size),
which mlx-lm requires and `export_config` writes back.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .core.conv import DepthwiseLayout, causal_conv, depthwise_conv
from .core.kinds import LayerKind
from .core.layers import Attention, NamedBackbone
from .core.linear import RecurrentBlock


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "lfm2"
    vocab_size: int = 65536
    hidden_size: int = 2560
    intermediate_size: int = 12288
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = 8
    max_position_embeddings: Optional[int] = 128_000
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    rope_theta: float = 1_000_000.0
    conv_bias: bool = False
    conv_L_cache: int = 3
    block_multiple_of: int = 256
    block_ffn_dim_multiplier: Optional[float] = 1.0
    block_auto_adjust_ff_dim: bool = True
    full_attn_idxs: Optional[list] = None
    tie_embedding: Optional[bool] = None  # legacy spellings, read as Lfm2Config reads them
    block_ff_dim: Optional[int] = None
    windowed = False

    def __post_init__(self):
        super().__post_init__()
        if self.tie_embedding is not None:
            self.tie_word_embeddings = self.tie_embedding
        if self.block_ff_dim is not None:
            self.intermediate_size = self.block_ff_dim
        if self.layer_types is None:
            full = self.full_attn_idxs if self.full_attn_idxs is not None else range(self.num_hidden_layers)
            self.layer_types = ["full_attention" if i in full else "conv" for i in range(self.num_hidden_layers)]

    @property
    def ff_dim(self) -> int:
        width = self.intermediate_size
        if self.block_auto_adjust_ff_dim:
            width = int(2 * width / 3)
            if self.block_ffn_dim_multiplier is not None:
                width = int(self.block_ffn_dim_multiplier * width)
                width = self.block_multiple_of * -(-width // self.block_multiple_of)
        return width


class Lfm2Attention(Attention):
    """Attention with LFM2's module names."""

    def __init__(self, a: ModelArgs, rope):
        super().__init__(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, rope)
        self.out_proj = self.o_proj
        del self["o_proj"]
        self.q_layernorm = nn.RMSNorm(a.head_dim, eps=a.norm_eps)
        self.k_layernorm = nn.RMSNorm(a.head_dim, eps=a.norm_eps)

    def project(self, x):
        q, k, v = super().project(x)
        return self.q_layernorm(q), self.k_layernorm(k), v

    def __call__(self, x, mask=None, cache=None):
        return self.out_proj(self.attend(*self.project(x), mask, cache))


class ShortConv(nn.Module):
    """The gated short convolution: out_proj(C * conv(B * x)) with [B | C | x] = in_proj(h)."""

    cache_slots = 1  # the last conv_L_cache - 1 inputs of the convolution
    sensitive_children = ("out_proj",)

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.conv = depthwise_conv(a.hidden_size, a.conv_L_cache, bias=a.conv_bias)
        self.in_proj = nn.Linear(a.hidden_size, 3 * a.hidden_size, bias=a.conv_bias)
        self.out_proj = nn.Linear(a.hidden_size, a.hidden_size, bias=a.conv_bias)

    def __call__(self, x, mask=None, cache=None):
        b, c, x = mx.split(self.in_proj(x), 3, axis=-1)
        return self.out_proj(c * causal_conv(self.conv, b * x, cache))


class FeedForward(nn.Module):
    sensitive_children = ("w2",)

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dims, hidden, bias=False)
        self.w3 = nn.Linear(dims, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x):
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


class Model(llama.Model):
    reference_reads_children = True  # transformers' ShortConv reads its conv's weight without calling the module

    def norm(self) -> nn.Module:
        return nn.RMSNorm(self.args.hidden_size, eps=self.args.norm_eps)

    def backbone(self, layers: list) -> nn.Module:
        a = self.args
        return NamedBackbone(a.vocab_size, a.hidden_size, layers, self.norm(),
                             names=("embed_tokens", "layers", "embedding_norm"))

    def mixer(self, index: int, kind: LayerKind) -> nn.Module:
        return Lfm2Attention(self.args, self.rope) if kind.attends else ShortConv(self.args)

    def mlp(self, index: int) -> nn.Module:
        return FeedForward(self.args.hidden_size, self.args.ff_dim)

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        return RecurrentBlock(self.mixer(index, kind), self.mlp(index), self.norm, norms=("operator_norm", "ffn_norm"),
                              names=("self_attn" if kind.attends else "conv", "feed_forward"), kind=kind)

    def weight_rules(self) -> list:
        return super().weight_rules() + [DepthwiseLayout("model.layers.{i}.conv.conv.weight")]

    def export_config(self, config: dict) -> dict:
        return {**config, "block_dim": self.args.hidden_size}
