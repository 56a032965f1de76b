"""DeepSeek-V3 (and Kimi-K2, which ships this model_type), mirroring transformers/models/deepseek_v3/
modeling_deepseek_v3.py: multi-head latent attention (core/mla.py: low-rank queries when `q_lora_rank` is set, a
`kv_lora_rank` latent, `qk_nope_head_dim` + `qk_rope_head_dim` query/key heads, `v_head_dim` values, interleaved RoPE
unless `rope_interleave` is false, the YaRN softmax scale of `mscale_all_dim`), dense `intermediate_size` MLPs on the
first `first_k_dense_replace` layers and the MoE block elsewhere: sigmoid scores over `n_routed_experts`, the top
`num_experts_per_tok` chosen by score + `gate.e_score_correction_bias` within the `topk_group` best of `n_group`
groups, weighted by their scores (renormalised when `norm_topk_prob`) times `routed_scaling_factor`; experts of
`moe_intermediate_size` stacked under mlx-lm's `switch_mlp`, plus `shared_experts` of moe_intermediate_size *
`n_shared_experts`.

Checkpoints carry `num_nextn_predict_layers` multi-token-prediction layers after the last decoder layer
(`model.layers.{num_hidden_layers}.*`); inference does not use them and transformers does not build them: dropped
by a declared rule. mlx-lm ignores `moe_layer_freq`, as transformers does."""

from dataclasses import dataclass
from functools import cached_property, partial
from typing import Optional

import mlx.nn as nn

from . import llama
from .core.kinds import LayerKind
from .core.layers import MLP
from .core.mla import LatentAttention, SplitKeyValueHeads, softmax_scale
from .core.moe import RoutedModel, SparseMoE, mlp_kinds, sigmoid_topk, stack_experts
from .core.rope import initialize_rope
from .core.weights import Drop


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: Optional[int] = 128
    n_shared_experts: Optional[int] = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: Optional[int] = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: Optional[int] = 8
    topk_group: Optional[int] = 4
    num_experts_per_tok: Optional[int] = 8
    first_k_dense_replace: Optional[int] = 3
    norm_topk_prob: bool = True
    max_position_embeddings: Optional[int] = 4096
    rope_interleave: bool = True
    num_nextn_predict_layers: int = 1
    windowed = False


def mtp_drop(layers: int) -> Drop:
    """The multi-token-prediction layers stored after the last decoder layer (index `layers`)."""
    leaves = ("weight", "bias", "e_score_correction_bias", "weight_scale_inv")
    return Drop(*(f"model.layers.{layers}.{{*}}{leaf}" for leaf in leaves),
                why="multi-token-prediction layers, unused by inference")


class Model(RoutedModel, llama.Model):
    @cached_property
    def rope(self):
        a = self.args
        return initialize_rope(a.qk_rope_head_dim, a.rope_theta, a.rope_interleave, a.rope_scaling,
                               a.max_position_embeddings)

    def attention(self, index: int, kind: LayerKind, indexer=None) -> LatentAttention:
        a = self.args
        scale = softmax_scale(a.qk_nope_head_dim + a.qk_rope_head_dim, a.rope_scaling)
        return LatentAttention(a.hidden_size, a.num_attention_heads, a.q_lora_rank, a.kv_lora_rank,
                               a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, self.rope, scale,
                               bias=a.attention_bias, indexer=indexer, split_kv=self.split_kv)

    def is_sparse(self, index: int) -> bool:
        a = self.args  # `mlp_layer_types` only where the config class has it (DeepSeek-V3.2, GLM)
        return mlp_kinds(a.num_hidden_layers, getattr(a, "mlp_layer_types", None), a.first_k_dense_replace)[index] \
            == "sparse"

    def dense(self, width: int) -> nn.Module:
        a = self.args
        return MLP(a.hidden_size, width, a.hidden_act)

    def route(self):
        a = self.args
        return partial(sigmoid_topk, k=a.num_experts_per_tok, scaling=a.routed_scaling_factor,
                       normalize=a.norm_topk_prob, n_group=a.n_group or 1, topk_group=a.topk_group or 1)

    def mlp(self, index: int) -> nn.Module:
        a = self.args
        if not self.is_sparse(index):
            return self.dense(a.intermediate_size)
        # transformers builds a zero-width shared MLP for n_shared_experts 0
        shared = self.dense(a.moe_intermediate_size * a.n_shared_experts) if a.n_shared_experts is not None else None
        return SparseMoE(a.hidden_size, a.moe_intermediate_size, a.n_routed_experts, self.route(), a.hidden_act,
                         shared=shared, shared_name="shared_experts", correction_bias=self.correction_bias)

    correction_bias: Optional[str] = "gate.e_score_correction_bias"
    split_kv = True  # kv_b_proj split per head (embed_q / unembed_out), as mlx-lm reads this family

    def export_config(self, config: dict) -> dict:
        """mlx-lm reads `first_k_dense_replace` where later configs say `mlp_layer_types`: written when the dense
        layers come first."""
        kinds = getattr(self.args, "mlp_layer_types", None)
        dense = kinds.count("dense") if kinds else 0
        if kinds and kinds[:dense] == ["dense"] * dense:
            return {**config, "first_k_dense_replace": dense}
        return config

    def weight_rules(self) -> list:
        a = self.args
        split = [SplitKeyValueHeads("model.layers.{i}.self_attn.", a.num_attention_heads, a.qk_nope_head_dim,
                                    a.v_head_dim)] if self.split_kv else []
        return super().weight_rules() + [mtp_drop(a.num_hidden_layers)] \
            + stack_experts("model.layers.{i}.mlp", a.n_routed_experts) + split
