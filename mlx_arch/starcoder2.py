"""StarCoder2, mirroring transformers/models/starcoder2/modeling_starcoder2.py: GQA attention with biases
(`use_bias`), a sliding window on every layer when `sliding_window` is set, LayerNorm and a non-gated
`c_fc`/`c_proj` MLP."""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.layers import Attention, Backbone, CausalLM, DecoderLayer, DenseMLP, layer_norm, make_rope


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 49152
    hidden_size: int = 3072
    intermediate_size: int = 12288
    num_hidden_layers: int = 30
    num_attention_heads: int = 24
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 4096
    norm_epsilon: float = 1e-5
    sliding_window: Optional[int] = None
    use_bias: bool = True
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        rope = make_rope(args.head_dim, args.rope_theta, args.rope_scaling, 1.0, args.max_position_embeddings)
        norm = layer_norm(args.hidden_size, args.norm_epsilon)
        layers = [
            DecoderLayer(Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads,
                                   args.head_dim, rope, qkv_bias=args.use_bias, o_bias=args.use_bias),
                         DenseMLP(args.hidden_size, args.intermediate_size, args.hidden_act, bias=args.use_bias),
                         norm, window=args.sliding_window)
            for _ in range(args.num_hidden_layers)
        ]
        self.model = Backbone(args.vocab_size, args.hidden_size, layers, norm())
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
