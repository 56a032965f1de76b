"""Phi-3 (and Phi-3.5 / Phi-4-mini), mirroring transformers/models/phi3/modeling_phi3.py: llama's block with the
q/k/v projections fused in `qkv_proj` ([q | k | v]) and gate/up fused in `gate_up_proj`, both kept fused as the
checkpoint and mlx-lm store them; LongRoPE ("longrope", formerly "su") with short and long factors and the
original length kept next to `rope_scaling`; partial rotary; a sliding window on every layer when
`sliding_window` is set."""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from .core.base import BaseModelArgs
from .core.layers import Backbone, CausalLM, DecoderLayer, FusedGateUpMLP, FusedQKVAttention, make_rope, rms_norm


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None  # not a Phi3Config field; the attention reads it when a config has one
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    partial_rotary_factor: float = 1.0
    sliding_window: Optional[int] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_scaling is not None:
            # As Phi3Config: "su" and "yarn" are older names of longrope; no other scaling is accepted.
            rope_type = self.rope_scaling.get("rope_type", "default")
            rope_type = "longrope" if rope_type in ("su", "yarn") else rope_type
            if rope_type not in ("default", "longrope"):
                raise ValueError(f"phi3 supports only longrope scaling, got rope type {rope_type!r}")
            # transformers 4 configs keep the pretraining length only at the top level.
            self.rope_scaling = {"original_max_position_embeddings": self.original_max_position_embeddings,
                                 **self.rope_scaling, "rope_type": rope_type}


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        rope = make_rope(args.head_dim, args.rope_theta, args.rope_scaling, args.partial_rotary_factor,
                         args.max_position_embeddings)
        norm = rms_norm(args.hidden_size, args.rms_norm_eps)
        layers = [
            DecoderLayer(FusedQKVAttention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads,
                                           args.head_dim, rope, layout="blocks", bias=False,
                                           names=("qkv_proj", "o_proj")),
                         FusedGateUpMLP(args.hidden_size, args.intermediate_size, args.hidden_act),
                         norm, window=args.sliding_window)
            for _ in range(args.num_hidden_layers)
        ]
        self.model = Backbone(args.vocab_size, args.hidden_size, layers, norm())
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def export_config(self, config: dict) -> dict:
        # mlx-lm reads longrope only from a `rope_scaling` with "type" (transformers 5 writes `rope_parameters`).
        if self.args.rope_scaling is None:
            return config
        return {**config, "rope_scaling": {**self.args.rope_scaling, "type": self.args.rope_scaling["rope_type"]}}
