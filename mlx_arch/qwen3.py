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
    def attention(self, index: int, kind) -> Attention:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                         qkv_bias=a.attention_bias, o_bias=a.attention_bias,
                         qk_norm=lambda dims: nn.RMSNorm(dims, eps=a.rms_norm_eps))
