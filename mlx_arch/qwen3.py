"""Qwen3, mirroring transformers/models/qwen3/modeling_qwen3.py: Qwen2's layout with RMS q/k norms per head and
attention biases only when `attention_bias` is set."""

from dataclasses import dataclass

import mlx.nn as nn

from . import qwen2
from .core.layers import Attention


@dataclass
class ModelArgs(qwen2.ModelArgs):
    pass


class Model(qwen2.Model):
    def attention(self, args: ModelArgs, rope) -> Attention:
        return Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                         rope, qkv_bias=args.attention_bias, o_bias=args.attention_bias,
                         qk_norm=lambda dims: nn.RMSNorm(dims, eps=args.rms_norm_eps))
