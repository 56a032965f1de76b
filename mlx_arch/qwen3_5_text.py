"""Qwen3.5 (text), mirroring transformers/models/qwen3_5/modeling_qwen3_5.py (`Qwen3_5ForCausalLM`): Qwen3-Next's
gated attention / gated delta-net hybrid with dense MLPs on every layer and the delta net's projections kept apart
(`in_proj_qkv` [q | k | v], `in_proj_z`, `in_proj_b`, `in_proj_a`). The multimodal RoPE of the container reduces to
plain RoPE on text positions (every section sees the same position).

Layer kinds from `layer_types` or the older `full_attention_interval`; (1 + w) norms folded as in qwen3_next.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from . import qwen3_next


@dataclass
class ModelArgs(qwen3_next.ModelArgs):
    model_type: str = "qwen3_5_text"
    vocab_size: int = 248320
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_key_value_heads: Optional[int] = 4
    num_experts: int = 0  # Qwen3_5TextConfig has no experts (a stray key is not read)

    def __post_init__(self):
        super().__post_init__()
        self.num_experts = 0


class GatedDeltaNet(qwen3_next.GatedDeltaNet):
    """The delta net with separate projections: q, k, v from one [q | k | v] output, z, b and a on their own."""

    def __init__(self, a: ModelArgs):
        super().__init__(a)
        del self["in_proj_qkvz"], self["in_proj_ba"]
        self.in_proj_qkv = nn.Linear(a.hidden_size, 2 * self.nk * self.dk + self.nv * self.dv, bias=False)
        self.in_proj_z = nn.Linear(a.hidden_size, self.nv * self.dv, bias=False)
        self.in_proj_b = nn.Linear(a.hidden_size, self.nv, bias=False)
        self.in_proj_a = nn.Linear(a.hidden_size, self.nv, bias=False)

    def project(self, x):
        import mlx.core as mx

        B, L, _ = x.shape
        q, k, v = mx.split(self.in_proj_qkv(x), [self.nk * self.dk, 2 * self.nk * self.dk], axis=-1)
        z = self.in_proj_z(x).reshape(B, L, self.nv, self.dv)
        return q, k, v, z, self.in_proj_b(x), self.in_proj_a(x)


class Model(qwen3_next.Model):
    def linear_attention(self, index: int) -> nn.Module:
        return GatedDeltaNet(self.args)
