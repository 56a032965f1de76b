"""NanoChat, mirroring transformers/models/nanochat/modeling_nanochat.py: llama-shaped blocks whose RMS norms have
no weight, one more such norm on the embeddings before the first layer, weightless RMS norms on q and k per head,
a non-gated `fc1` -> ReLU² -> `fc2` MLP without biases, and soft-capped logits (`final_logit_softcapping`).

Its RoPE turns the other way (`rotate_half` gives (x2, -x1)): negative angles. Transformers norms q and k after RoPE; a weightless RMS norm commutes with RoPE (a rotation keeps the RMS of
each head vector), so the shared attention's norm-then-rotate computes the same thing.

mlx-lm's nanochat reads the original nanochat layout (`transformer.h.{i}.attn.c_q`), not transformers'."""

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import mlx.core as mx
import numpy as np
import mlx.nn as nn

from . import llama
from .core.kinds import LayerKind
from .core.layers import Attention, DenseMLP
from .core.rope import RoPE


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 50304
    hidden_size: int = 768
    intermediate_size: int = 8192
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    hidden_act: str = "relu2"
    final_logit_softcapping: Optional[float] = 15.0
    windowed = False


class WeightlessRMSNorm(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, None, self.eps)


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.final_softcap = args.final_logit_softcapping

    @cached_property
    def rope(self):
        a = self.args
        if a.rope_scaling:
            raise ValueError(f"nanochat with RoPE scaling ({a.rope_scaling}) is not supported")
        periods = a.rope_theta ** (np.arange(0, a.head_dim, 2, dtype=np.float64) / a.head_dim)
        return RoPE(a.head_dim, freqs=mx.array(-periods, dtype=mx.float32))

    def norm(self) -> nn.Module:
        return WeightlessRMSNorm(self.args.rms_norm_eps)

    def attention(self, index: int, kind: LayerKind) -> Attention:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                         qkv_bias=a.attention_bias, o_bias=a.attention_bias,
                         qk_norm=lambda dims: WeightlessRMSNorm(a.rms_norm_eps))

    def mlp(self, index: int) -> nn.Module:
        a = self.args
        return DenseMLP(a.hidden_size, a.intermediate_size, a.hidden_act, bias=False, names=("fc1", "fc2"))

    def embed(self, inputs, offset: int = 0):
        return self.model.norm(super().embed(inputs, offset))
