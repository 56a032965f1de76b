"""Granite-4 (GraniteMoeHybrid), mirroring transformers/models/granitemoehybrid/modeling_granitemoehybrid.py:
Granite-MoE-shared layers whose mixer is attention or, per `layer_types` ("linear_attention"), a Mamba-2 mixer under
`mamba` (Bamba's mixer: `mamba_*` keys, conv act `hidden_act`, grouped gated norm with eps `rms_norm_eps`). The shared
MLP is always there; the sparse block only when `num_local_experts` > 0. Attention rotates positions only when
`position_embedding_type` is "rope" (the default is none)."""

from dataclasses import dataclass
from typing import Optional

from . import bamba, granitemoeshared
from .core.cache import StateCache
from .core.conv import DepthwiseLayout
from .core.kinds import FULL, LayerKind
from .core.ssm import RECURRENT, Mamba2Fields, SSMModel, time_step_bounds


@dataclass
class ModelArgs(granitemoeshared.ModelArgs, Mamba2Fields):
    shared_intermediate_size: int = 1024
    position_embedding_type: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        if self.mamba_d_head == "auto":
            self.mamba_d_head = self.mamba_expand * self.hidden_size // self.mamba_n_heads
        self.layer_types = self.layer_types or ["linear_attention"] * self.num_hidden_layers


class HybridBlock(granitemoeshared.SharedMLPBlock):
    """Granite-MoE-shared's block with the mixer under its own name (`self_attn` or `mamba`) and, without experts,
    the shared MLP alone."""

    def __call__(self, x, mask=None, cache=None):
        h = x + self[self.attn_name](self.input_layernorm(x), mask, cache) * self.residual_multiplier
        m = self.post_attention_layernorm(h)
        out = self.shared_mlp(m)
        if self.mlp_name in self:
            out = out + self[self.mlp_name](m)
        return h + out * self.residual_multiplier

    def make_cache(self):
        return super().make_cache() if self.kind.attends else StateCache(self[self.attn_name].cache_slots)


class Model(SSMModel, granitemoeshared.Model):
    mixer = bamba.Model.mixer

    def layer_kinds(self) -> list:
        return [RECURRENT if t in ("linear_attention", "mamba") else FULL for t in self.args.layer_types]

    @property
    def rope(self):
        return super().rope if self.args.position_embedding_type == "rope" else None

    def layer(self, index: int, kind: LayerKind) -> HybridBlock:
        a = self.args
        mixer, name = (self.attention(index, kind), "self_attn") if kind.attends else (self.mixer(index), "mamba")
        experts = self.mlp(index) if a.num_local_experts > 0 else None
        block = HybridBlock(mixer, experts or mixer, self.norm, names=(name, "block_sparse_moe"), kind=kind,
                            residual_multiplier=a.residual_multiplier,
                            shared_mlp=granitemoeshared.SharedMLP(a.hidden_size, a.shared_intermediate_size,
                                                                  a.hidden_act))
        if experts is None:
            del block["block_sparse_moe"]
        return block

    def weight_rules(self) -> list:
        return super().weight_rules() + [DepthwiseLayout("model.layers.{i}.mamba.conv1d.weight")]

    def export_config(self, config: dict) -> dict:
        # mlx-lm knows only the older layer names, which transformers still reads ("mamba" -> "linear_attention"),
        # rotates unless told "nope" (transformers only when told "rope") and takes time_step_limit as numbers.
        names = ["attention" if layer.kind.attends else "mamba" for layer in self.layers]
        rope = "rope" if self.args.position_embedding_type == "rope" else "nope"
        return {**super().export_config(config), "layer_types": names, "position_embedding_type": rope,
                "time_step_limit": list(time_step_bounds(self.args.time_step_limit))}
