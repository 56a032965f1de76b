"""Bamba, mirroring transformers/models/bamba/modeling_bamba.py: a hybrid of Mamba-2 mixers (`mamba`) and Llama
attention (`self_attn`, at `attn_layer_indices`), each layer followed by a gated MLP (`feed_forward`); norms
`input_layernorm` / `pre_ff_layernorm`, `final_layernorm`. Attention rotates half of each head by default:
transformers 5 reads `partial_rotary_factor` from `rope_parameters` (0.5 when the config writes none) and forces 0.5
for configs in the transformers-4 style. Mamba layers keep a StateCache, attention layers a KVCache."""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from . import llama
from .core.conv import DepthwiseLayout
from .core.kinds import FULL, LayerKind
from .core.layers import MLP, NamedBackbone
from .core.linear import RecurrentBlock
from .core.ssm import RECURRENT, GatedRMSNorm, Mamba2Fields, Mamba2Mixer, SSMModel


@dataclass
class ModelArgs(llama.ModelArgs, Mamba2Fields):
    model_type: str = "bamba"
    vocab_size: int = 128000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = 8
    rms_norm_eps: float = 1e-5
    max_position_embeddings: Optional[int] = 262144
    attn_layer_indices: Optional[list] = None
    partial_rotary_factor: float = 0.5
    windowed = False

    @classmethod
    def from_dict(cls, config: dict):
        args = super().from_dict(config)
        if "rope_parameters" not in config:
            args.partial_rotary_factor = 0.5  # BambaConfig hard-codes it for transformers-4 configs
        return args

    def __post_init__(self):
        super().__post_init__()
        if self.mamba_d_head == "auto":
            self.mamba_d_head = self.mamba_expand * self.hidden_size // self.mamba_n_heads


class Model(SSMModel, llama.Model):
    mixer_name, ffn_name, norm_names = "mamba", "feed_forward", ("input_layernorm", "pre_ff_layernorm")

    def layer_kinds(self) -> list:
        attention = set(self.args.attn_layer_indices or ())
        return [FULL if i in attention else RECURRENT for i in range(self.args.num_hidden_layers)]

    def mixer(self, index: int) -> Mamba2Mixer:
        a = self.args
        inner = a.mamba_n_heads * a.mamba_d_head
        return Mamba2Mixer(a.hidden_size, a.mamba_n_heads, a.mamba_d_head, a.mamba_d_state, a.mamba_n_groups,
                           a.mamba_d_conv, a.mamba_chunk_size, a.time_step_limit, a.mamba_proj_bias,
                           a.mamba_conv_bias, a.hidden_act, GatedRMSNorm(inner, a.mamba_n_groups, a.rms_norm_eps))

    def feed_forward(self, index: int) -> nn.Module:
        return MLP(self.args.hidden_size, self.args.intermediate_size, self.args.hidden_act, self.args.mlp_bias)

    def layer(self, index: int, kind: LayerKind) -> RecurrentBlock:
        mixer, name = (self.attention(index, kind), "self_attn") if kind.attends else (self.mixer(index),
                                                                                      self.mixer_name)
        return RecurrentBlock(mixer, self.feed_forward(index), self.norm, norms=self.norm_names,
                              names=(name, self.ffn_name), kind=kind)

    def backbone(self, layers: list) -> nn.Module:
        return NamedBackbone(self.args.vocab_size, self.args.hidden_size, layers, self.norm(),
                             names=("embed_tokens", "layers", "final_layernorm"))

    def weight_rules(self) -> list:
        return super().weight_rules() + [DepthwiseLayout(f"model.layers.{{i}}.{self.mixer_name}.conv1d.weight")]
