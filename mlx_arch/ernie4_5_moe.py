"""ERNIE 4.5 MoE, mirroring transformers/models/ernie4_5_moe/modeling_ernie4_5_moe.py: ERNIE 4.5 (interleaved RoPE,
one `use_bias` switch for the attention, dense-MLP and shared-expert biases, tied embeddings by default) with the
head bias also under `use_bias` (beside a tied weight too), and a sparse MoE block on every `moe_layer_interval`-th
layer from `moe_layer_start_index` to `moe_layer_end_index` (-1: the last), dense `intermediate_size` MLPs elsewhere:
a softmax over `moe_num_experts`, the top `moe_k` chosen by probability + `moe_statics.e_score_correction_bias`,
weighted by their probabilities renormalised (the sum floored at `moe_norm_min`); bias-free experts of
`moe_intermediate_size`, stored per expert and stacked here; and `moe_num_shared_experts` shared experts as one MLP
`shared_experts` of moe_intermediate_size * moe_num_shared_experts, added ungated.

The checkpoint's multi-token-prediction layers (`model.mtp_*`) are dropped: transformers ignores them too. mlx-lm's
ernie4_5_moe ignores the correction bias, has no head bias, and gives the experts biases when `use_bias`."""

from dataclasses import dataclass
from functools import partial
from typing import Optional

import mlx.nn as nn

from . import ernie4_5
from .core.layers import MLP
from .core.moe import RoutedModel, SparseMoE, is_sparse, softmax_topk_corrected, stack_experts
from .core.weights import Drop
from .phi import HeadBias

MTP = ("model.mtp_block.{*}weight", "model.mtp_block.{*}bias", "model.mtp_block.{*}e_score_correction_bias",
       "model.mtp_emb_norm.{*}weight", "model.mtp_hidden_norm.{*}weight", "model.mtp_linear_proj.{*}weight",
       "model.mtp_linear_proj.{*}bias")


@dataclass
class ModelArgs(ernie4_5.ModelArgs):
    hidden_size: int = 2560
    intermediate_size: int = 12288
    num_hidden_layers: int = 28
    num_attention_heads: int = 20
    num_key_value_heads: Optional[int] = 4
    head_dim: Optional[int] = None  # not an Ernie4_5_MoeConfig field; the attention reads it when a config has one
    moe_intermediate_size: int = 1536
    moe_k: int = 6
    moe_num_experts: int = 64
    moe_num_shared_experts: int = 2
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12

    def __post_init__(self):
        super().__post_init__()
        if self.moe_layer_end_index == -1:
            self.moe_layer_end_index = self.num_hidden_layers - 1


class Model(RoutedModel, ernie4_5.Model):
    def mlp(self, index: int) -> nn.Module:
        a = self.args
        if not is_sparse(index, a.moe_num_experts, a.moe_layer_interval, first_dense=a.moe_layer_start_index,
                         last_sparse=a.moe_layer_end_index):
            return super().mlp(index)
        shared = None
        if a.moe_num_shared_experts > 0:
            shared = MLP(a.hidden_size, a.moe_intermediate_size * a.moe_num_shared_experts, a.hidden_act, a.use_bias)
        route = partial(softmax_topk_corrected, k=a.moe_k, norm_min=a.moe_norm_min)
        moe = SparseMoE(a.hidden_size, a.moe_intermediate_size, a.moe_num_experts, route, a.hidden_act,
                        shared=shared, shared_name="shared_experts",
                        correction_bias="moe_statics.e_score_correction_bias")
        moe.moe_statics.e_score_correction_bias = moe.moe_statics.e_score_correction_bias[None]  # (1, experts)
        return moe

    def output_head(self) -> Optional[nn.Module]:
        a = self.args
        if a.tie_word_embeddings:
            return HeadBias(a.vocab_size) if a.use_bias else None
        return nn.Linear(a.hidden_size, a.vocab_size, bias=a.use_bias)

    def head(self, h):
        logits = super().head(h)
        return logits + self.lm_head.bias if self.args.tie_word_embeddings and self.args.use_bias else logits

    def weight_rules(self) -> list:
        return super().weight_rules() + [Drop(*MTP, why="multi-token-prediction layers")] + stack_experts(
            "model.layers.{i}.mlp", self.args.moe_num_experts)
