"""Phi-3 (and Phi-3.5 / Phi-4-mini), mirroring transformers/models/phi3/modeling_phi3.py: llama's block with the
q/k/v projections fused in `qkv_proj` ([q | k | v]) and gate/up fused in `gate_up_proj`, both kept fused as the
checkpoint and mlx-lm store them; LongRoPE ("longrope", formerly "su") with short and long factors and the
original length kept next to `rope_scaling`; partial rotary; a sliding window on every layer when
`sliding_window` is set."""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from . import llama
from .core.kinds import LayerKind
from .core.layers import FusedGateUpMLP, FusedQKVAttention


@dataclass
class ModelArgs(llama.ModelArgs):
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    head_dim: Optional[int] = None  # not a Phi3Config field; the attention reads it when a config has one
    max_position_embeddings: Optional[int] = 4096
    original_max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        if self.rope_scaling is not None:
            # As Phi3Config: "su" and "yarn" are older names of longrope; no other scaling is accepted.
            rope_type = self.rope_scaling.get("rope_type", "default")
            rope_type = "longrope" if rope_type in ("su", "yarn") else rope_type
            if rope_type not in ("default", "longrope"):
                raise ValueError(f"phi3 supports only longrope scaling, got rope type {rope_type!r}")
            # transformers 4 configs keep the pretraining length only at the top level.
            self.rope_scaling = {"original_max_position_embeddings": self.original_max_position_embeddings,
                                 **self.rope_scaling, "rope_type": rope_type}


class Model(llama.Model):
    def attention(self, index: int, kind: LayerKind) -> nn.Module:
        a = self.args
        return FusedQKVAttention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, self.rope,
                                 layout="blocks", bias=False, names=("qkv_proj", "o_proj"))

    def mlp(self, index: int) -> nn.Module:
        return FusedGateUpMLP(self.args.hidden_size, self.args.intermediate_size, self.args.hidden_act)

    def export_config(self, config: dict) -> dict:
        # mlx-lm reads longrope only from a `rope_scaling` with "type" (transformers 5 writes `rope_parameters`).
        if self.args.rope_scaling is None:
            return config
        return {**config, "rope_scaling": {**self.args.rope_scaling, "type": self.args.rope_scaling["rope_type"]}}
