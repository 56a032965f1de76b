"""Qwen3-MoE, mirroring transformers/models/qwen3_moe/modeling_qwen3_moe.py: Qwen2-MoE without the shared expert,
with Qwen3's attention (RMS q/k norms per head, biases on all four projections when `attention_bias`) and, when
`use_sliding_window`, the window on every layer (`layer_types` and `max_window_layers` are not read).

transformers 5 writes the expert count as `num_local_experts` (its attribute_map alias); Hub configs and mlx-lm
say `num_experts`. mlx-lm also requires `head_dim`, which transformers writes only when set."""

from dataclasses import dataclass
from typing import Optional

from . import qwen2_moe, qwen3


@dataclass
class ModelArgs(qwen2_moe.ModelArgs):
    intermediate_size: int = 6144
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = 4
    num_experts: Optional[int] = None
    num_local_experts: Optional[int] = None
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768

    def __post_init__(self):
        if self.num_experts is None:
            self.num_experts = self.num_local_experts if self.num_local_experts is not None else 128
        # Every layer is of one kind: sliding when use_sliding_window (qwen2's post-init drops the window otherwise).
        self.layer_types = ["sliding_attention"] * self.num_hidden_layers
        super().__post_init__()


class Model(qwen2_moe.Model):
    attention = qwen3.Model.attention

    def shared_expert(self):
        return None

    def export_config(self, config: dict) -> dict:
        return {**config, "num_experts": self.args.num_experts, "head_dim": self.args.head_dim}
