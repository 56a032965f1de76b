"""LFM2-MoE, mirroring transformers/models/lfm2_moe/modeling_lfm2_moe.py: LFM2's attention / short-convolution
hybrid whose first `num_dense_layers` feed-forwards are SwiGLU MLPs of `intermediate_size` (no width adjustment)
and the rest sparse MoE blocks: sigmoid scores, the top `num_experts_per_tok` chosen by score + `expert_bias` (when
`use_expert_bias`), weighted by their scores, renormalised (sum + 1e-6) when `norm_topk_prob`, times
`routed_scaling_factor`.

Module names are mlx-lm's: the checkpoint's w1 / w3 / w2 become gate_proj / up_proj / down_proj (dense MLPs too),
experts stacked under `switch_mlp`. The expert bias keeps its stored dtype (transformers keeps it in float32).
"""

from dataclasses import dataclass
from functools import partial
from typing import Optional

import mlx.nn as nn

from . import lfm2
from .core.layers import MLP
from .core.moe import RoutedModel, SparseMoE, is_sparse, sigmoid_topk, stack_experts
from .core.weights import Move

_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass
class ModelArgs(lfm2.ModelArgs):
    model_type: str = "lfm2_moe"
    hidden_size: int = 2048
    intermediate_size: int = 7168
    moe_intermediate_size: int = 1792
    num_dense_layers: int = 2
    num_experts_per_tok: int = 4
    num_experts: int = 32
    use_expert_bias: bool = True
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    block_auto_adjust_ff_dim: bool = False  # Lfm2MoeConfig has no width adjustment


def route(logits, k: int, normalize: bool, scaling: float, correction_bias=None):
    indices, weights = sigmoid_topk(logits, k, correction_bias, normalize=False)
    if normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-6)
    return indices, weights * scaling


class Model(RoutedModel, lfm2.Model):
    def mlp(self, index: int) -> nn.Module:
        a = self.args
        if not is_sparse(index, a.num_experts, first_dense=a.num_dense_layers):
            return MLP(a.hidden_size, a.intermediate_size)
        router = partial(route, k=a.num_experts_per_tok, normalize=a.norm_topk_prob, scaling=a.routed_scaling_factor)
        return SparseMoE(a.hidden_size, a.moe_intermediate_size, a.num_experts, router,
                         correction_bias="expert_bias" if a.use_expert_bias else None)

    def weight_rules(self) -> list:
        block = "model.layers.{i}.feed_forward"
        dense = [Move(f"{block}.{w}.weight", f"{block}.{ours}.weight") for w, ours in _NAMES.items()]
        return super().weight_rules() + dense + stack_experts(block, self.args.num_experts, _NAMES)

    def cast_predicate(self, path: str) -> bool:
        return super().cast_predicate(path) and not path.endswith(".expert_bias")

    def export_config(self, config: dict) -> dict:
        return config  # mlx-lm's lfm2_moe reads the transformers config as it is
