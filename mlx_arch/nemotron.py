"""Nemotron (Nemotron-4, Minitron), mirroring transformers/models/nemotron/modeling_nemotron.py: "layernorm1p"
norms (LayerNorm whose weight is stored as an offset from one), a non-gated `up_proj`/`down_proj` MLP with squared
ReLU, partial rotary (default 0.5) and optional attention / MLP biases."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .core.layers import DenseMLP


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 256000
    hidden_size: int = 6144
    intermediate_size: int = 24576
    num_attention_heads: int = 48
    hidden_act: str = "relu2"
    max_position_embeddings: Optional[int] = 4096
    norm_eps: float = 1e-5
    partial_rotary_factor: float = 0.5
    windowed = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            # NemotronConfig states no default (its attention would fail): refuse rather than guess.
            raise ValueError("nemotron config has no num_key_value_heads")
        super().__post_init__()


class LayerNorm1P(nn.LayerNorm):
    """LayerNorm computing with (1 + weight)."""

    def __call__(self, x):
        return mx.fast.layer_norm(x, 1.0 + self.weight, self.bias, self.eps)


class Model(llama.Model):
    def norm(self) -> nn.Module:
        return LayerNorm1P(self.args.hidden_size, eps=self.args.norm_eps)

    def mlp(self, index: int) -> nn.Module:
        a = self.args
        return DenseMLP(a.hidden_size, a.intermediate_size, a.hidden_act, bias=a.mlp_bias,
                        names=("up_proj", "down_proj"))
