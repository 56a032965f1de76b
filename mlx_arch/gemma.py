"""Gemma, mirroring transformers/models/gemma/modeling_gemma.py: llama's layout with embeddings scaled by
sqrt(hidden_size), RMS norms that compute with (1 + weight), a GELU (tanh) gated MLP and a tied head by default."""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.layers import MLP, Attention, Backbone, CausalLM, DecoderLayer, OffsetRMSNorm, make_rope


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    attention_bias: bool = False
    use_bidirectional_attention: Optional[bool] = None

    def __post_init__(self):
        # GemmaConfig: the official checkpoints say "gelu" but were trained with the tanh approximation.
        if self.hidden_act == "gelu":
            self.hidden_act = "gelu_pytorch_tanh"
        refuse_bidirectional(self)


def refuse_bidirectional(args):
    if args.use_bidirectional_attention:
        raise ValueError(f"{args.model_type} with use_bidirectional_attention=True is an encoder (embedding model), "
                         "not a causal language model; it is not supported")


def offset_rms_norm(dims: int, eps: float):
    return lambda: OffsetRMSNorm(dims, eps=eps)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.embed_scale = args.hidden_size**0.5
        norm = offset_rms_norm(args.hidden_size, args.rms_norm_eps)
        rope = make_rope(args.head_dim, args.rope_theta, args.rope_scaling, 1.0, args.max_position_embeddings)
        layers = [
            DecoderLayer(Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                                   rope, qkv_bias=args.attention_bias, o_bias=args.attention_bias),
                         MLP(args.hidden_size, args.intermediate_size, args.hidden_act), norm)
            for _ in range(args.num_hidden_layers)
        ]
        self.model = Backbone(args.vocab_size, args.hidden_size, layers, norm())
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
