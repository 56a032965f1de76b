"""Granite-MoE, mirroring transformers/models/granitemoe/modeling_granitemoe.py: Granite (embedding, residual and
attention multipliers, logits divided by `logits_scaling`) whose MLP is a sparse MoE block under
`block_sparse_moe`: the router `router.layer` keeps the `num_experts_per_tok` largest logits and takes a softmax over
those; the checkpoint stores the experts already stacked, `input_linear` as [gate | up] along the output axis and
`output_linear` as the down projection. No sliding window."""

from dataclasses import dataclass
from functools import partial

import mlx.nn as nn

from . import granite
from .core.kinds import LayerKind
from .core.layers import ResidualBlock
from .core.moe import RoutedModel, SparseMoE, topk_softmax
from .core.weights import Move, Split

MOE = "model.layers.{i}.block_sparse_moe"


@dataclass
class ModelArgs(granite.ModelArgs):
    num_local_experts: int = 8
    num_experts_per_tok: int = 2


class Router(nn.Module):
    """The router's linear layer, one level down (`router.layer`) as the checkpoint and mlx-lm store it."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.layer = nn.Linear(hidden_size, num_experts, bias=False)

    def __call__(self, x):
        return self.layer(x)


class ScaledResidualBlock(ResidualBlock):
    """Pre-norm block whose sublayer outputs are multiplied by `residual_multiplier` before each residual add."""

    def __init__(self, *args, residual_multiplier: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.residual_multiplier = residual_multiplier

    def __call__(self, x, mask=None, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache) * self.residual_multiplier
        return h + self.block_sparse_moe(self.post_attention_layernorm(h)) * self.residual_multiplier


class Model(RoutedModel, granite.Model):
    def mlp(self, index: int) -> SparseMoE:
        a = self.args
        return SparseMoE(a.hidden_size, a.intermediate_size, a.num_local_experts,
                         partial(topk_softmax, k=a.num_experts_per_tok), a.hidden_act,
                         gate=Router(a.hidden_size, a.num_local_experts), gate_name="router")

    def layer(self, index: int, kind: LayerKind) -> ScaledResidualBlock:
        return ScaledResidualBlock(self.attention(index, kind), self.mlp(index), self.norm,
                                   names=("self_attn", "block_sparse_moe"), kind=kind,
                                   residual_multiplier=self.args.residual_multiplier)

    def weight_rules(self) -> list:
        size = self.args.intermediate_size
        return super().weight_rules() + [
            Split(f"{MOE}.input_linear.weight", [f"{MOE}.switch_mlp.gate_proj.weight",
                                                  f"{MOE}.switch_mlp.up_proj.weight"], [size, size], axis=1),
            Move(f"{MOE}.output_linear.weight", f"{MOE}.switch_mlp.down_proj.weight"),
        ]
