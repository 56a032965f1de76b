"""Phi (phi-1, phi-1.5, phi-2), mirroring transformers/models/phi/modeling_phi.py: partial rotary (default 0.5),
one LayerNorm feeding attention and MLP in parallel, biases everywhere (including the head), the output projection
named `dense`, and optional LayerNorm on queries and keys (`qk_layernorm`)."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.layers import Attention, CausalLM, DenseMLP, NamedBackbone, ResidualBlock, layer_norm, make_rope
from .core.weights import tie_head


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 51200
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qk_layernorm: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    partial_rotary_factor: float = 0.5

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads


class PhiAttention(Attention):
    def __init__(self, args: ModelArgs, rope):
        head_dim = args.hidden_size // args.num_attention_heads
        super().__init__(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, head_dim, rope,
                         qkv_bias=True, o_bias=True)
        self.dense = self.pop("o_proj")
        if args.qk_layernorm:  # one LayerNorm over head_dim, shared by all heads
            self.q_layernorm = nn.LayerNorm(head_dim, eps=args.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(head_dim, eps=args.layer_norm_eps)

    def project(self, x):
        q, k, v = super().project(x)
        if "q_layernorm" in self:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        return q, k, v

    def __call__(self, x, mask=None, cache=None):
        return self.dense(self.attend(*self.project(x), mask, cache))


class HeadBias(nn.Module):
    """The head's own bias when its weight is tied to the embeddings."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.bias = mx.zeros((vocab_size,))


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        rope = make_rope(args.hidden_size // args.num_attention_heads, args.rope_theta, args.rope_scaling,
                         args.partial_rotary_factor, args.max_position_embeddings)
        norm = layer_norm(args.hidden_size, args.layer_norm_eps)
        layers = [
            ResidualBlock(PhiAttention(args, rope),
                          DenseMLP(args.hidden_size, args.intermediate_size, args.hidden_act, names=("fc1", "fc2")),
                          norm, norms=("input_layernorm",), parallel=True)
            for _ in range(args.num_hidden_layers)
        ]
        self.model = NamedBackbone(args.vocab_size, args.hidden_size, layers, norm(),
                                   names=("embed_tokens", "layers", "final_layernorm"))
        if args.tie_word_embeddings:
            self.lm_head = HeadBias(args.vocab_size)
        else:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=True)

    def head(self, h):
        logits = super().head(h)
        return logits + self.lm_head.bias if self.args.tie_word_embeddings else logits

    def weight_rules(self):
        rules = super().weight_rules()
        if self.args.tie_word_embeddings:
            # Only the head's weight is tied; replace the generic tie rule (last) so `lm_head.bias` stays.
            rules = rules[:-1] + [tie_head("lm_head.weight")]
        return rules
