"""dots.llm1, mirroring transformers/models/dots1/modeling_dots1.py: Qwen3's attention (RMS q/k norms per head, biases
on all four projections when `attention_bias`) with a sliding window on the layers that `layer_types` says (by default
those from `max_window_layers` on, when `sliding_window` is set), dense `intermediate_size` MLPs on the first
`first_k_dense_replace` layers and DeepSeek-V3's MoE block elsewhere: sigmoid scores over `n_routed_experts`, the top
`num_experts_per_tok` chosen by score + `gate.e_score_correction_bias` within the `topk_group` best of `n_group`
groups, weighted by their scores (renormalised when `norm_topk_prob`) times `routed_scaling_factor`; experts of
`moe_intermediate_size` stacked under mlx-lm's `experts`; plus a shared MLP `shared_experts` of
moe_intermediate_size * `n_shared_experts`, added ungated.

mlx-lm's dots1 has neither the attention biases nor the sliding window, and drops (rather than excludes) the groups
left out."""

from dataclasses import dataclass
from functools import partial
from typing import Optional

import mlx.nn as nn

from . import llama, qwen3
from .core.layers import MLP
from .core.moe import RoutedModel, SparseMoE, sigmoid_topk, stack_experts


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 152064
    hidden_size: int = 4608
    intermediate_size: int = 10944
    num_hidden_layers: int = 62
    num_key_value_heads: Optional[int] = 32
    max_position_embeddings: Optional[int] = 2048
    moe_intermediate_size: int = 1408
    n_routed_experts: Optional[int] = None
    n_shared_experts: Optional[int] = None
    num_experts_per_tok: Optional[int] = None
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    sliding_window: Optional[int] = 4096
    max_window_layers: int = 62

    def __post_init__(self):
        if self.layer_types is None:  # Dots1Config's rule
            self.layer_types = ["sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                                else "full_attention" for i in range(self.num_hidden_layers)]
        super().__post_init__()
        moe = (self.n_routed_experts, self.n_shared_experts, self.num_experts_per_tok)
        if self.num_hidden_layers > self.first_k_dense_replace and None in moe:
            raise ValueError("dots1 needs n_routed_experts, n_shared_experts and num_experts_per_tok (transformers "
                             "cannot build its MoE layers without them)")


class Model(RoutedModel, llama.Model):
    attention = qwen3.Model.attention
    experts_name = "experts"  # where mlx-lm's dots1 keeps the stacked experts

    def mlp(self, index: int) -> nn.Module:
        a = self.args
        if index < a.first_k_dense_replace:
            return super().mlp(index)
        route = partial(sigmoid_topk, k=a.num_experts_per_tok, scaling=a.routed_scaling_factor,
                        normalize=a.norm_topk_prob, n_group=a.n_group, topk_group=a.topk_group)
        return SparseMoE(a.hidden_size, a.moe_intermediate_size, a.n_routed_experts, route, a.hidden_act,
                         shared=MLP(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts, a.hidden_act),
                         shared_name="shared_experts", switch_name=self.experts_name,
                         correction_bias="gate.e_score_correction_bias")

    def weight_rules(self) -> list:
        return super().weight_rules() + stack_experts("model.layers.{i}.mlp", self.args.n_routed_experts or 0,
                                                      switch=self.experts_name)
