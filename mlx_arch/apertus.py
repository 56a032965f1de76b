"""Apertus, mirroring transformers/models/apertus/modeling_apertus.py: llama with RMS q/k norms per head (before
RoPE), a non-gated, bias-free `up_proj` -> xIELU -> `down_proj` MLP, the block's norms named `attention_layernorm` /
`feedforward_layernorm`, and Llama 3 RoPE scaling by default.

xIELU is learned: each MLP stores `act_fn.alpha_p` and `act_fn.alpha_n` (shape (1,)) and the constants `beta` and
`eps` (scalars) in the checkpoint; all four are read from it. Other `hidden_act` values use the plain function."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .core.kinds import LayerKind
from .core.layers import Attention, DenseMLP, ResidualBlock

DEFAULT_ROPE = {"rope_type": "llama3", "rope_theta": 12_000_000.0, "factor": 8.0,
                "original_max_position_embeddings": 8192, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 131072
    intermediate_size: int = 14336
    hidden_act: str = "xielu"
    max_position_embeddings: Optional[int] = 65536
    rms_norm_eps: float = 1e-5
    windowed = False

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        if not config.get("rope_parameters") and not config.get("rope_scaling"):
            # ApertusConfig's RoPE when none is stated; as there, a bare transformers-4 `rope_theta` is ignored
            config = {**config, "rope_parameters": DEFAULT_ROPE}
        return super().from_dict(config)


class XIELU(nn.Module):
    """x > 0: a_p x² + beta x; else (expm1(min(x, eps)) - x) a_n + beta x, with a_p = softplus(alpha_p) and
    a_n = beta + softplus(alpha_n)."""

    def __init__(self):
        super().__init__()
        self.alpha_p = mx.zeros((1,))
        self.alpha_n = mx.zeros((1,))
        self.beta = mx.array(0.5)
        self.eps = mx.array(-1e-6)

    def __call__(self, x):
        a_p = nn.softplus(self.alpha_p).astype(x.dtype)
        a_n = (self.beta + nn.softplus(self.alpha_n)).astype(x.dtype)
        beta = self.beta.astype(x.dtype)
        negative = (mx.expm1(mx.minimum(x, self.eps.astype(x.dtype))) - x) * a_n + beta * x
        return mx.where(x > 0, a_p * x * x + beta * x, negative)


class XIELUMLP(nn.Module):
    sensitive_children = ("down_proj",)

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = XIELU()

    def __call__(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)))


class Model(llama.Model):
    def attention(self, index: int, kind: LayerKind) -> Attention:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                         qkv_bias=a.attention_bias, o_bias=a.attention_bias,
                         qk_norm=lambda dims: nn.RMSNorm(dims, eps=a.rms_norm_eps))

    def mlp(self, index: int) -> nn.Module:
        a = self.args
        if a.hidden_act == "xielu":
            return XIELUMLP(a.hidden_size, a.intermediate_size)
        return DenseMLP(a.hidden_size, a.intermediate_size, a.hidden_act, bias=False, names=("up_proj", "down_proj"))

    def layer(self, index: int, kind: LayerKind) -> ResidualBlock:
        return ResidualBlock(self.attention(index, kind), self.mlp(index), self.norm,
                             norms=("attention_layernorm", "feedforward_layernorm"), kind=kind)

    def export_config(self, config: dict) -> dict:
        # mlx-lm's apertus requires these keys, which transformers' configs do not have
        a = self.args
        return {**config, "mlp_bias": False, "post_norm": False, "qk_norm": True, "rope_theta": a.rope_theta,
                "rope_scaling": a.rope_scaling}
