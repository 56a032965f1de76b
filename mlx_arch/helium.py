"""Helium, mirroring transformers/models/helium/modeling_helium.py: llama with interleaved ("traditional") RoPE,
which rotates the pairs (x0, x1), (x2, x3), ..., q/k/v biases when `attention_bias` is set and never an o_proj
bias."""

from dataclasses import dataclass
from typing import Optional

from . import llama
from .core.layers import Attention


@dataclass
class ModelArgs(llama.ModelArgs):
    rms_norm_eps: float = 1e-8
    num_key_value_heads: Optional[int] = 20
    head_dim: Optional[int] = 128
    max_position_embeddings: Optional[int] = 4096
    rope_theta: float = 100_000.0
    windowed = False

    def __post_init__(self):
        super().__post_init__()
        if self.num_attention_heads * self.head_dim != self.hidden_size:
            # HeliumAttention's o_proj maps hidden_size to hidden_size.
            raise ValueError(f"helium needs num_attention_heads * head_dim == hidden_size, got "
                             f"{self.num_attention_heads} * {self.head_dim} != {self.hidden_size}")


class Model(llama.Model):
    rope_traditional = True

    def attention(self, index: int, kind) -> Attention:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                         qkv_bias=a.attention_bias, o_bias=False)
