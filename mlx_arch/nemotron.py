"""Nemotron (Nemotron-4, Minitron), mirroring transformers/models/nemotron/modeling_nemotron.py: "layernorm1p"
norms (LayerNorm whose weight is stored as an offset from one), a non-gated `up_proj`/`down_proj` MLP with squared
ReLU, partial rotary (default 0.5) and optional attention / MLP biases."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.layers import Attention, Backbone, CausalLM, DecoderLayer, DenseMLP, make_rope


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 256000
    hidden_size: int = 6144
    intermediate_size: int = 24576
    num_hidden_layers: int = 32
    num_attention_heads: int = 48
    head_dim: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    hidden_act: str = "relu2"
    max_position_embeddings: int = 4096
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    partial_rotary_factor: float = 0.5

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            # NemotronConfig states no default (its attention would fail): refuse rather than guess.
            raise ValueError("nemotron config has no num_key_value_heads")


class LayerNorm1P(nn.LayerNorm):
    """LayerNorm computing with (1 + weight)."""

    def __call__(self, x):
        return mx.fast.layer_norm(x, 1.0 + self.weight, self.bias, self.eps)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        rope = make_rope(args.head_dim, args.rope_theta, args.rope_scaling, args.partial_rotary_factor,
                         args.max_position_embeddings)

        def norm():
            return LayerNorm1P(args.hidden_size, eps=args.norm_eps)

        layers = [
            DecoderLayer(Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads,
                                   args.head_dim, rope, qkv_bias=args.attention_bias, o_bias=args.attention_bias),
                         DenseMLP(args.hidden_size, args.intermediate_size, args.hidden_act, bias=args.mlp_bias,
                                  names=("up_proj", "down_proj")),
                         norm)
            for _ in range(args.num_hidden_layers)
        ]
        self.model = Backbone(args.vocab_size, args.hidden_size, layers, norm())
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
