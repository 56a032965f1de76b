"""Qwen2-MoE (Qwen1.5-MoE), mirroring transformers/models/qwen2_moe/modeling_qwen2_moe.py: Qwen2's attention with
q/k/v biases only when `qkv_bias` (default true), sliding windows (when `use_sliding_window`) on the even layers
below `max_window_layers` unless `layer_types` says otherwise, and a sparse MoE block on every
`decoder_sparse_step`-th layer outside `mlp_only_layers` (dense `intermediate_size` MLPs elsewhere): softmax router
over `num_experts`, top `num_experts_per_tok`, renormalised when `norm_topk_prob`; experts of
`moe_intermediate_size`, stored per expert and stacked here; plus a shared expert of
`shared_expert_intermediate_size` scaled by sigmoid(`shared_expert_gate`)."""

from dataclasses import dataclass
from functools import partial
from typing import Optional

import mlx.nn as nn

from . import qwen2
from .core.layers import MLP, Attention
from .core.moe import RoutedModel, SparseMoE, is_sparse, softmax_topk, stack_experts


@dataclass
class ModelArgs(qwen2.ModelArgs):
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: Optional[int] = 16
    max_position_embeddings: Optional[int] = 32768
    max_window_layers: Optional[int] = 28
    qkv_bias: bool = True
    num_experts: int = 60
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 5632
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: Optional[list] = None

    def __post_init__(self):
        if self.layer_types is None and self.use_sliding_window:
            # Qwen2MoeConfig's own rule (not Qwen2's): even layers below max_window_layers slide.
            self.layer_types = ["sliding_attention" if i % 2 == 0 and i < self.max_window_layers else "full_attention"
                                for i in range(self.num_hidden_layers)]
        super().__post_init__()
        self.mlp_only_layers = list(self.mlp_only_layers or [])


class Model(RoutedModel, qwen2.Model):
    def attention(self, index: int, kind) -> Attention:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                         qkv_bias=a.qkv_bias, o_bias=False)

    def shared_expert(self) -> Optional[nn.Module]:
        a = self.args
        return MLP(a.hidden_size, a.shared_expert_intermediate_size, a.hidden_act)

    def mlp(self, index: int) -> nn.Module:
        a = self.args
        if not is_sparse(index, a.num_experts, a.decoder_sparse_step, a.mlp_only_layers):
            return super().mlp(index)
        route = partial(softmax_topk, k=a.num_experts_per_tok, normalize=a.norm_topk_prob)
        return SparseMoE(a.hidden_size, a.moe_intermediate_size, a.num_experts, route, a.hidden_act,
                         shared=self.shared_expert(), shared_gate=True)

    def weight_rules(self) -> list:
        return super().weight_rules() + stack_experts("model.layers.{i}.mlp", self.args.num_experts)
