"""DeepSeek-V2 (and V2-Lite), mirroring transformers/models/deepseek_v2/modeling_deepseek_v2.py: DeepSeek-V3's
latent attention (always interleaved RoPE) and layout, with softmax routing: the top `num_experts_per_tok` of
`n_routed_experts` by probability (`topk_method` "greedy"), or only among the `topk_group` of `n_group` groups whose
best expert is most probable ("group_limited_greedy"), weighted by their probabilities times `routed_scaling_factor`
(never renormalised: transformers drops `norm_topk_prob`); dense and shared MLPs with biases when `mlp_bias`
(which mlx-lm's deepseek_v2 does not read). `kv_b_proj` stays whole, as mlx-lm's deepseek_v2 reads it.
transformers 5 may write the expert count as `num_experts` (its attribute_map alias)."""

from dataclasses import dataclass
from functools import partial
from typing import Optional

import mlx.nn as nn

from . import deepseek_v3
from .core.layers import MLP
from .core.moe import softmax_group_topk

TOPK_METHODS = ("greedy", "group_limited_greedy")


@dataclass
class ModelArgs(deepseek_v3.ModelArgs):
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    max_position_embeddings: Optional[int] = 2048
    n_shared_experts: Optional[int] = 2
    n_routed_experts: int = 64
    num_experts: Optional[int] = None
    routed_scaling_factor: float = 1.0
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    topk_method: Optional[str] = "greedy"
    num_experts_per_tok: Optional[int] = None
    first_k_dense_replace: Optional[int] = 0
    norm_topk_prob: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.num_experts is not None:
            self.n_routed_experts = self.num_experts
        self.rope_interleave = True  # DeepseekV2Config has no such key: its rotation is always interleaved
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"deepseek_v2 topk_method {self.topk_method!r} is not one transformers implements; "
                             f"use one of {', '.join(TOPK_METHODS)}")


class Model(deepseek_v3.Model):
    correction_bias = None
    split_kv = False  # mlx-lm's deepseek_v2 reads kv_b_proj whole

    def dense(self, width: int) -> nn.Module:
        a = self.args
        return MLP(a.hidden_size, width, a.hidden_act, a.mlp_bias)

    def route(self):
        a = self.args
        groups = a.topk_method == "group_limited_greedy"
        return partial(softmax_group_topk, k=a.num_experts_per_tok, scaling=a.routed_scaling_factor,
                       n_group=a.n_group if groups else 1, topk_group=a.topk_group if groups else 1)
