"""OLMo (transformers format, e.g. allenai/OLMo-1B-hf), mirroring transformers/models/olmo/modeling_olmo.py: llama
with non-parametric LayerNorms (no weight, no bias, eps 1e-5 fixed), optional q/k/v/o biases (`attention_bias`), a
bias-free MLP, and q/k/v activations clamped to [-clip_qkv, clip_qkv] when `clip_qkv` is set.

mlx-lm's `olmo` is a different format (ai2-olmo's `d_model` / `att_proj` checkpoints), so module names follow
transformers."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.layers import MLP, Attention, Backbone, CausalLM, DecoderLayer, make_rope


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 50304
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None  # not an OlmoConfig field; llama's attention reads it when a config has one
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    partial_rotary_factor: float = 1.0
    attention_bias: bool = False
    clip_qkv: Optional[float] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


class ClippedAttention(Attention):
    """Attention whose q/k/v projections are clamped elementwise (before RoPE)."""

    def __init__(self, *args, clip: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.clip = clip

    def project(self, x):
        q, k, v = super().project(x)
        if self.clip is None:
            return q, k, v
        return tuple(mx.clip(t, -self.clip, self.clip) for t in (q, k, v))


def parameter_free_layer_norm(dims: int):
    return lambda: nn.LayerNorm(dims, eps=1e-5, affine=False)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        rope = make_rope(args.head_dim, args.rope_theta, args.rope_scaling, args.partial_rotary_factor,
                         args.max_position_embeddings)
        norm = parameter_free_layer_norm(args.hidden_size)
        layers = [
            DecoderLayer(ClippedAttention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads,
                                          args.head_dim, rope, qkv_bias=args.attention_bias,
                                          o_bias=args.attention_bias, clip=args.clip_qkv),
                         MLP(args.hidden_size, args.intermediate_size, args.hidden_act), norm)
            for _ in range(args.num_hidden_layers)
        ]
        self.model = Backbone(args.vocab_size, args.hidden_size, layers, norm())
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
