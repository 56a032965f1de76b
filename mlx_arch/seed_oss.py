"""Seed-OSS, mirroring transformers/models/seed_oss/modeling_seed_oss.py: llama with q/k/v biases
(`attention_bias`, on by default), a separate o_proj bias switch (`attention_out_bias`) and head_dim 128 unless the
config says otherwise. Its dropouts only act in training."""

from dataclasses import dataclass
from typing import Optional

from . import llama
from .core.layers import Attention


@dataclass
class ModelArgs(llama.ModelArgs):
    num_key_value_heads: Optional[int] = 8
    head_dim: Optional[int] = 128
    max_position_embeddings: Optional[int] = 524288
    attention_bias: bool = True
    attention_out_bias: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.sliding_window = None  # transformers' model has no sliding window (llama attention)


class Model(llama.Model):
    def attention(self, args: ModelArgs, rope) -> Attention:
        return Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                         rope, qkv_bias=args.attention_bias, o_bias=args.attention_out_bias)
