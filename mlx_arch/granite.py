"""Granite (IBM Granite 3.x dense), mirroring transformers/models/granite/modeling_granite.py: llama with the
embeddings multiplied by `embedding_multiplier`, each sublayer's output by `residual_multiplier` before the residual
add, `attention_multiplier` as the attention scale (instead of head_dim**-0.5) and the logits divided by
`logits_scaling`."""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.layers import MLP, Attention, Backbone, CausalLM, DecoderLayer, make_rope, rms_norm


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None  # not a GraniteConfig field; llama's attention reads it when a config has one
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    partial_rotary_factor: float = 1.0
    attention_bias: bool = False
    mlp_bias: bool = False
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


class ScaledResidualLayer(DecoderLayer):
    """Pre-norm block whose sublayer outputs are multiplied by `residual_multiplier` before each residual add."""

    def __init__(self, *args, residual_multiplier: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.residual_multiplier = residual_multiplier

    def __call__(self, x, mask=None, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache) * self.residual_multiplier
        return h + self.mlp(self.post_attention_layernorm(h)) * self.residual_multiplier


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.embed_scale = args.embedding_multiplier
        rope = make_rope(args.head_dim, args.rope_theta, args.rope_scaling, args.partial_rotary_factor,
                         args.max_position_embeddings)
        norm = rms_norm(args.hidden_size, args.rms_norm_eps)
        layers = [
            ScaledResidualLayer(Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads,
                                          args.head_dim, rope, qkv_bias=args.attention_bias,
                                          o_bias=args.attention_bias, scale=args.attention_multiplier),
                                MLP(args.hidden_size, args.intermediate_size, args.hidden_act, args.mlp_bias), norm,
                                residual_multiplier=args.residual_multiplier)
            for _ in range(args.num_hidden_layers)
        ]
        self.model = Backbone(args.vocab_size, args.hidden_size, layers, norm())
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def head(self, h):
        return super().head(h) / self.args.logits_scaling
