"""OLMo (transformers format, e.g. allenai/OLMo-1B-hf), mirroring transformers/models/olmo/modeling_olmo.py: llama
with non-parametric LayerNorms (no weight, no bias, eps 1e-5 fixed), optional q/k/v/o biases (`attention_bias`), a
bias-free MLP, and q/k/v activations clamped to [-clip_qkv, clip_qkv] when `clip_qkv` is set.

mlx-lm's `olmo` is a different format (ai2-olmo's `d_model` / `att_proj` checkpoints), so module names follow
transformers."""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from . import llama
from .core.kinds import LayerKind
from .core.layers import Attention, ClipQKV


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 50304
    clip_qkv: Optional[float] = None
    windowed = False


class ClippedAttention(ClipQKV, Attention):
    """Attention whose q/k/v projections are clamped elementwise (before RoPE)."""


class Model(llama.Model):
    def norm(self) -> nn.Module:
        return nn.LayerNorm(self.args.hidden_size, eps=1e-5, affine=False)

    def attention(self, index: int, kind: LayerKind) -> Attention:
        a = self.args
        return ClippedAttention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                                qkv_bias=a.attention_bias, o_bias=a.attention_bias, clip=a.clip_qkv)
