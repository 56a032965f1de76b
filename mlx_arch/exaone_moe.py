"""K-EXAONE (exaone_moe), mirroring transformers/models/exaone_moe/modeling_exaone_moe.py: EXAONE 4.0's attention
(RMS q/k norms per head before RoPE; the layers `layer_types` marks slide over `sliding_window` tokens and rotate,
the global layers use no positional encoding while a window is set) in llama's pre-norm blocks, with dense
`intermediate_size` MLPs on the layers `mlp_layer_types` calls dense (by default the first `first_k_dense_replace`)
and DeepSeek-V3's MoE block on the others: sigmoid scores over `num_experts`, the top `num_experts_per_tok` chosen by
score + `gate.e_score_correction_bias` within the `topk_group` best of `n_group` groups, weighted by their scores
(renormalised when `norm_topk_prob`) times `routed_scaling_factor`, plus an ungated shared MLP of
moe_intermediate_size * `num_shared_experts`.

Hub configs also say `is_moe_layer`, which ExaoneMoeConfig does not read (nor do we): the layers follow
`mlp_layer_types`, else `first_k_dense_replace`. Checkpoints store the correction bias on the block
(`mlp.e_score_correction_bias`, as transformers saves it) and may carry multi-token-prediction layers under `mtp.`,
which transformers ignores: dropped.

mlx-lm's exaone_moe reads `is_moe_layer` and `head_dim` (both written by the export); it rotates the global layers
when no layer slides (transformers never does while `sliding_window` is set, which ExaoneMoeConfig requires),
drops rather than excludes the groups left out and computes SiLU MLPs whatever `hidden_act` says."""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from . import deepseek_v3, exaone4, llama
from .core.layers import MLP
from .core.moe import RoutedModel, SparseMoE, mlp_kinds, stack_experts
from .core.weights import Drop, Move


@dataclass
class ModelArgs(exaone4.ModelArgs):
    mlp_layer_types: Optional[list] = None
    first_k_dense_replace: int = 1
    moe_intermediate_size: int = 1024
    num_experts: int = 64
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1

    def __post_init__(self):
        super().__post_init__()
        self.mlp_layer_types = mlp_kinds(self.num_hidden_layers, self.mlp_layer_types, self.first_k_dense_replace)


class Model(RoutedModel, exaone4.Model):
    layer = llama.Model.layer  # pre-norm blocks, unlike EXAONE 4.0's

    route = deepseek_v3.Model.route  # DeepSeek-V3's router with this config's settings

    def mlp(self, index: int) -> nn.Module:
        a = self.args
        if a.mlp_layer_types[index] == "dense":
            return super().mlp(index)
        return SparseMoE(a.hidden_size, a.moe_intermediate_size, a.num_experts, self.route(), a.hidden_act,
                         shared=MLP(a.hidden_size, a.moe_intermediate_size * a.num_shared_experts, a.hidden_act),
                         shared_name="shared_experts", correction_bias="gate.e_score_correction_bias")

    def weight_rules(self) -> list:
        block = "model.layers.{i}.mlp"
        mtp = Drop(*(f"mtp.{{*}}{leaf}" for leaf in ("weight", "bias", "e_score_correction_bias")),
                   why="multi-token-prediction layers, unused by inference")
        return super().weight_rules() + [mtp, Move(f"{block}.e_score_correction_bias",
                                                   f"{block}.gate.e_score_correction_bias")] \
            + stack_experts(block, self.args.num_experts)

    def export_config(self, config: dict) -> dict:
        # mlx-lm requires these keys (transformers writes head_dim only when set) and reads RoPE scaling from
        # `rope_scaling` only.
        a = self.args
        return {**config, "head_dim": a.head_dim, "rope_scaling": a.rope_scaling, "layer_types": a.layer_types,
                "is_moe_layer": [kind == "sparse" for kind in a.mlp_layer_types]}
