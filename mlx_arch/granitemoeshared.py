"""Granite-MoE with a shared MLP, mirroring transformers/models/granitemoeshared/modeling_granitemoeshared.py:
Granite-MoE whose layers add, when `shared_intermediate_size` is non-zero, a dense gated MLP beside the sparse
block (`shared_mlp`, its gate and up projections fused in `input_linear` as [gate | up], the down projection
`output_linear`), fed the same normed input; both outputs are summed before `residual_multiplier` scales them.

mlx-lm has no granitemoeshared; the module names are the checkpoint's (and those of mlx-lm's granitemoehybrid)."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import granitemoe
from .core.kinds import LayerKind
from .core.layers import activation


@dataclass
class ModelArgs(granitemoe.ModelArgs):
    shared_intermediate_size: int = 0


class SharedMLP(nn.Module):
    """Gated MLP with fused [gate | up] `input_linear` and `output_linear`, without biases."""

    sensitive_children = ("output_linear",)

    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.input_linear = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.output_linear = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = activation(act)

    def __call__(self, x):
        gate, up = mx.split(self.input_linear(x), 2, axis=-1)
        return self.output_linear(self.act(gate) * up)


class SharedMLPBlock(granitemoe.ScaledResidualBlock):
    """Granite-MoE's block with the shared MLP's output added to the sparse block's."""

    def __init__(self, *args, shared_mlp: Optional[nn.Module] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if shared_mlp is not None:
            self.shared_mlp = shared_mlp

    def __call__(self, x, mask=None, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache) * self.residual_multiplier
        m = self.post_attention_layernorm(h)
        out = self.block_sparse_moe(m)
        if "shared_mlp" in self:
            out = out + self.shared_mlp(m)
        return h + out * self.residual_multiplier


class Model(granitemoe.Model):
    def layer(self, index: int, kind: LayerKind) -> SharedMLPBlock:
        a = self.args
        size = a.shared_intermediate_size
        shared = SharedMLP(a.hidden_size, size, a.hidden_act) if size else None
        return SharedMLPBlock(self.attention(index, kind), self.mlp(index), self.norm,
                              names=("self_attn", "block_sparse_moe"), kind=kind,
                              residual_multiplier=a.residual_multiplier, shared_mlp=shared)
