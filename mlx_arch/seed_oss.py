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
    windowed = False


class Model(llama.Model):
    def attention(self, index: int, kind) -> Attention:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                         qkv_bias=a.attention_bias, o_bias=a.attention_out_bias)
