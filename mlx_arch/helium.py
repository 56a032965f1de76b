"""Helium, mirroring transformers/models/helium/modeling_helium.py: llama with interleaved ("traditional") RoPE,
which rotates the pairs (x0, x1), (x2, x3), ..., q/k/v biases when `attention_bias` is set and never an o_proj
bias."""

from dataclasses import dataclass
from typing import Optional

from . import llama
from .core.layers import Attention, make_rope


@dataclass
class ModelArgs(llama.ModelArgs):
    rms_norm_eps: float = 1e-8
    num_key_value_heads: Optional[int] = 20
    head_dim: Optional[int] = 128
    max_position_embeddings: Optional[int] = 4096
    rope_theta: float = 100_000.0

    def __post_init__(self):
        super().__post_init__()
        self.sliding_window = None  # transformers' model has no sliding window (llama attention)
        if self.num_attention_heads * self.head_dim != self.hidden_size:
            # HeliumAttention's o_proj maps hidden_size to hidden_size.
            raise ValueError(f"helium needs num_attention_heads * head_dim == hidden_size, got "
                             f"{self.num_attention_heads} * {self.head_dim} != {self.hidden_size}")


class Model(llama.Model):
    def attention(self, args: ModelArgs, rope) -> Attention:
        rope = make_rope(args.head_dim, args.rope_theta, args.rope_scaling, args.partial_rotary_factor,
                         args.max_position_embeddings, traditional=True)
        return Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                         rope, qkv_bias=args.attention_bias, o_bias=False)
