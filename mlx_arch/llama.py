"""Llama, mirroring transformers/models/llama/modeling_llama.py.

Also covers per-layer sliding-window attention (`layer_types` + `sliding_window`), which transformers' llama does
not have but which Llama-shaped checkpoints of other families (and mlx-lm's llama) use.
"""

from dataclasses import dataclass
from typing import Optional

from .core.base import BaseModelArgs
from .core.layers import MLP, Attention, Backbone, CausalLM, DecoderLayer, default_head_dim, layer_windows, make_rope, rms_norm

import mlx.nn as nn


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    layer_types: Optional[list] = None

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = default_head_dim(self)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        norm = rms_norm(args.hidden_size, args.rms_norm_eps)
        rope = make_rope(args.head_dim, args.rope_theta, args.rope_scaling, args.partial_rotary_factor,
                         args.max_position_embeddings)
        layers = [
            DecoderLayer(self.attention(args, rope),
                         MLP(args.hidden_size, args.intermediate_size, args.hidden_act, args.mlp_bias), norm, window)
            for window in layer_windows(args, args.num_hidden_layers)
        ]
        self.model = Backbone(args.vocab_size, args.hidden_size, layers, norm())
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def attention(self, args: ModelArgs, rope) -> Attention:
        """The attention block; families that differ only here (biases, q/k norms) override this."""
        return Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                         rope, qkv_bias=args.attention_bias, o_bias=args.attention_bias)
