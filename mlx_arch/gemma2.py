"""Gemma 2, mirroring transformers/models/gemma2/modeling_gemma2.py: Gemma with norms before and after each sublayer
("sandwich" blocks), tanh soft-capping of attention scores and of the final logits, attention scaled by
query_pre_attn_scalar**-0.5, and sliding-window attention on the layers `layer_types` marks (every other layer by
default, starting with the first)."""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from .core.base import BaseModelArgs
from .gemma import offset_rms_norm, refuse_bidirectional
from .core.layers import MLP, Attention, Backbone, CausalLM, PostNormDecoderLayer, make_rope


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: Optional[int] = 4096
    layer_types: Optional[list] = None
    final_logit_softcapping: Optional[float] = 30.0
    attn_logit_softcapping: Optional[float] = 50.0
    use_bidirectional_attention: Optional[bool] = None

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        refuse_bidirectional(self)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.embed_scale = args.hidden_size**0.5
        self.final_softcap = args.final_logit_softcapping
        norm = offset_rms_norm(args.hidden_size, args.rms_norm_eps)
        layers = [
            PostNormDecoderLayer(self.attention(args, layer_type),
                                 MLP(args.hidden_size, args.intermediate_size, args.hidden_activation), norm,
                                 window=args.sliding_window if layer_type == "sliding_attention" else None)
            for layer_type in args.layer_types[: args.num_hidden_layers]
        ]
        self.model = Backbone(args.vocab_size, args.hidden_size, layers, norm())
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def attention(self, args: ModelArgs, layer_type: str) -> Attention:
        """One layer's attention; gemma3 overrides this (per-layer-type RoPE, q/k norms, no score capping)."""
        rope = make_rope(args.head_dim, args.rope_theta, args.rope_scaling, 1.0, args.max_position_embeddings)
        return Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim, rope,
                         qkv_bias=args.attention_bias, o_bias=args.attention_bias,
                         scale=args.query_pre_attn_scalar**-0.5, softcap=args.attn_logit_softcapping)
