"""Phi (phi-1, phi-1.5, phi-2), mirroring transformers/models/phi/modeling_phi.py: partial rotary (default 0.5),
one LayerNorm feeding attention and MLP in parallel, biases everywhere (including the head), the output projection
named `dense`, and optional LayerNorm on queries and keys (`qk_layernorm`)."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.kinds import LayerKind
from .core.layers import Attention, CausalLM, DenseMLP, NamedBackbone, ResidualBlock


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
    def norm(self) -> nn.Module:
        return nn.LayerNorm(self.args.hidden_size, eps=self.args.layer_norm_eps)

    def layer(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        mlp = DenseMLP(a.hidden_size, a.intermediate_size, a.hidden_act, names=("fc1", "fc2"))
        return ResidualBlock(PhiAttention(a, self.rope), mlp, self.norm, norms=("input_layernorm",), parallel=True,
                             kind=kind)

    def backbone(self, layers: list) -> nn.Module:
        return NamedBackbone(self.args.vocab_size, self.args.hidden_size, layers, self.norm(),
                             names=("embed_tokens", "layers", "final_layernorm"))

    def output_head(self) -> nn.Module:
        # Tied, only the head's weight is shared (the default rules drop just `lm_head.weight`): keep its bias.
        if self.args.tie_word_embeddings:
            return HeadBias(self.args.vocab_size)
        return nn.Linear(self.args.hidden_size, self.args.vocab_size, bias=True)

    def head(self, h):
        logits = super().head(h)
        return logits + self.lm_head.bias if self.args.tie_word_embeddings else logits
