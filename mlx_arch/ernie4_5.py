"""ERNIE 4.5 (dense), mirroring transformers/models/ernie4_5/modeling_ernie4_5.py: llama with interleaved
("traditional") RoPE over the whole head, one `use_bias` switch for the q/k/v/o and MLP biases, and tied
embeddings by default."""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.layers import MLP, Attention, Backbone, CausalLM, DecoderLayer, make_rope, rms_norm


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 103424
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 18
    num_attention_heads: int = 16
    num_key_value_heads: Optional[int] = 2
    head_dim: Optional[int] = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    rope_theta: float = 500000.0  # Ernie4_5Config.default_theta
    rope_scaling: Optional[dict] = None
    use_bias: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        rope = make_rope(args.head_dim, args.rope_theta, args.rope_scaling, 1.0, args.max_position_embeddings,
                         traditional=True)
        norm = rms_norm(args.hidden_size, args.rms_norm_eps)
        layers = [
            DecoderLayer(Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads,
                                   args.head_dim, rope, qkv_bias=args.use_bias, o_bias=args.use_bias),
                         MLP(args.hidden_size, args.intermediate_size, args.hidden_act, bias=args.use_bias), norm)
            for _ in range(args.num_hidden_layers)
        ]
        self.model = Backbone(args.vocab_size, args.hidden_size, layers, norm())
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
