"""Jamba, mirroring transformers/models/jamba/modeling_jamba.py: Bamba's layer layout (pre-norm blocks with
`input_layernorm` / `pre_ff_layernorm`, the mixer under `mamba` or `self_attn`, the MLP under `feed_forward`,
`final_layernorm`) around Mamba-1 mixers whose dt, B and C pass weighted RMS norms (`dt_layernorm`, `b_layernorm`,
`c_layernorm`) and attention without position embeddings. Layer i attends when i % attn_layer_period ==
attn_layer_offset, and its feed-forward is a sparse MoE block when i % expert_layer_period == expert_layer_offset
(and num_experts > 1): a `router` whose softmax over every expert keeps the top k, not renormalised, over Mixtral
experts of `hidden_act`.

The checkpoint stores one tensor per expert (`feed_forward.experts.{e}.{gate,up,down}_proj`; transformers fuses
gate and up into `experts.gate_up_proj` when it loads them and splits them back when it saves): stacked here into
mlx-lm's `feed_forward.switch_mlp`. mlx-lm's jamba renormalises the top-k weights (a softmax over the chosen
logits), so its logits differ from transformers' unless every expert is chosen (transformers wins)."""

from dataclasses import dataclass
from functools import partial
from typing import Optional, Union

import math

import mlx.nn as nn

from . import bamba, llama
from .core.kinds import FULL
from .core.moe import RoutedModel, SparseMoE, softmax_topk, stack_experts
from .core.ssm import RECURRENT, MambaMixer


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "jamba"
    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_key_value_heads: Optional[int] = 8
    max_position_embeddings: Optional[int] = 262144
    num_experts: Optional[int] = None
    num_local_experts: Optional[int] = None  # JambaConfig's attribute_map name for num_experts
    num_experts_per_tok: int = 2
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: Union[int, str] = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    windowed = False

    def __post_init__(self):
        super().__post_init__()
        if self.num_experts is None:
            self.num_experts = self.num_local_experts if self.num_local_experts is not None else 16
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        for what in ("attn", "expert"):
            offset, period = getattr(self, f"{what}_layer_offset"), getattr(self, f"{what}_layer_period")
            if not 0 <= offset < period:
                raise ValueError(f"jamba {what}_layer_offset ({offset}) must be smaller than {what}_layer_period "
                                 f"({period})")

    def sparse(self, index: int) -> bool:
        """Whether layer `index` has the MoE block (JambaConfig.layers_num_experts)."""
        return self.num_experts > 1 and index % self.expert_layer_period == self.expert_layer_offset


class Model(bamba.Model, RoutedModel):
    rope = None  # Jamba's attention has no position embeddings

    def layer_kinds(self) -> list:
        a = self.args
        return [FULL if i % a.attn_layer_period == a.attn_layer_offset else RECURRENT
                for i in range(a.num_hidden_layers)]

    def mixer(self, index: int) -> MambaMixer:
        a = self.args
        return MambaMixer(a.hidden_size, a.mamba_expand * a.hidden_size, a.mamba_d_state, a.mamba_d_conv,
                          int(a.mamba_dt_rank), a.mamba_proj_bias, a.mamba_conv_bias, a.hidden_act,
                          bcdt_norm="weighted", norm_eps=a.rms_norm_eps)

    def feed_forward(self, index: int) -> nn.Module:
        a = self.args
        if not a.sparse(index):
            return super().feed_forward(index)
        route = partial(softmax_topk, k=a.num_experts_per_tok)
        return SparseMoE(a.hidden_size, a.intermediate_size, a.num_experts, route, a.hidden_act, gate_name="router")

    def weight_rules(self) -> list:
        return super().weight_rules() + stack_experts("model.layers.{i}.feed_forward", self.args.num_experts)

    def export_config(self, config: dict) -> dict:
        # mlx-lm's ModelArgs ties the head unless told otherwise (JambaConfig does not by default).
        return {**config, "tie_word_embeddings": self.args.tie_word_embeddings}
